"""pytest tests/test_arch_vllm.py -q     # needs the vLLM environment: bash pipelines/vllm-cpu-env.sh

`mod-extract --backend vllm` against `--backend hf` on the tiny LLaVA-Interleave and LLaVA-OneVision
copies (tests/arch_models.py), both run in the vLLM environment so both see the same pixels: there
transformers 5.19 resizes images with torchvision, here (no torchvision) with PIL, and the two resizes
differ by up to one 8-bit level, which moves a tiny random teacher's image-position log-probs by ~1e-3
(measured). Every position kind; OneVision records hold 42 to 99 image tokens (anyres).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import arch_models
from conftest import vllm_env
from modkd.pipelines.toyworld.world import corpus_texts
from modkd.store import Cache
from test_vllm_extract import assert_caches_match, vllm_extract


@pytest.mark.parametrize("arch", arch_models.ARCHS)
def test_vllm_equals_hf_on_the_real_architectures(vllm_python, tmp_path, world, arch):
    tok = arch_models.tokenizer(arch, corpus_texts(world))
    teacher = arch_models.teacher(tmp_path / "teacher", arch, tok)
    records = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()]
    records = [r for r in records if "image" in r][:6] + [r for r in records if "image" not in r][:2]
    root = tmp_path / "images"
    root.mkdir()
    sizes = arch_models.ONEVISION_SIZES if arch == "onevision" else [(48, 48)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in arch_models.write_images(world, root, records, sizes)))
    args = ["--teacher", str(teacher), "--data", str(data), "--image-root", str(root), "--positions", "all",
            "--top-k", "8"]
    hf_cmd = [str(vllm_python.parent / "mod-extract"), "--backend", "hf", "--out", str(tmp_path / "hf"), *args]
    done = subprocess.run(hf_cmd, capture_output=True, text=True, env=vllm_env(tmp_path), timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    vllm_extract(vllm_python, tmp_path, tmp_path / "vllm", *args)
    hf, vl = Cache.open(tmp_path / "hf"), Cache.open(tmp_path / "vllm")
    assert_caches_match(hf, vl)
    counts = {r.num_image_tokens for r in hf.records()}
    assert counts == {0, 16} if arch == "interleave" else len(counts - {0}) >= 4, counts
