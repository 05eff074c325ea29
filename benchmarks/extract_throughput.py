"""python benchmarks/extract_throughput.py [--teacher smollm2-135m] [--records 8] [--tokens 256] [--reps 6]

Extraction throughput against the teacher's bare forward pass, on the SAME batches, in one run:

  (a) bare forward   `model(**inputs)`: full (B, T, V) logits at every position (what a user would run)
  (b) HFBackend.run  base forward + chunked lm_head + log_softmax + top-k(20) at response positions only
  (c) end-to-end     `run(ExtractConfig(...), teacher=teacher)`: read JSONL, encode, (b), write zstd
                     Parquet, done markers, manifest (teacher loading excluded: it is paid once per run)

Records are passages of the papers' text (llava-mod.txt, llava-kd.txt) as LLaVA records whose answer
is the passage, encoded once with the extractor's own Encoder (not timed). Batches are formed as run()
forms them (length-sorted, --batch-size). After a warm-up (one pass of (a) and (b); (c) on one record)
the three are timed interleaved (a, b, c, a, b, c, ...) so that drift on a shared machine hits all of
them. Each method's time is its best (minimum) over the repetitions, the usual estimator when other
load on the machine only ever adds time; the ratios are of those best times, and the JSON also keeps
every time and the spread of the per-repetition ratios. Throughput counts real (non-pad) tokens.
"""

from __future__ import annotations

import argparse
import json
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

CUDA = torch.cuda.is_available()
p = argparse.ArgumentParser(description=__doc__.split("\n")[2])
p.add_argument("--teacher", default="smollm2-135m", help="preset or local HF directory")
p.add_argument("--text-dir", type=Path, default=TEXT_DIR)
p.add_argument("--records", type=int, default=64 if CUDA else 8)  # CPU: ~2.3k tokens per pass keeps the run under 3 min on 2 cores
p.add_argument("--tokens", type=int, default=256)  # passage length in teacher tokens; + ~36 template tokens per record
p.add_argument("--batch-size", type=int, default=8)  # ExtractConfig's default
p.add_argument("--top-k", type=int, default=20)  # ExtractConfig's default (DESIGN 3)
p.add_argument("--reps", type=int, default=6)  # timed repetitions after the warm-up; +-20% noise per pass on a VM, best of 6 fits 3 min on 2 cores
args = p.parse_args()

m = machine()
device = m["device"]
dtype = torch.bfloat16 if CUDA else torch.float32  # ExtractConfig(dtype="auto")
t0 = time.perf_counter()
teacher = load_teacher(args.teacher, dtype, device)
load_s = time.perf_counter() - t0
V = teacher.model.get_output_embeddings().weight.shape[0]

work = Path(tempfile.mkdtemp(prefix="modkd-bench-"))
data = write_jsonl(work / "passages.jsonl", llava_records(passages(teacher.tokenizer, args.records, args.tokens, args.text_dir)))
encoder = Encoder(teacher.tokenizer, None, None, max_length=4096)
encoded = sorted((encoder.encode(r) for r in read_records(data)), key=lambda e: -len(e.input_ids))  # as run() orders a window
batches = [encoded[i : i + args.batch_size] for i in range(0, len(encoded), args.batch_size)]
positions = [[select_positions(e.token_kinds, "response")[0] for e in b] for b in batches]
backend = HFBackend(teacher, args.top_k)
inputs = [backend.inputs(b) for b in batches]  # built once: (a) and (b) see identical tensors
n_tokens = sum(len(e.input_ids) for e in encoded)
n_positions = sum(len(q) for ps in positions for q in ps)


@torch.no_grad()
def bare() -> None:
    for x in inputs:
        teacher.model(**x).logits  # (B, T, V) model dtype


def extractor() -> None:
    for b, ps in zip(batches, positions):
        backend.run(b, ps)  # per record: (P, k) ids, (P, k) log-probs, (P,) targets


runs = 0


def end_to_end(path: Path = data) -> None:
    global runs
    runs += 1
    run(ExtractConfig(args.teacher, path, work / f"cache-{runs}", top_k=args.top_k, batch_size=args.batch_size,
                      device=device), teacher=teacher)


def timed(fn) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


methods = {"bare": bare, "extractor": extractor, "end_to_end": end_to_end}
bare()  # warm-up: allocator, oneDNN/cuBLAS kernels
extractor()
end_to_end(write_jsonl(work / "one.jsonl", [json.loads(data.read_text().splitlines()[0])]))  # first-call imports, Parquet writer
times = {k: [] for k in methods}
for _ in range(args.reps):
    for k, fn in methods.items():
        times[k].append(timed(fn))

rows = {}
for k, v in times.items():
    per_rep = [times["bare"][i] / v[i] for i in range(args.reps)]  # throughput ratio to (a) within repetition i
    rows[k] = {"best_s": min(v), "tokens_per_s": n_tokens / min(v), "records_per_s": len(encoded) / min(v),
               "ratio_vs_bare": min(times["bare"]) / min(v), "per_rep_ratio_min": min(per_rep),
               "per_rep_ratio_max": max(per_rep), "times_s": v}
results = {"machine": m, "teacher": args.teacher, "vocab": V, "dtype": str(dtype).removeprefix("torch."),
           "records": len(encoded), "tokens": n_tokens, "stored_positions": n_positions,
           "batch_size": args.batch_size, "top_k": args.top_k, "reps": args.reps, "teacher_load_s": load_s,
           "methods": rows}

print(machine_line(m))
print(f"teacher {args.teacher} (V={V}, {results['dtype']}, loaded in {load_s:.1f} s); {len(encoded)} records, "
      f"{n_tokens} tokens, {n_positions} stored positions, batch {args.batch_size}, top-{args.top_k}, {args.reps} reps")
print(f"{'best of ' + str(args.reps):34s} {'tokens/s':>9s} {'records/s':>9s} {'vs bare':>8s} {'per-rep range':>14s}")
labels = {"bare": "(a) bare forward, full logits", "extractor": "(b) HFBackend.run (top-k)",
          "end_to_end": "(c) run(ExtractConfig) end to end"}
for k, r in rows.items():
    print(f"{labels[k]:34s} {r['tokens_per_s']:9.1f} {r['records_per_s']:9.2f} {r['ratio_vs_bare']:7.2f}x"
          f" {r['per_rep_ratio_min']:6.2f}-{r['per_rep_ratio_max']:.2f}x")
shutil.rmtree(work)
print(f"results: {save_results('extract_throughput', results)}")
