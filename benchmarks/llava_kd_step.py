"""python benchmarks/llava_kd_step.py [--steps 20] [--warmup 3] [--cache DIR] [--repeats 3]

LLaVA-KD's stages against SFT, one training step each, side by side in one run, and RDist's R_s before and
after it was batched (issue 17: "dft is several times slower per step than sft").

Part 1, the toy world (the cache every toy pipeline trains from: top-20 at every position, relation matrices
`--relation logits`; built under $MODKD_HOME and --cache if absent). The student init of `mod-pipeline
llava-kd`, the toy's batch 32, fp32. Arms: sft, dpt and dft with the trainer's R_s (all records in one call,
zero-padded, one lm_head Gram per batch), and dpt and dft with the per-record loop it replaced (`per_record`
below: one Python iteration, and one (H, H) Gram W^T W, per image record). Every arm has its own student and
AdamW; the arms take turns, step by step, on the same pre-collated batches, so a load change on a shared
machine hits every arm alike. A step is the trainer's loop body without data loading: accumulate_gradients,
clip_grad_norm_, AdamW step, zero_grad. Reported: median step time and its ratio to sft.

Part 2, the relation term alone (forward + backward of sum_r 1 - cos(R_s, R_t) on random rows), at the toy's
size and at a real vocabulary (V = 49152, SmolLM2's; H = 256, 8 records of 64 image tokens), three ways:
  per-record Gram  the loop it replaced: R (V H^2 + ...) flops
  batched Gram     the trainer's: one Gram per batch, V H^2 + M H^2 + sum N_p^2 H (M = sum N_p)
  explicit logits  Y = X W^T at the M image tokens, then Y_r Y_r^T per record: M V H + sum N_p^2 V
The batched Gram is cheaper than explicit logits once M > H, which any batch of images reaches.

Part 3, a whole step at a real vocabulary: a random LLaVA student (student_step.py's Qwen2 LLM 4 x 256, tied
embeddings, V = 49152 as SmolLM2's; a CLIP tower with 64 image tokens per image) on a synthetic batch of
--real-batch records (12 prompt tokens, 64 image tokens, 100 response tokens; random top-20 targets at every
position and random relation matrices), arms sft / dft / dft with the per-record R_s / dft without L_rel (what is left
of dft's extra cost: L_vis's full-vocabulary log-softmax at every image position, and L_res), interleaved.
Only the model and batch are synthetic: the step is the trainer's (StudentWithLoss inside accumulate_gradients).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch

from common import machine, machine_line, save_results

p = argparse.ArgumentParser(description=__doc__.split("\n")[2])
p.add_argument("--cache", type=Path, default=None, help="the toy cache (default: $MODKD_HOME/bench/llava-kd-cache)")
p.add_argument("--steps", type=int, default=20)  # timed steps per arm
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--repeats", type=int, default=3)  # part 2: timed calls per variant
p.add_argument("--real-batch", type=int, default=8)  # part 3: records per batch
p.add_argument("--real-steps", type=int, default=5)  # part 3: timed steps per arm (after one warm-up)
p.add_argument("--teacher", help="ignored: this benchmark uses the toy teacher (accepted for run_all.py)")
p.add_argument("--text-dir", help="ignored (accepted for run_all.py)")
args = p.parse_args()


def per_record(self, b, every, embeds, weight):
    """StudentWithLoss._relation before the batching (commit 2cf0244): one iteration and one Gram per record."""
    from modkd.student.losses import embedding_relation, logit_relation, relation_loss

    flat = (b.input_ids.reshape(-1) == self.image_token_id).nonzero()[:, 0]  # (M,)
    rows = every if self.relation == "logits" else embeds.reshape(-1, embeds.shape[-1])  # (B * T, H or D)
    total, start, offset = every.new_zeros((), dtype=torch.float32), 0, 0
    for n in b.relation_sizes.tolist():
        x = rows[flat[start : start + n]]  # (n, H)
        r_s = logit_relation(x, weight) if self.relation == "logits" else embedding_relation(x)  # (n, n)
        r_t = b.relation_targets[offset : offset + n * n].view(n, n)  # (n, n)
        total = total + relation_loss(r_s, r_t)
        start, offset = start + n, offset + n * n
    return total


def toy_steps() -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from modkd.extract.teacher import modkd_home
    from modkd.pipelines.recipe import stage_config
    from modkd.pipelines.toyworld.build import ToyConfig, build_toy, student_init, toy_cache
    from modkd.pipelines.toyworld.compare import TOY_TRAINING
    from modkd.student.data import BatchStream
    from modkd.student.trainer import StudentWithLoss, build_student

    quiet = lambda *a, **k: None  # noqa: E731
    toy = build_toy(ToyConfig(), log=print)
    student = student_init(toy, log=print)
    cache = toy_cache(toy, args.cache or modkd_home() / "bench" / "llava-kd-cache", log=print)
    stages = {"sft": ("sft", False), "dpt": ("dpt", False), "dpt (per-record R_s)": ("dpt", True),
              "dft": ("dft", False), "dft (per-record R_s)": ("dft", True)}
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    state, batches = {}, None
    for name, (stage, old) in stages.items():
        cfg = stage_config(stage, cache=cache, student=str(student), out=Path(tempfile.mkdtemp()), image_root=toy.world,
                           **TOY_TRAINING)
        set_seed(0)
        model, processor, _ = build_student(cfg, log=quiet)
        params = [q for q in model.parameters() if q.requires_grad]
        wrapped = StudentWithLoss(model, distil=bool(cfg.kd_weight or cfg.vis_weight), tail=cfg.tail,
                                  vocab=len(processor.tokenizer), relation=cfg.relation if cfg.rel_weight else None)
        if old:
            wrapped._relation = per_record.__get__(wrapped)
        wrapped = accelerator.prepare(wrapped)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        if batches is None:  # the same batches for every arm (one stream, read once)
            stream = iter(BatchStream(cfg.cache, 0, 1, cfg.batch_size, cfg.seed, processor.tokenizer.pad_token_id,
                                      cfg.image_root, processor.image_processor))
            batches = [next(stream).to(accelerator.device) for _ in range(args.warmup + args.steps)]
        state[name] = (cfg, wrapped, optimizer, params)
    arms = interleaved(state, batches, args.warmup, accelerator)
    timed = batches[args.warmup :]
    return {"arms": arms,
            "records_per_batch": TOY_TRAINING["batch_size"],
            "image_records_per_batch": statistics.fmean(b.relation_sizes.numel() for b in timed),
            "image_tokens_per_record": statistics.fmean(float(b.relation_sizes.float().mean()) for b in timed)}


def interleaved(state: dict, batches: list, warmup: int, accelerator) -> dict:
    """Median step seconds per arm; state: name -> (cfg, wrapped, optimizer, params); arms take turns per batch."""
    from modkd.student.trainer import accumulate_gradients

    times = {name: [] for name in state}
    for i, b in enumerate(batches):
        for name, (cfg, wrapped, optimizer, params) in state.items():
            t = time.perf_counter()
            accumulate_gradients(cfg, accelerator, wrapped, [b])
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    return {name: {"times_s": t, "median_s": statistics.median(t)} for name, t in times.items()}


def real_vocab_steps(V: int = 49152, n_p: int = 64, prompt: int = 12, response: int = 100, k: int = 20) -> dict:
    """Part 3: sft / dft / dft (per-record R_s) steps of a random real-vocabulary student on synthetic image batches."""
    from accelerate import Accelerator
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

    from modkd.pipelines.recipe import stage_config
    from modkd.store import POSITION_KINDS
    from modkd.student.data import Batch
    from modkd.student.model import freeze_for
    from modkd.student.trainer import StudentWithLoss

    image_id, side = V - 1, 128  # 128 / 16 = 8 x 8 = 64 patches per image (CLS dropped: "default")
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=side, patch_size=16, projection_dim=64)
    text = Qwen2Config(vocab_size=V, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=768, max_position_embeddings=512, tie_word_embeddings=True)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_id, tie_word_embeddings=True,
                         vision_feature_select_strategy="default", vision_feature_layer=-1, projector_hidden_act="gelu")
    g = torch.Generator().manual_seed(0)
    B, T = args.real_batch, prompt + n_p + response

    def batch() -> Batch:
        ids = torch.randint(0, V - 1, (B, T), generator=g)  # (B, T)
        ids[:, prompt : prompt + n_p] = image_id
        kinds = torch.full((T - 1,), POSITION_KINDS["instruction"], dtype=torch.int8)  # (T - 1,) every position but the last
        kinds[prompt : prompt + n_p] = POSITION_KINDS["image"]
        kinds[prompt + n_p - 1 :] = POSITION_KINDS["response"]  # the last image token predicts the first response token
        flat = (torch.arange(B)[:, None] * T + torch.arange(T - 1)).reshape(-1)  # (N,)
        top = torch.rand(flat.numel(), V - 1, generator=g).topk(k).indices  # (N, k) distinct ids
        a = torch.randn(B, n_p, 32, generator=g)
        rel = a @ a.transpose(1, 2)  # (B, n_p, n_p) symmetric
        return Batch(input_ids=ids, attention_mask=torch.ones_like(ids), flat_positions=flat,
                     pixel_values=torch.randn(B, 3, side, side, generator=g), kinds=kinds.repeat(B),
                     targets=ids.reshape(-1)[flat + 1], target_ids=top,
                     target_probs=torch.softmax(torch.randn(flat.numel(), k, generator=g), -1),
                     tail_mass=torch.zeros(flat.numel()), sample_ids=[str(i) for i in range(B)],
                     relation_sizes=torch.full((B,), n_p), relation_targets=rel.reshape(-1))

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    batches = [batch().to(accelerator.device) for _ in range(1 + args.real_steps)]
    state = {}
    configs = {"sft": ("sft", False, {}), "dft": ("dft", False, {}), "dft (per-record R_s)": ("dft", True, {}),
               "dft without L_rel": ("dft", False, {"rel_weight": 0.0})}  # what is left: L_vis and L_res
    for name, (stage, old, overrides) in configs.items():
        cfg = stage_config(stage, cache="unused", student="unused", out="unused", **overrides)
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config).train()
        freeze_for(model, stage)
        wrapped = StudentWithLoss(model, distil=bool(cfg.kd_weight or cfg.vis_weight), vocab=V,
                                  relation=cfg.relation if cfg.rel_weight else None)
        if old:
            wrapped._relation = per_record.__get__(wrapped)
        params = [q for q in model.parameters() if q.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        state[name] = (cfg, accelerator.prepare(wrapped), optimizer, params)
    arms = interleaved(state, batches, 1, accelerator)
    return {"V": V, "llm": "Qwen2 4 x 256", "records_per_batch": B, "image_tokens_per_record": n_p,
            "tokens_per_record": T, "arms": arms,
            "ratios_vs_sft": {k: v["median_s"] / arms["sft"]["median_s"] for k, v in arms.items()}}


def relation_term(V: int, H: int, n: int, R: int) -> dict:
    """Median forward + backward seconds of the summed relation loss, three ways, interleaved."""
    from modkd.student.losses import blocks, logit_relation, relation_loss

    g = torch.Generator().manual_seed(0)
    h0, w0 = torch.randn(R * n, H, generator=g) / H**0.5, torch.randn(V, H, generator=g) / H**0.5
    t_flat = torch.randn(R * n * n, generator=g)
    sizes = torch.full((R,), n)

    def old(h, w):
        return sum(relation_loss(logit_relation(h[r * n : (r + 1) * n], w), t_flat[r * n * n : (r + 1) * n * n].view(n, n))
                   for r in range(R))

    def batched(h, w):
        return relation_loss(logit_relation(blocks(h, sizes), w), blocks(t_flat, sizes, square=True)).sum()

    def explicit(h, w):
        y = blocks(h @ w.T, sizes)  # (R, n, V)
        return relation_loss(y @ y.transpose(-1, -2), blocks(t_flat, sizes, square=True)).sum()

    ways = {"per-record Gram": old, "batched Gram": batched, "explicit logits": explicit}
    times, values = {k: [] for k in ways}, {}
    for _ in range(1 + args.repeats):  # the first round warms up
        for name, fn in ways.items():
            h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
            t = time.perf_counter()
            loss = fn(h, w)
            loss.backward()
            times[name].append(time.perf_counter() - t)
            values[name] = loss.item()
    return {"V": V, "H": H, "N_p": n, "records": R, "values": values,
            "median_s": {k: statistics.median(v[1:]) for k, v in times.items()}}


def main() -> None:
    m = machine()
    load = os.getloadavg()
    toy = toy_steps()
    sizes = [relation_term(384, 64, 9, 26), relation_term(49152, 256, 64, 8)]
    real = real_vocab_steps()
    arms = toy["arms"]
    sft = arms["sft"]["median_s"]
    results = {"machine": m, "load_before": load, "load_after": os.getloadavg(), "toy": toy, "relation_term": sizes,
               "real_vocab": real,
               "ratios_vs_sft": {k: v["median_s"] / sft for k, v in arms.items()}}
    print(machine_line(m))
    print(f"load average (1, 5, 15 min): before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"after {results['load_after'][0]:.2f} {results['load_after'][1]:.2f} {results['load_after'][2]:.2f}")
    print(f"toy world, batch {toy['records_per_batch']} (~{toy['image_records_per_batch']:.0f} image records of "
          f"{toy['image_tokens_per_record']:.0f} tokens), median of {args.steps} steps after {args.warmup}, arms interleaved:")
    for name, r in arms.items():
        print(f"  {name:22s} {r['median_s'] * 1e3:7.1f} ms  {r['median_s'] / sft:5.2f}x sft")
    for old in ("dpt", "dft"):
        print(f"  {old}: per-record / batched R_s  {arms[old + ' (per-record R_s)']['median_s'] / arms[old]['median_s']:.2f}x")
    for s in sizes:
        t = s["median_s"]
        print(f"relation term alone, V={s['V']} H={s['H']}, {s['records']} records x N_p={s['N_p']} (forward + backward):")
        for name, v in t.items():
            print(f"  {name:16s} {v * 1e3:9.1f} ms  {v / t['batched Gram']:6.2f}x batched  (loss {s['values'][name]:.6f})")
    print(f"whole step at a real vocabulary (V={real['V']}, {real['llm']}, random weights), {real['records_per_batch']} "
          f"records x ({real['image_tokens_per_record']} image + {real['tokens_per_record'] - real['image_tokens_per_record']} "
          f"text tokens), median of {args.real_steps} steps after 1:")
    for name, r in real["arms"].items():
        print(f"  {name:22s} {r['median_s'] * 1e3:7.0f} ms  {real['ratios_vs_sft'][name]:5.2f}x sft")
    print(f"results: {save_results('llava_kd_step', results)}")


if __name__ == "__main__":
    main()
