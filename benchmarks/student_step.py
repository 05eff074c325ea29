"""python benchmarks/student_step.py [--records 64] [--min-tokens 32] [--tokens 256] [--batch-size 8] [--steps 10]

One student training step, four ways, side by side in one run on the same student and the same records:

  sft      TrainConfig(stage="sft", kd_weight=0, lm_weight=1): cross-entropy on the response tokens
  offline  TrainConfig(stage="d2d", kd_weight=1, lm_weight=0): KL to the cached top-20 teacher
           distribution at the response positions, read from a real cache (teacher=None)
  packed   the same offline step on packed batches (`pack=True`: each micro-batch's records in one row,
           no padding, position ids restarting per record)
  online   the same d2d config with `online_teacher` set: the trainer's comparison path, where the
           teacher (loaded by the trainer's own `_online_teacher`, fp32, eval, no grad) runs a forward
           pass on every batch and the KL is taken against its full-vocabulary log-softmax

Records have random lengths (answers of --min-tokens to --tokens tokens, uniform), as a real transfer set
has, so right-padded batches carry padding; the padding share (padded slots / all slots) is reported.

A step is the trainer's loop body without data loading and logging: `accumulate_gradients` (one
micro-batch, grad_accum=1), `accelerator.clip_grad_norm_`, the loss `.item()` the trainer checks,
`optimizer.step()` (AdamW over the trainable parameters, as the trainer builds it) and
`zero_grad(set_to_none=True)`. The batches are the first warmup + steps batches of
`BatchStream(cache, 0, 1, batch_size, seed, ...)`, collated before anything is measured (the three
methods read the same cache and get identical batches).

Models. Random-weight LLaVA models (toy CLIP vision tower `models.VISION`, 2-layer projector, Qwen2 LLM)
with a real vocabulary, so the lm_head and KL cost is realistic: the tokenizer of --teacher
(SmolLM2's, V = 49152, read from its GGUF) plus `<image>`, a pad token and the toy ChatML template, in
a LlavaProcessor built as `models.processor` builds it. Student LLM: hidden 256, 4 layers, 4 heads,
2 KV heads, FFN 768; teacher LLM: hidden 512, 8 layers, 8 heads, 4 KV heads, FFN 1536; both with tied
embeddings. Parameter counts (all parameters, vision tower included, tied weights once) are printed and
the run refuses a teacher smaller than 2.5x the student. Both are saved with save_pretrained and loaded
back by the real code (load_teacher for extraction, build_student / _online_teacher for training).
The teacher's cache comes from `modkd.extract.run.run(ExtractConfig(..., top_k=20, positions="response"))`.
Data: --records LLaVA records whose answer is a --tokens-token passage of the papers' text
(llava-mod.txt, llava-kd.txt); text-only, no images (pixel_values is None; the vision tower only
costs its parameters). Random weights make the teacher's distribution nearly flat, which changes no cost.

Time. Each method runs --warmup steps, then --steps timed steps (device synchronised around each);
the reported time is the median step, which one load spike on a shared machine cannot move. All
step times are in the JSON. The methods run one after the other, each in its own process.

Peak memory. Each method runs in a fresh process, forked from a forkserver that has only imported
torch/transformers/accelerate/modkd (as benchmarks/extract_memory.py does), with
MALLOC_MMAP_THRESHOLD_=1 MiB so resident memory follows live tensors. The process loads the student,
builds the optimizer, collates the batches and touches every weight (safetensors maps them lazily),
then reads its resident memory: the BASELINE, everything the three methods share. Then the method's
own state: for online, the teacher is loaded here, so its weights count (it stays resident while
training: that is the cost offline KD removes). Warm-up steps follow (they create AdamW's state, the
same for every method, and the one-time allocations), then the kernel's peak-RSS counter is reset
(`echo 5 > /proc/self/clear_refs`) and the timed steps run; the peak is VmHWM from /proc/self/status.
Three numbers per method (MiB):

  peak      peak during the timed steps - BASELINE: the method's memory on top of the shared student
            (teacher weights, AdamW state, gradients, activations, logits). The targets use this one.
  process   peak - resident memory right after the imports, before the student was loaded: the whole
            training process (student weights included), for reference
  step      peak - resident memory just before the timed steps: what one step allocates and frees
            (teacher weights and AdamW state excluded)

On CUDA the same points are read with `torch.cuda.memory_allocated()` and
`reset_peak_memory_stats()` / `max_memory_allocated()`, and the trainer's mixed precision (bf16 where
supported) is used, as `train()` does. If /proc/self/clear_refs is not writable the JSON says so
("reset": false) and CPU peaks include the loads.

Targets (issue): offline <= 1.10x SFT in time and peak memory; online >= 1.8x offline's time;
offline <= 0.5x online's peak memory.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # extraction's progress bar; inherited by the forkserver
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))  # see extract_memory.py: RSS follows live tensors

import torch

from common import (TEXT_DIR, llava_records, machine, machine_line, passages, peak, reset_peak, resident,
                    save_results, sync, write_jsonl)

p = argparse.ArgumentParser(description=__doc__.split("\n")[2])
p.add_argument("--teacher", default="smollm2-135m", help="preset or local HF directory whose TOKENIZER the random models use")
p.add_argument("--text-dir", type=Path, default=TEXT_DIR)
p.add_argument("--records", type=int, default=64)  # the cache; the steps read (warmup + steps) * batch-size records, cycling
p.add_argument("--tokens", type=int, default=256)  # longest passage in tokens; + ~15 chat-template tokens per record
p.add_argument("--min-tokens", type=int, default=32)  # shortest passage: lengths are uniform in [min, tokens]
p.add_argument("--batch-size", type=int, default=8)  # TrainConfig's default
p.add_argument("--steps", type=int, default=10)  # timed steps per method
p.add_argument("--warmup", type=int, default=2)  # untimed steps per method before the peak counter is reset
p.add_argument("--top-k", type=int, default=20)  # ExtractConfig's default (DESIGN 3)
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()

CUDA = torch.cuda.is_available()
MiB = 2**20
STUDENT_LLM = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=768)
TEACHER_LLM = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1536)
MIN_TEACHER_RATIO = 2.5
METHODS = {  # name: (stage, kd_weight, lm_weight, online teacher, packed batches)
    "sft": ("sft", 0.0, 1.0, False, False),
    "offline": ("d2d", 1.0, 0.0, False, False),
    "packed": ("d2d", 1.0, 0.0, False, True),
    "online": ("d2d", 1.0, 0.0, True, False),
}
PRELOAD = ["torch", "transformers", "accelerate", "modkd.student.trainer", "transformers.models.llava.modeling_llava",
           "transformers.models.qwen2.modeling_qwen2", "transformers.models.clip.modeling_clip"]


@torch.no_grad()
def touch(model: torch.nn.Module) -> None:
    """Reads every weight, so lazily mapped safetensors pages are resident before a baseline is taken."""
    for t in model.state_dict().values():
        t.float().sum()


def measure(conn, method: str, student_dir: str, teacher_dir: str, cache_dir: str, out_dir: str) -> None:
    """Runs in a fresh process: sends step times and peak memory of one method on the shared batches."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from modkd.store import Cache
    from modkd.student.checks import check_student_matches_cache
    from modkd.student.config import TrainConfig
    from modkd.student.data import BatchStream
    from modkd.student.trainer import StudentWithLoss, _online_teacher, _precision, accumulate_gradients, build_student

    after_imports = resident()
    stage, kd_weight, lm_weight, online, pack = METHODS[method]
    cfg = TrainConfig(stage=stage, cache=cache_dir, student=student_dir, out=out_dir, batch_size=args.batch_size,
                      seed=args.seed, kd_weight=kd_weight, lm_weight=lm_weight,
                      online_teacher=teacher_dir if online else None, pack=pack)
    accelerator = Accelerator(cpu=not CUDA, mixed_precision=_precision(cfg.mixed_precision))
    set_seed(cfg.seed)
    model, processor, _ = build_student(cfg, log=lambda *a, **k: None)
    check_student_matches_cache(Cache.open(cfg.cache), model, processor, cfg.student, cfg.kd_positions)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    wrapped, optimizer = accelerator.prepare(StudentWithLoss(model, distil=bool(cfg.kd_weight), tail=cfg.tail),
                                             optimizer)
    stream = iter(BatchStream(cfg.cache, 0, 1, cfg.batch_size, cfg.seed, processor.tokenizer.pad_token_id,
                              None, processor.image_processor, pack=cfg.pack))
    batches = [next(stream).to(accelerator.device) for _ in range(args.warmup + args.steps)]
    touch(model)
    gc.collect()
    baseline = resident()  # student, optimizer (no state yet), batches: shared by all three methods

    teacher = _online_teacher(cfg, accelerator) if online else None  # method-specific: counts toward the peak
    if teacher is not None:
        touch(teacher)

    def step(b) -> float:
        sums, n_kd, n_lm = accumulate_gradients(cfg, accelerator, wrapped, [b], teacher)
        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        loss = cfg.kd_weight * sums[0].item() / n_kd + cfg.lm_weight * sums[1].item() / n_lm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    losses = [step(b) for b in batches[: args.warmup]]  # AdamW state, allocator, oneDNN / cuBLAS kernels
    gc.collect()
    reset = reset_peak()
    before_steps = resident()
    times = []
    for b in batches[args.warmup :]:
        sync(str(accelerator.device))
        t = time.perf_counter()
        losses.append(step(b))
        sync(str(accelerator.device))
        times.append(time.perf_counter() - t)
    top = peak()
    if not all(map(lambda x: x == x and abs(x) != float("inf"), losses)):
        raise RuntimeError(f"{method}: non-finite loss {losses}")
    timed = batches[args.warmup :]
    conn.send({
        "times_s": times, "median_s": statistics.median(times), "mean_s": statistics.fmean(times),
        "losses": losses, "reset": reset,
        "peak_bytes": top - baseline, "process_peak_bytes": top - after_imports, "step_peak_bytes": top - before_steps,
        "baseline_bytes": baseline, "after_imports_bytes": after_imports, "before_steps_bytes": before_steps,
        "ru_maxrss_bytes": None if CUDA else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "tokens_per_step": [int(b.attention_mask.sum()) for b in timed],
        "padded_tokens_per_step": [b.input_ids.numel() for b in timed],
        "distilled_positions_per_step": [int(b.kind_mask(cfg.kd_positions).sum()) for b in timed],
        "trained_params": sum(q.numel() for q in params),
        "precision": {"no": "fp32"}.get(str(accelerator.mixed_precision), str(accelerator.mixed_precision)),
    })


