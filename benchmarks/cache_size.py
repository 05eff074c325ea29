"""python benchmarks/cache_size.py [--teacher smollm2-135m] [--records 16] [--tokens 256] [--top-k 20]

Bytes per stored position of a real cache: a real `mod-extract` run (the installed CLI, in a
subprocess) of the teacher over passages of the papers' text (llava-mod.txt, llava-kd.txt) as LLaVA
records whose answer is the passage, into a temporary directory; then `Cache.stats()` for the Parquet
(zstd) bytes per position, the mean top-k mass and the mean top-k entropy, and the Parquet footer for
the compressed bytes of each column.

"raw" is the decoded record as plain little-endian arrays, no packing, no compression, no container
(what schema 1 stored before zstd): per position topk_ids k*4 + topk_logprobs k*4 + target_logprob 4 +
position 4 + kind 1 = 8k + 9 bytes, plus the record's input_ids (4 bytes per token) spread over its
positions. The ratio raw / Parquet is what bit-packing, quantisation (store/encoding.py), zstd and
Parquet's encodings buy together. Anchors (DESIGN 3): DistillKit 127-344 B/position, Megatron offline KD
~528 B/position before zstd, RS-KD reimplementation ~37 B/position (sampled ids + counts).

The same cache is then converted to the WebDataset format (`mod-store convert`, same records and units)
and measured the same way: the tar's bytes per position, split into member payload (zstd .npy arrays,
the .json) and tar framing (a 512-byte header per member, data padded to 512 bytes, end blocks).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
from transformers import AutoTokenizer

from common import TEXT_DIR, llava_records, machine, machine_line, passages, save_results, write_jsonl
from modkd.extract.teacher import resolve
from modkd.store import Cache, convert_cache, shard_paths

ANCHORS = {"DistillKit (low)": 127, "DistillKit (high)": 344, "Megatron, before zstd": 528, "RS-KD": 37}
DIST_COLUMNS = ("positions", "position_kinds", "num_ids", "ids", "values", "top_logprobs", "tail_mass", "target_logprobs")
WHAT_IF = {  # the same rows re-encoded in memory with other pyarrow writer options (the store's: store/writer.py)
    "pyarrow's defaults (dictionary everywhere, plain floats)": dict(),
    "no dictionary encoding": dict(use_dictionary=False),
}

p = argparse.ArgumentParser(description=__doc__.split("\n")[2])
p.add_argument("--teacher", default="smollm2-135m", help="preset or local HF directory")
p.add_argument("--text-dir", type=Path, default=TEXT_DIR)
p.add_argument("--records", type=int, default=16)  # 16 x ~257 response positions: ~4k positions, ~1 min on 2 cores
p.add_argument("--tokens", type=int, default=256)  # passage length in teacher tokens
p.add_argument("--top-k", type=int, default=20)  # ExtractConfig's default (DESIGN 3)
args = p.parse_args()

m = machine()
work = Path(tempfile.mkdtemp(prefix="modkd-bench-"))
directory, gguf = resolve(args.teacher)
tokenizer = AutoTokenizer.from_pretrained(directory, **({"gguf_file": gguf} if gguf else {}))
data = write_jsonl(work / "passages.jsonl", llava_records(passages(tokenizer, args.records, args.tokens, args.text_dir)))
cli = Path(sys.executable).with_name("mod-extract")
cmd = [str(cli)] if cli.is_file() else [sys.executable, "-c", "from modkd.pipelines.cli_extract import main; main()"]
cmd += ["--teacher", args.teacher, "--data", str(data), "--out", str(work / "cache"), "--top-k", str(args.top_k)]
t0 = time.perf_counter()
out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
extract_s = time.perf_counter() - t0
if out.returncode != 0:
    sys.exit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")

cache = Cache.open(work / "cache")
total = cache.stats()[-1]  # the row named "total"
k = cache.top_k
tokens = sum(len(rec.input_ids) for rec in cache.records(columns=["input_ids"]))  # all input tokens, stored once per record
P = total["positions"]
raw = P * (8 * k + 9) + 4 * tokens  # bytes as plain arrays
columns: dict[str, int] = {}
files = [shard_paths(cache.path, s, cache.manifest["num_shards"])[0] for s in range(cache.manifest["num_shards"])]
for f in files:
    meta = pq.ParquetFile(f).metadata
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(g).column(c)
            name = col.path_in_schema.split(".")[0]
            columns[name] = columns.get(name, 0) + col.total_compressed_size
dist_bytes = sum(columns[c] for c in DIST_COLUMNS)
table = pa.concat_tables(pq.read_table(f) for f in files)
what_if = {}
for label, options in WHAT_IF.items():
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=256, **options)  # 256: mod-extract default
    what_if[label] = buf.tell() / P
wds_dir = work / "cache-wds"
convert_cache(cache.path, wds_dir, "webdataset", log=lambda *a: None)
wds = Cache.open(wds_dir)
payload: dict[str, int] = {}  # member field -> compressed bytes
for s in range(wds.manifest["num_shards"]):
    with tarfile.open(shard_paths(wds_dir, s, wds.manifest["num_shards"], fmt="webdataset")[0]) as tar:
        for member in tar:
            field = member.name.partition(".")[2]
            payload[field] = payload.get(field, 0) + member.size
wds_bytes = wds.manifest["totals"]["bytes"]
webdataset = {"bytes": wds_bytes, "bytes_per_position": wds_bytes / P, "ratio_vs_parquet": wds_bytes / total["bytes"],
              "payload_bytes_per_position": {f: b / P for f, b in payload.items()},
              "tar_framing_bytes_per_position": (wds_bytes - sum(payload.values())) / P}
results = {
    "machine": m, "webdataset": webdataset, "teacher": args.teacher, "top_k": k, "records": total["records"], "positions": P,
    "input_tokens": tokens, "parquet_bytes": total["bytes"], "bytes_per_position": total["bytes_per_position"],
    "distribution_bytes_per_position": dist_bytes / P, "raw_bytes_per_position": raw / P,
    "compression_ratio": raw / total["bytes"], "mean_topk_mass": total["mean_topk_mass"],
    "mean_topk_entropy": total["mean_topk_entropy"], "column_bytes_per_position": {c: b / P for c, b in columns.items()},
    "what_if_bytes_per_position": what_if, "anchors_bytes_per_position": ANCHORS, "extract_seconds": extract_s,
    "ratio_vs_anchors": {a: total["bytes_per_position"] / b for a, b in ANCHORS.items()},
    "raw_ratio_vs_anchors": {a: raw / P / b for a, b in ANCHORS.items()},
}

print(machine_line(m))
print(f"teacher {args.teacher}, top-{k}, {total['records']} records, {tokens} input tokens, {P} stored positions "
      f"(mod-extract took {extract_s:.0f} s)")
print(f"  Parquet (zstd), whole file      {results['bytes_per_position']:7.1f} B/position  ({total['bytes']} bytes)")
print(f"  ... distribution columns only   {results['distribution_bytes_per_position']:7.1f} B/position  "
      f"(positions, kinds, packed ids + log-prob codes, top-1 log-prob, tail mass, target log-prob)")
print(f"  raw arrays, uncompressed        {results['raw_bytes_per_position']:7.1f} B/position  "
      f"({8 * k + 9} + 4 * {tokens / P:.2f} input tokens/position); raw / Parquet = {results['compression_ratio']:.2f}x")
print(f"  mean top-{k} mass {total['mean_topk_mass']:.3f}, mean top-{k} entropy {total['mean_topk_entropy']:.3f} nats")
print("  per column, B/position: " + ", ".join(f"{c} {b / P:.1f}" for c, b in columns.items()))
print(f"  WebDataset (tar, zstd .npy)    {webdataset['bytes_per_position']:7.1f} B/position  ({wds_bytes} bytes, "
      f"{webdataset['ratio_vs_parquet']:.2f}x Parquet): member payload "
      f"{sum(payload.values()) / P:.1f} + tar framing {webdataset['tar_framing_bytes_per_position']:.1f}")
print("  WebDataset payload per member, B/position: "
      + ", ".join(f"{f} {b:.1f}" for f, b in webdataset["payload_bytes_per_position"].items()))
for label, b in what_if.items():
    print(f"  what-if, {label}: {b:.1f} B/position ({b / results['bytes_per_position']:.2f}x)")
print(f"  {'anchor (DESIGN 3)':24s} {'B/position':>10s} {'Parquet/anchor':>15s} {'raw/anchor':>11s}")
for a, b in ANCHORS.items():
    print(f"  {a:24s} {b:10d} {results['ratio_vs_anchors'][a]:14.2f}x {results['raw_ratio_vs_anchors'][a]:10.2f}x")
shutil.rmtree(work)
print(f"results: {save_results('cache_size', results)}")
