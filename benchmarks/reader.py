"""python benchmarks/reader.py [--records 2000] [--steps 60] [--batch-size 32]

How fast the cache feeds the trainer, on the toy world (real images, the trained toy teacher's top-20
over every position; `mod-pipeline toy` builds and caches both), side by side in one run:

  reader     Cache.records() over the whole cache: decoded positions per second, one process, one thread,
             for the Parquet cache and its `mod-store convert` to WebDataset (image references, and images
             embedded), best of 3 interleaved passes, with each format's bytes per position
  batches    BatchStream (reader + shuffle buffer + image open/sha256 check + image processor + collate):
             positions per second delivered as training batches, one process, one thread
  trainer    `mod-student`'s d2d stage on the toy student for --steps steps, DataLoader workers 0 and 1:
             the share of each step spent waiting for the next batch (`data_wait_share` in metrics.jsonl,
             median over the steps after the first 10)

The toy student is tiny (0.25M parameters), so its step is short and the data share is an upper bound
for real students: a 2B student's step is orders of magnitude longer for the same batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoProcessor

from common import RESULTS, machine, machine_line
from modkd.extract.run import ExtractConfig, run as extract
from modkd.pipelines.recipe import stage_config
from modkd.pipelines.toyworld.build import ToyConfig, build_toy, student_init
from modkd.pipelines.toyworld.world import read_jsonl, write_jsonl
from modkd.store import Cache, convert_cache
from modkd.student.data import BatchStream
from modkd.student.trainer import train

SKIP_STEPS = 10  # the first steps fill the shuffle buffer and warm up allocators
REPS = 3  # interleaved passes per format; the best one is reported (the VM's cores are shared)


def reader_rate(cache: Path) -> dict:
    t = time.perf_counter()
    records = positions = 0
    for rec in Cache.open(cache).records():
        records += 1
        positions += len(rec.positions)
    seconds = time.perf_counter() - t
    return {"records": records, "positions": positions, "seconds": seconds, "positions_per_s": positions / seconds}


def format_rates(caches: dict[str, Path]) -> dict:
    """Best-of-REPS reader rate and bytes per position of each format's cache, passes interleaved."""
    passes: dict[str, list[dict]] = {name: [] for name in caches}
    for _ in range(REPS):
        for name, path in caches.items():
            passes[name].append(reader_rate(path))
    out = {}
    for name, path in caches.items():
        best = max(passes[name], key=lambda r: r["positions_per_s"])
        totals = Cache.open(path).manifest["totals"]
        out[name] = {**best, "bytes": totals["bytes"], "bytes_per_position": totals["bytes"] / totals["positions"],
                     "all_positions_per_s": [r["positions_per_s"] for r in passes[name]]}
    return out


def batch_rate(cache: Path, image_root: Path, processor, batch_size: int, batches: int) -> dict:
    stream = iter(BatchStream(cache, 0, 1, batch_size, 0, processor.tokenizer.pad_token_id, image_root,
                              processor.image_processor))
    next(stream)  # the first batch fills the shuffle buffer: measured apart
    t = time.perf_counter()
    positions = sum(next(stream).flat_positions.numel() for _ in range(batches))
    seconds = time.perf_counter() - t
    return {"batches": batches, "positions": positions, "seconds": seconds, "positions_per_s": positions / seconds}


def data_wait(cache: Path, image_root: Path, student: Path, out: Path, steps: int, batch_size: int, workers: int) -> dict:
    cfg = stage_config("d2d", cache=cache, student=str(student), out=out, image_root=image_root, max_steps=steps,
                       batch_size=batch_size, grad_accum=1, lr=5e-4, log_every=1, save_every=steps,
                       num_workers=workers)
    train(cfg, log=lambda *a: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][SKIP_STEPS:]
    return {"workers": workers, "steps": len(rows), "median_data_wait_share": statistics.median(r["data_wait_share"] for r in rows),
            "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[2])
    p.add_argument("--records", type=int, default=2000, help="training records of the toy world to extract")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--teacher", help="ignored: this benchmark uses the toy teacher (accepted for run_all.py)")
    p.add_argument("--text-dir", help="ignored (accepted for run_all.py)")
    args = p.parse_args()
    torch.set_num_threads(1)
    toy = build_toy(ToyConfig())
    student = student_init(toy)
    processor = AutoProcessor.from_pretrained(student)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "train.jsonl"
        write_jsonl(data, read_jsonl(toy.world / "train.jsonl")[: args.records])
        cache = tmp / "cache"
        extract(ExtractConfig(teacher=str(toy.teacher), data=data, out=cache, image_root=toy.world, shards=4,
                              top_k=20, positions="all"))
        caches = {"parquet": cache, "webdataset": tmp / "wds", "webdataset_embedded": tmp / "wds-embedded"}
        convert_cache(cache, caches["webdataset"], "webdataset", log=lambda *a: None)
        convert_cache(cache, caches["webdataset_embedded"], "webdataset", embed_images=True, image_root=toy.world,
                      log=lambda *a: None)
        formats = format_rates(caches)
        result = {"machine": machine(), "records": args.records, "batch_size": args.batch_size,
                  "reader": formats["parquet"], "formats": formats,
                  "batches": batch_rate(cache, toy.world, processor, args.batch_size, 20),
                  "batches_embedded": batch_rate(caches["webdataset_embedded"], None, processor, args.batch_size, 20),
                  "trainer": [data_wait(cache, toy.world, student, tmp / f"run{w}", args.steps, args.batch_size, w)
                              for w in (0, 1)]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reader.json").write_text(json.dumps(result, indent=1))
    print(machine_line(result["machine"]))
    r, b = result["reader"], result["batches"]
    print(f"reader:  {r['positions_per_s']:,.0f} positions/s ({r['records']} records, {r['positions']} positions, one thread)")
    for name, f in result["formats"].items():
        print(f"  {name:20s} {f['positions_per_s']:>10,.0f} positions/s ({f['positions_per_s'] / r['positions_per_s']:.2f}x "
              f"Parquet), {f['bytes_per_position']:6.1f} bytes/position ({f['bytes'] / r['bytes']:.2f}x Parquet)")
    print(f"batches: {b['positions_per_s']:,.0f} positions/s as collated batches with images (one thread); "
          f"{result['batches_embedded']['positions_per_s']:,.0f} from the WebDataset cache with embedded images")
    for t in result["trainer"]:
        print(f"trainer: data-wait share {t['median_data_wait_share']:.2f} of the step with {t['workers']} DataLoader "
              f"worker(s) (median of {t['steps']} steps)")


if __name__ == "__main__":
    main()
