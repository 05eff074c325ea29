"""python benchmarks/run_all.py [--teacher smollm2-135m] [--text-dir ../shared/papers] [--only cache_size ...]

Runs every benchmark with its defaults, one after the other in its own process (their tables are printed
as they come), then prints every ratio in one summary from benchmarks/results/<name>.json. Each script
measures its ratios side by side within its own run; nothing here compares numbers across runs.
To add a benchmark: append its name to BENCHMARKS and a function that turns its JSON into summary lines.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, machine, machine_line


def extract_throughput(r: dict) -> list[str]:
    mm = r["methods"]
    images = f"{r['records']} records with images, " if r.get("images") else ""
    return [f"extraction throughput, {r['teacher']} (V={r['vocab']}), {images}{r['tokens']} tokens in batches of {r['batch_size']}:",
            f"  HFBackend.run top-{r['top_k']} / bare forward       {mm['extractor']['ratio_vs_bare']:.2f}x  (target >= 0.9x)",
            f"  run(ExtractConfig) end to end / bare     {mm['end_to_end']['ratio_vs_bare']:.2f}x  "
            f"({mm['end_to_end']['tokens_per_s']:.0f} tokens/s, {mm['end_to_end']['records_per_s']:.2f} records/s)",
            f"  overlapped (--encode-workers {r['encode_workers']}) / serial   {r['overlapped_vs_serial']:.2f}x  "
            f"(/ bare {mm['overlapped']['ratio_vs_bare']:.2f}x; encoding alone {r['encode_s']:.2f} s of the serial "
            f"{mm['end_to_end']['best_s']:.2f} s)"]


def extract_memory(r: dict) -> list[str]:
    lines = [f"extraction peak memory above the model, {r['teacher']} (V={r['vocab']}), extractor / naive full-vocab logits:"]
    for row in r["rows"]:
        lines.append(f"  T={row['T']:5d}  default chunk ({r['extractor_chunk']}) {row['ratio_extractor_vs_naive']:.2f}x, "
                     f"chunk={r['small_chunk']} {row['ratio_small_chunk_vs_naive']:.2f}x  "
                     f"(naive {row['naive']['peak_delta_bytes'] / 2**20:.0f} MiB)")
    return lines


def cache_size(r: dict) -> list[str]:
    anchors = ", ".join(f"{a} {x:.2f}x" for a, x in r["ratio_vs_anchors"].items())
    return [f"cache size, {r['teacher']} top-{r['top_k']}, {r['positions']} positions of English text:",
            f"  {r['bytes_per_position']:.1f} B/position zstd Parquet (raw {r['raw_bytes_per_position']:.1f}, "
            f"raw/Parquet {r['compression_ratio']:.2f}x); top-{r['top_k']} mass {r['mean_topk_mass']:.3f}, "
            f"top-{r['top_k']} entropy {r['mean_topk_entropy']:.2f} nats",
            f"  {r['webdataset']['bytes_per_position']:.1f} B/position WebDataset tar ({r['webdataset']['ratio_vs_parquet']:.2f}x "
            f"Parquet; tar framing {r['webdataset']['tar_framing_bytes_per_position']:.1f})",
            f"  ours / anchor: {anchors}"]


def fidelity(r: dict) -> list[str]:
    far, close = r["students"]["far"], r["students"]["close"]
    lines = [f"cache fidelity, {r['teacher']}, {r['positions']} positions: lm_head gradient angle to full KD, far student "
             f"(KL {far['mean_kl_nats']:.1f} nats) / close ({close['mean_kl_nats']:.1f} nats):"]
    for s in r["settings"]:
        for name, e in s["estimators"].items():
            lines.append(f"  {s['label']:13s} {name:13s} {s['bytes_per_position']:6.1f} B/position  "
                         f"{e['far']['angle_deg']:5.2f} / {e['close']['angle_deg']:5.2f} deg")
    return lines


def student_step(r: dict) -> list[str]:
    q, mm = r["ratios"], r["methods"]
    return [f"student training step, {r['student_params'] / 1e6:.1f}M student, {r['teacher_params'] / 1e6:.1f}M online teacher "
            f"({r['teacher_over_student']:.1f}x), V={r['vocab']}, batches of {r['batch_size']} x ~{r['tokens_per_batch'] / r['batch_size']:.0f} tokens:",
            f"  offline KD / SFT        time {q['offline_vs_sft_time']:.2f}x, peak memory {q['offline_vs_sft_memory']:.2f}x  (targets <= 1.10x)",
            f"  online / offline KD     time {q['online_vs_offline_time']:.2f}x  (target >= 1.8x)",
            f"  packed / padded batches time {q['packed_vs_padded_time']:.2f}x, peak memory {q['packed_vs_padded_memory']:.2f}x "
            f"(padding share {mm['offline']['padding_share']:.2f} -> {mm['packed']['padding_share']:.2f})",
            f"  offline / online KD     peak memory {q['offline_vs_online_memory']:.2f}x  (target <= 0.5x; "
            f"{mm['offline']['peak_bytes'] / 2**20:.0f} vs {mm['online']['peak_bytes'] / 2**20:.0f} MiB above the shared student)"]


def reader(r: dict) -> list[str]:
    workers = ", ".join(f"{t['median_data_wait_share']:.2f} with {t['workers']} worker(s)" for t in r["trainer"])
    return [f"reader, toy world cache ({r['reader']['records']} records, {r['reader']['positions']} positions, top-20):",
            f"  Cache.records()          {r['reader']['positions_per_s']:,.0f} positions/s (one thread)",
            *[f"    {name:22s} {f['positions_per_s']:,.0f} positions/s, {f['bytes_per_position']:.1f} B/position"
              for name, f in r["formats"].items()],
            f"  BatchStream batches      {r['batches']['positions_per_s']:,.0f} positions/s with images and collation (one thread)",
            f"  trainer data-wait share  {workers} (toy 0.25M student, batch {r['batch_size']}: an upper bound)"]


def extract_vllm(r: dict) -> list[str]:
    mm = r["methods"]
    mfu = f", MFU {mm['vllm']['mfu']:.1%}" if "mfu" in mm["vllm"] else ""
    return [f"vLLM {r['vllm_version']} vs transformers as the extraction backend, {r['teacher']} (V={r['vocab']}), "
            f"{r['tokens']} tokens, top-{r['top_k']}:",
            f"  --backend vllm / --backend hf, end to end   {mm['vllm']['ratio_vs_hf']:.2f}x  "
            f"({mm['vllm']['positions_per_s']:.0f} vs {mm['hf']['positions_per_s']:.0f} positions/s{mfu})",
            f"  --backend vllm / bare transformers forward  {mm['vllm']['ratio_vs_bare']:.2f}x  "
            f"(vLLM start-up {r['vllm_start_s']:.0f} s, paid once per worker)"]


def llava_kd_step(r: dict) -> list[str]:
    q, toy = r["ratios_vs_sft"], r["toy"]
    lines = [f"LLaVA-KD stages, toy world, batch {toy['records_per_batch']} (~{toy['image_records_per_batch']:.0f} image records), "
             f"step time / sft:",
             *[f"  {name:22s} {x:.2f}x" for name, x in q.items() if name != "sft"]]
    for s in r["relation_term"]:
        t = s["median_s"]
        lines.append(f"  relation term alone, V={s['V']} H={s['H']} {s['records']} x N_p={s['N_p']}: per-record Gram "
                     f"{t['per-record Gram'] / t['batched Gram']:.2f}x, explicit logits {t['explicit logits'] / t['batched Gram']:.2f}x "
                     f"the batched Gram")
    real = r["real_vocab"]
    lines.append(f"  whole step, V={real['V']}, {real['records_per_batch']} records x {real['image_tokens_per_record']} image "
                 f"tokens, / sft: " + ", ".join(f"{k} {x:.2f}x" for k, x in real["ratios_vs_sft"].items() if k != "sft"))
    return lines


BENCHMARKS = {"extract_throughput": extract_throughput, "extract_memory": extract_memory, "cache_size": cache_size,
              "fidelity": fidelity,
              "student_step": student_step, "llava_kd_step": llava_kd_step, "reader": reader, "extract_vllm": extract_vllm,
              "extract_throughput_images": extract_throughput}
SCRIPTS = {"extract_throughput_images": ["extract_throughput.py", "--teacher", "toy-llava"]}  # name -> script and its own args
VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"  # bash pipelines/vllm-cpu-env.sh

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[2])
    p.add_argument("--teacher", help="passed to every benchmark (default: each one's, smollm2-135m)")
    p.add_argument("--text-dir", help="passed to every benchmark (default: ../shared/papers)")
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    args = p.parse_args()
    passthrough = [*(["--teacher", args.teacher] if args.teacher else []), *(["--text-dir", args.text_dir] if args.text_dir else [])]
    here = Path(__file__).resolve().parent
    seconds, failed = {}, []
    for name in args.only:
        print(f"\n=== {name} ===", flush=True)
        (RESULTS / f"{name}.json").unlink(missing_ok=True)  # the summary must never show a previous run's numbers
        t = time.perf_counter()
        python = sys.executable
        if name == "extract_vllm" and importlib.util.find_spec("vllm") is None:  # vLLM lives in its own environment
            python = str(VLLM_PYTHON)
        script, *own = SCRIPTS.get(name, [f"{name}.py"])
        if subprocess.run([python, str(here / script), *passthrough, *own]).returncode != 0:  # own args win
            failed.append(name)
        seconds[name] = time.perf_counter() - t
    print("\n=== summary ===")
    print(machine_line(machine()))
    for name in args.only:
        path = RESULTS / f"{name}.json"
        if name in failed or not path.is_file():
            print(f"{name}: FAILED (see its output above)")
            continue
        print("\n".join(BENCHMARKS[name](json.loads(path.read_text()))) + f"  [{seconds[name]:.0f} s]")
    sys.exit(1 if failed else 0)
