"""python benchmarks/extract_memory.py [--teacher smollm2-135m] [--lengths 512 1024 2048] [--small-chunk 128]

Peak memory of one sequence of T tokens of real text against T, in one run, for:

  naive       `model(**inputs).logits` (1, T, V) + `log_softmax(logits.float())` (1, T, V) fp32: what
              online KD or a naive extractor materialises before taking its top-k
  extractor   HFBackend.run with its default chunk (topk.CHUNK_BYTES = 256 MiB of fp32 logits,
              i.e. 1365 positions at V=49152, 441 at V=152k)
  chunk=C     HFBackend.run with --small-chunk C positions per chunk
  base        `model.model(**inputs).last_hidden_state` alone: the floor every method pays (activations,
              attention, the KV cache transformers builds by default), no lm_head

naive grows as 2*T*V*4 bytes on top of base; the extractor's lm_head part stops growing once the
response positions P exceed its chunk, so it stays within 2*chunk*V*4 bytes of base.

How it is measured. Each (T, method) runs in a fresh process, forked from a forkserver that has only
imported torch/transformers/modkd (saves ~6 s of imports per configuration; nothing loaded, no threads
started), so one configuration's allocator state never leaks into the next. On CPU the process loads
the teacher, runs a full forward and then the method on a short prefix (pages in every weight, since
safetensors loads by mmap and a first touch would otherwise count as growth; one-time allocations:
thread pools, oneDNN primitives; kept small because freed heap stays resident and would be reused
unseen), resets the kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`),
reads its RSS (VmRSS), runs the method once, and reports peak RSS minus that RSS: the extra resident
memory the method needed. The processes run with MALLOC_MMAP_THRESHOLD_=1 MiB so that glibc maps and
unmaps every tensor >= 1 MiB: resident memory then follows live tensors, not glibc's heap retention. The peak is read as VmHWM from /proc/self/status, which is what
getrusage(RUSAGE_SELF).ru_maxrss reports for a single-threaded process; with torch's threads ru_maxrss
also folds in the high-water mark the kernel saves when any thread exits (signal->maxrss, e.g. a loader
thread during the model load), which clear_refs cannot reset, so ru_maxrss can stay stuck at the load's
transient peak (seen here: 1.5 GiB for every configuration). ru_maxrss is recorded in the JSON for
reference. If /proc/self/clear_refs is not writable the result says so ("reset": false) and the peaks
include the load. On CUDA it reports `torch.cuda.max_memory_allocated() - memory_allocated()` after
`reset_peak_memory_stats()`. The GGUF preset takes ~30 s to load, so the parent dequantises it once
into a temporary HF directory that each configuration loads in ~1 s (same fp32 weights).
"""

from __future__ import annotations

import argparse
import copy
import gc
import multiprocessing
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # load progress bars, inherited by the forkserver
# glibc: every allocation >= 1 MiB is its own mmap, unmapped on free, so RSS follows live tensors instead
# of what glibc's heap happens to retain (its adaptive threshold moved peaks by +-300 MiB between runs)
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))

import torch

from common import TEXT_DIR, llava_records, machine, machine_line, passages, peak, reset_peak, resident, save_results, write_jsonl

p = argparse.ArgumentParser(description=__doc__.split("\n")[2])
p.add_argument("--teacher", default="smollm2-135m", help="preset or local HF directory")
p.add_argument("--text-dir", type=Path, default=TEXT_DIR)
p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])  # 2048 > the default chunk at V=49152; 12 configurations fit 3 min
p.add_argument("--small-chunk", type=int, default=128)  # 128 positions: 2 x 24 MiB of fp32 logits at V=49152
args = p.parse_args()
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32  # ExtractConfig(dtype="auto")
MiB = 2**20
PRELOAD = ["torch", "transformers", "modkd.extract.teacher", "modkd.extract.hf_backend", "modkd.extract.encode",
           "transformers.models.llama.modeling_llama"]  # the last one: smollm2's architecture; a miss only costs time


def measure(conn, teacher_dir: str, data: Path, method: str, chunk: int) -> None:
    """Runs in a fresh process: sends the peak memory of one method on the one record in `data`."""
    from modkd.extract.encode import Encoder, select_positions
    from modkd.extract.hf_backend import HFBackend
    from modkd.extract.records import read_records
    from modkd.extract.teacher import load_teacher

    teacher = load_teacher(teacher_dir, DTYPE, DEVICE)
    enc = Encoder(teacher.tokenizer, None, None, max_length=1 << 20).encode(read_records(data)[0])
    pos = select_positions(enc.token_kinds, "response")[0]  # (P,) int32
    backend = HFBackend(teacher, 20, chunk=chunk or None)

    @torch.no_grad()
    def run(e, q):
        if method == "naive":
            logits = teacher.model(**backend.inputs([e])).logits  # (1, T, V) model dtype
            logp = torch.log_softmax(logits.float(), dim=-1)  # (1, T, V) fp32
            top = logp.topk(20, dim=-1)  # (1, T, 20): no (P, V) copy of the selected rows
            return top.values[0, torch.as_tensor(q, dtype=torch.long, device=logp.device)]  # (P, 20)
        if method == "base":
            return teacher.model.model(**backend.inputs([e])).last_hidden_state  # (1, T, H)
        return backend.run([e], [q])  # per record: (P, k) ids, (P, k) log-probs, (P,) targets

    n = int(pos[0]) + 4  # warm-up prefix: the prompt + 4 response positions; small, so little freed heap stays resident
    short = copy.copy(enc)
    short.input_ids, short.token_kinds = enc.input_ids[:n], enc.token_kinds[:n]
    with torch.no_grad():
        teacher.model(**backend.inputs([short]))  # every method: pages in all weights, lm_head included
    run(short, pos[pos < n - 1])  # the method's own one-time allocations
    gc.collect()
    reset = reset_peak()
    base = resident()
    t = time.perf_counter()
    run(enc, pos)
    if CUDA:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    top = peak()
    conn.send({"T": len(enc.input_ids), "V": backend.lm_head.weight.shape[0], "P": len(pos), "chunk": backend.chunk,
               "base_bytes": base, "peak_delta_bytes": top - base, "reset": reset, "seconds": seconds,
               "ru_maxrss_bytes": None if CUDA else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})