def real_vocab_processor(name: str):
    """The tokenizer of `name` (a GGUF preset or a directory) made LLaVA-ready, in a toy LlavaProcessor."""
    from transformers import AutoTokenizer

    from modkd.extract.teacher import resolve
    from modkd.pipelines.toyworld import models

    directory, gguf = resolve(name)
    tok = AutoTokenizer.from_pretrained(directory, **({"gguf_file": gguf} if gguf else {}))
    tok.add_tokens(["<image>"], special_tokens=True)
    if "<|endoftext|>" in tok.get_vocab():
        tok.pad_token = "<|endoftext|>"  # as the toy tokenizer: not the end-of-turn token
    elif tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.chat_template = models.CHAT_TEMPLATE
    return tok, models.processor(tok)


def build(out: Path, tok, proc, llm: dict, seed: int) -> int:
    """A random-weight LLaVA model like models.build_model, with room for long records; returns its parameter count."""
    from transformers import LlavaForConditionalGeneration

    from modkd.pipelines.toyworld import models

    config = models.llava_config(tok, llm)
    config.text_config.max_position_embeddings = 4096  # the toy's 256 is shorter than these records
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return sum(q.numel() for q in model.parameters())  # tied embeddings counted once


def main() -> None:
    from modkd.extract.run import ExtractConfig, run

    m = machine()
    work = Path(tempfile.mkdtemp(prefix="modkd-bench-"))
    t0 = time.perf_counter()
    try:
        tok, proc = real_vocab_processor(args.teacher)
        V = len(tok)
        student_params = build(work / "student", tok, proc, STUDENT_LLM, args.seed)
        teacher_params = build(work / "teacher", tok, proc, TEACHER_LLM, args.seed + 1)
        ratio = teacher_params / student_params
        print(f"student {student_params:,} parameters, teacher {teacher_params:,} ({ratio:.2f}x), V={V}", flush=True)
        if ratio < MIN_TEACHER_RATIO:
            raise SystemExit(f"teacher is only {ratio:.2f}x the student; the issue asks for >= {MIN_TEACHER_RATIO}x")
        lengths = torch.randint(args.min_tokens, args.tokens + 1, (args.records,),
                                generator=torch.Generator().manual_seed(args.seed)).tolist()
        data = write_jsonl(work / "passages.jsonl", llava_records(passages(tok, args.records, lengths, args.text_dir)))
        t = time.perf_counter()
        summary = run(ExtractConfig(teacher=str(work / "teacher"), data=data, out=work / "cache", top_k=args.top_k,
                                    positions="response"))
        extract_s = time.perf_counter() - t
        manifest = summary["manifest"]
        print(f"cache: {manifest['totals']['records_written']} of {args.records} records, "
              f"{manifest['totals']['positions']} positions, extracted in {extract_s:.1f} s", flush=True)

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        rows = {}
        for name in METHODS:
            receive, send = ctx.Pipe(duplex=False)
            proc_ = ctx.Process(target=measure, args=(send, name, str(work / "student"), str(work / "teacher"),
                                                      str(work / "cache"), str(work / f"out-{name}")))
            proc_.start()
            send.close()
            try:
                rows[name] = receive.recv()
            except EOFError:
                proc_.join()
                raise SystemExit(f"{name} failed (exit code {proc_.exitcode}); its traceback is above") from None
            proc_.join()
            print(f"  {name}: median step {rows[name]['median_s']:.3f} s, peak {rows[name]['peak_bytes'] / MiB:.0f} MiB",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    sft, off, packed, on = rows["sft"], rows["offline"], rows["packed"], rows["online"]
    for r in rows.values():
        r["padding_share"] = 1 - sum(r["tokens_per_step"]) / sum(r["padded_tokens_per_step"])
        r["tokens_per_s"] = statistics.fmean(r["tokens_per_step"]) / r["median_s"]
    ratios = {"offline_vs_sft_time": off["median_s"] / sft["median_s"],
              "packed_vs_padded_time": packed["median_s"] / off["median_s"],
              "packed_vs_padded_memory": packed["peak_bytes"] / off["peak_bytes"],
              "offline_vs_sft_memory": off["peak_bytes"] / sft["peak_bytes"],
              "online_vs_offline_time": on["median_s"] / off["median_s"],
              "offline_vs_online_memory": off["peak_bytes"] / on["peak_bytes"],
              "offline_vs_online_process_memory": off["process_peak_bytes"] / on["process_peak_bytes"]}
    targets = {"offline_vs_sft_time": ("<=", 1.10), "offline_vs_sft_memory": ("<=", 1.10),
               "online_vs_offline_time": (">=", 1.8), "offline_vs_online_memory": ("<=", 0.5)}
    met = {k: (ratios[k] <= x if op == "<=" else ratios[k] >= x) for k, (op, x) in targets.items()}
    tokens = sft["tokens_per_step"]
    results = {"machine": m, "tokenizer": args.teacher, "vocab": V, "precision": sft["precision"],
               "student_llm": STUDENT_LLM, "teacher_llm": TEACHER_LLM, "student_params": student_params,
               "teacher_params": teacher_params, "teacher_over_student": ratio,
               "trained_params": sft["trained_params"], "records": args.records, "tokens": args.tokens, "min_tokens": args.min_tokens,
               "batch_size": args.batch_size, "warmup": args.warmup, "steps": args.steps, "top_k": args.top_k,
               "tokens_per_batch": statistics.fmean(tokens),
               "distilled_positions_per_batch": statistics.fmean(sft["distilled_positions_per_step"]),
               "cache_records": manifest["totals"]["records_written"], "cache_positions": manifest["totals"]["positions"],
               "extract_s": extract_s,
               "measure": "cuda memory_allocated / max_memory_allocated" if CUDA
               else "VmHWM after clear_refs over the timed steps, minus VmRSS at the baseline",
               "methods": rows, "ratios": ratios,
               "targets": {k: f"{op} {x}" for k, (op, x) in targets.items()}, "met": met}

    print(machine_line(m))
    print(f"student {student_params / 1e6:.1f}M parameters ({sft['trained_params'] / 1e6:.1f}M trained), teacher "
          f"{teacher_params / 1e6:.1f}M ({ratio:.2f}x), V={V}, {results['precision']}; {args.steps} timed steps of "
          f"{args.batch_size} records (~{results['tokens_per_batch']:.0f} tokens, "
          f"~{results['distilled_positions_per_batch']:.0f} distilled positions) after {args.warmup} warm-up")
    print(f"{'method':8s} {'median s':>9s} {'mean s':>8s} {'peak MiB':>9s} {'process MiB':>12s} {'step MiB':>9s} "
          f"{'tokens/s':>9s} {'padding':>8s}")
    for name, r in rows.items():
        print(f"{name:8s} {r['median_s']:9.3f} {r['mean_s']:8.3f} {r['peak_bytes'] / MiB:9.0f} "
              f"{r['process_peak_bytes'] / MiB:12.0f} {r['step_peak_bytes'] / MiB:9.0f} {r['tokens_per_s']:9.0f} "
              f"{r['padding_share']:8.2f}")
    print(f"  {'packed / padded offline, time':32s} {ratios['packed_vs_padded_time']:6.2f}x, peak memory "
          f"{ratios['packed_vs_padded_memory']:.2f}x")
    labels = {"offline_vs_sft_time": "offline / sft, step time", "offline_vs_sft_memory": "offline / sft, peak memory",
              "online_vs_offline_time": "online / offline, step time", "offline_vs_online_memory": "offline / online, peak memory"}
    for k, label in labels.items():
        op, x = targets[k]
        print(f"  {label:32s} {ratios[k]:6.2f}x  (target {op} {x}x: {'met' if met[k] else 'MISSED'})")
    print(f"  {'offline / online, process peak':32s} {ratios['offline_vs_online_process_memory']:6.2f}x  (student weights included)")
    if not all(r["reset"] for r in rows.values()):
        print("warning: /proc/self/clear_refs was not writable; peaks include the loads")
    results["seconds"] = time.perf_counter() - t0
    print(f"results: {save_results('student_step', results)}")


if __name__ == "__main__":
    main()