def hf_copy(name: str, out: Path) -> str:
    """A local HF directory for `name`: itself if it is one, else the loaded (dequantised) weights saved."""
    if Path(name).is_dir():
        return name
    from transformers import AutoModelForCausalLM

    from modkd.extract.teacher import load_teacher

    teacher = load_teacher(name, torch.float32, "cpu")
    config = copy.deepcopy(teacher.model.config)
    if hasattr(config, "quantization_config"):  # a GGUF load marks the model quantized, which refuses save_pretrained
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(teacher.model.state_dict())
    model.save_pretrained(out)
    teacher.tokenizer.save_pretrained(out)
    return str(out)


def main() -> None:
    from transformers import AutoTokenizer

    from modkd.extract.encode import Encoder
    from modkd.extract.records import read_records

    m = machine()
    work = Path(tempfile.mkdtemp(prefix="modkd-bench-"))
    t0 = time.perf_counter()
    teacher_dir = hf_copy(args.teacher, work / "teacher")
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    probe = passages(tokenizer, 1, 64, args.text_dir)[0]
    encoded = Encoder(tokenizer, None, None, 1 << 20).encode(read_records(write_jsonl(work / "probe.jsonl", llava_records([probe])))[0])
    template = len(encoded.input_ids) - len(tokenizer(probe, add_special_tokens=False)["input_ids"])  # chat-template tokens per record
    small = f"chunk={args.small_chunk}"
    methods = {"naive": ("naive", 0), "extractor": ("extractor", 0), small: ("extractor", args.small_chunk), "base": ("base", 0)}
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    rows = []
    for T in args.lengths:
        data = write_jsonl(work / f"T{T}.jsonl", llava_records(passages(tokenizer, 1, T - template, args.text_dir)))
        row = {"T_target": T}
        for label, (method, chunk) in methods.items():
            receive, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=measure, args=(send, teacher_dir, data, method, chunk))  # fresh per configuration
            proc.start()
            send.close()
            try:
                row[label] = receive.recv()
            except EOFError:
                proc.join()
                raise SystemExit(f"{label} at T={T} failed (exit code {proc.exitcode}); its traceback is above") from None
            proc.join()
        row["T"], row["P"] = row["naive"]["T"], row["naive"]["P"]
        rows.append(row)
    V = rows[0]["naive"]["V"]
    results = {"machine": m, "teacher": args.teacher, "vocab": V, "dtype": str(DTYPE).removeprefix("torch."),
               "measure": "cuda max_memory_allocated" if CUDA else "VmHWM after clear_refs, minus VmRSS after load",
               "extractor_chunk": rows[0]["extractor"]["chunk"], "small_chunk": args.small_chunk, "rows": rows}

    print(machine_line(m))
    print(f"teacher {args.teacher} (V={V}), {results['dtype']}; peak memory above the loaded model, MiB "
          f"({results['measure']}); extractor default chunk = {results['extractor_chunk']} positions")
    print(f"{'T':>5s} {'P':>5s} {'naive':>7s} {'extractor':>9s} {small:>9s} {'base':>6s} {'2TV*4B':>7s}"
          f" {'extractor/naive':>15s} {small + '/naive':>15s}")
    for r in rows:
        naive, ext, sm, base = (r[k]["peak_delta_bytes"] / MiB for k in methods)
        r["ratio_extractor_vs_naive"], r["ratio_small_chunk_vs_naive"] = ext / naive, sm / naive
        print(f"{r['T']:5d} {r['P']:5d} {naive:7.0f} {ext:9.0f} {sm:9.0f} {base:6.0f} {2 * r['T'] * V * 4 / MiB:7.0f}"
              f" {ext / naive:14.2f}x {sm / naive:14.2f}x")
    if not all(r[k]["reset"] for r in rows for k in methods):
        print("warning: /proc/self/clear_refs was not writable; peaks include the model load's transient")
    results["seconds"] = time.perf_counter() - t0
    shutil.rmtree(work)
    print(f"results: {save_results('extract_memory', results)}")


if __name__ == "__main__":
    main()
