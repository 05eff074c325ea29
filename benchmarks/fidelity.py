"""python benchmarks/fidelity.py [--teacher smollm2-135m] [--records 16] [--tokens 256] [--top-k 5 20 50] [--samples 8 16 32 64] [--far-layer 10] [--close-layer 27]

Size against gradient fidelity of each cache encoding (DESIGN section 3, issue 15), on a real pretrained
teacher over real English text (passages of llava-mod.txt and llava-kd.txt as LLaVA records whose answer
is the passage, as benchmarks/cache_size.py).

For every setting (topk at each --top-k, sampled at each --samples) a real `mod-extract --encoding ...`
run (the installed CLI, in a subprocess, hf backend, float32) writes a cache into a temporary directory;
bytes per position = the cache's total shard bytes / stored positions (`Cache.stats()`), and the
distribution columns alone (ids, values, top_logprobs, tail_mass, num_ids) from the Parquet footer.

Students: early exits of the teacher itself. The residual stream after layer `--far-layer` (far: a large
KL to the teacher) and after `--close-layer` (close: a small KL), through the model's final norm and its
lm_head (the first len(tokenizer) rows, fp32). The teacher is the same model run here in float32 on the
cache's own input_ids (one record at a time), its log-probs over the tokenizer's vocabulary.

For each student, with the lm_head weight W as the autograd leaf and the student's hidden states fixed:
  reference  G_full = d/dW sum_t KL(p_teacher,t || q_student,t) over the full vocabulary
             (explicit log-softmax KL; checked against the closed form sum_t (q_t - p_t) h_t^T)
  cached     G = d/dW sum_t forward_kl(...) from the decoded cache records, through the trainer's own
             loss path (student/losses.py: student_logprobs + forward_kl, as student/trainer.py calls them):
               renormalised  p = rec.target_probs                         (topk)
               tail bucket   p = rec.target_probs * (1 - rec.tail_mass), p_tail = rec.tail_mass   (topk)
               sampled       p = rec.target_probs = counts / N           (sampled)
and reports the angle between G and G_full in degrees and the norm ratio |G| / |G_full|; for sampled also
the mean number of distinct ids per position. Each student's mean KL(teacher || student) in nats over the
stored positions says how far it is.

Cross-check: the decoded targets are compared with targets built here from the teacher's log-probs with
the codec (store/encoding.py): top-k ids, quantise/dequantise_logprobs, tail_mass; sample_uniforms +
inverse CDF + draws_to_counts. Agreement is reported (float noise between a batched and an unbatched
forward can move a top-k tie or a draw that sits on a CDF boundary).

Outputs: a table, benchmarks/results/fidelity.json and the plot benchmarks/results/fidelity.png (x: bytes
per position, y: gradient angle; one curve per encoding/estimator, one panel per student);
`--plot-only` redraws the plot from the JSON without measuring.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from common import RESULTS, TEXT_DIR, llava_records, machine, machine_line, passages, save_results, write_jsonl
from modkd.extract.teacher import load_teacher, resolve
from modkd.store import Cache, shard_paths
from modkd.store.encoding import dequantise_logprobs, draws_to_counts, quantise_logprobs, sample_uniforms, tail_mass
from modkd.student.losses import forward_kl, student_logprobs

DIST_COLUMNS = ("num_ids", "ids", "values", "top_logprobs", "tail_mass")  # what the encoding changes
CHUNK = 512  # positions per (chunk, V) fp32 block: 512 x 49,152 x 4 B = 100 MB


def plot(results: dict, png: Path) -> Path:
    """Angle against bytes per position: one curve per encoding/estimator, one panel per student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    settings, students = results["settings"], results["students"]
    fig, axes = plt.subplots(1, len(students), figsize=(11, 4.2), squeeze=False)
    curves = [("topk", "renormalised", "o-", "top-k renormalised"), ("topk", "tail bucket", "s--", "top-k + tail bucket"),
              ("sampled", "sampled", "^-", "sampled (counts / N)")]
    for ax, name in zip(axes[0], students):
        for enc, est, style, label in curves:
            pts = [s for s in settings if s["encoding"] == enc]
            if not pts:
                continue
            x = [s["bytes_per_position"] for s in pts]
            y = [s["estimators"][est][name]["angle_deg"] for s in pts]
            ax.plot(x, y, style, label=label)
            for s, xi, yi in zip(pts, x, y):
                ax.annotate(f"k={s['k']}" if enc == "topk" else f"N={s['samples']}", (xi, yi),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
        st = students[name]
        ax.set_title(f"{name} student (exit after layer {st['layer']}/{results['layers']}, "
                     f"KL {st['mean_kl_nats']:.1f} nats)", fontsize=10)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator([10, 20, 30, 50, 100, 200, 300, 500, 1000]))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("bytes per stored position (Parquet, zstd)")
        ax.set_ylabel("angle to full-vocabulary KD gradient (deg)")
        ax.set_ylim(bottom=0)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{results['teacher']}: lm_head gradient fidelity vs cache size "
                 f"({results['positions']} positions of English text)", fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    return png


p = argparse.ArgumentParser(description=__doc__.split("\n")[2])
p.add_argument("--teacher", default="smollm2-135m", help="preset or local HF directory (a text-only causal LM)")
p.add_argument("--text-dir", type=Path, default=TEXT_DIR)
p.add_argument("--records", type=int, default=16)  # 16 x ~257 response positions: ~4k positions
p.add_argument("--tokens", type=int, default=256)  # passage length in teacher tokens
p.add_argument("--top-k", type=int, nargs="*", default=[5, 20, 50])
p.add_argument("--samples", type=int, nargs="*", default=[8, 16, 32, 64])
# SmolLM2-135M (30 layers), mean KL to the teacher of the early exit after layer l, one 256-token passage:
# l=10: 17.4 nats (the far side of a plateau of 14-18 nats over layers 1-19), l=27: 4.7, l=29: 2.5
p.add_argument("--far-layer", type=int, default=10, help="far student: exit after this many layers")
p.add_argument("--close-layer", type=int, default=27, help="close student: exit after this many layers")
p.add_argument("--keep", type=Path, default=None, help="keep the caches here instead of a deleted temp dir")
p.add_argument("--plot-only", action="store_true", help="redraw fidelity.png from fidelity.json, measure nothing")
args = p.parse_args()
if args.plot_only:
    print(f"plot: {plot(json.loads((RESULTS / 'fidelity.json').read_text()), RESULTS / 'fidelity.png')}")
    sys.exit(0)

t_start = time.perf_counter()
m = machine()
device = m["device"]
work = args.keep or Path(tempfile.mkdtemp(prefix="modkd-fidelity-"))
work.mkdir(parents=True, exist_ok=True)
directory, gguf = resolve(args.teacher)
tokenizer = AutoTokenizer.from_pretrained(directory, **({"gguf_file": gguf} if gguf else {}))
data = write_jsonl(work / "passages.jsonl", llava_records(passages(tokenizer, args.records, args.tokens, args.text_dir)))


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", file=sys.stderr, flush=True)


# ---- 1. one real extraction per setting -------------------------------------------------------------------
cli = Path(sys.executable).with_name("mod-extract")
base = [str(cli)] if cli.is_file() else [sys.executable, "-c", "from modkd.pipelines.cli_extract import main; main()"]
settings = [{"encoding": "topk", "k": k, "label": f"top-{k}"} for k in args.top_k] + [
    {"encoding": "sampled", "samples": n, "label": f"sampled N={n}"} for n in args.samples]
caches: dict[str, Cache] = {}
for s in settings:
    out_dir = work / s["label"].replace(" ", "-").replace("=", "")
    flags = ["--top-k", str(s["k"])] if s["encoding"] == "topk" else ["--samples", str(s["samples"])]
    cmd = base + ["--teacher", args.teacher, "--data", str(data), "--out", str(out_dir), "--backend", "hf",
                  "--dtype", "float32", "--encoding", s["encoding"], *flags]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    s["extract_seconds"] = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    cache = caches[s["label"]] = Cache.open(out_dir)
    if cache.encoding.name != s["encoding"]:
        sys.exit(f"{out_dir}: asked for --encoding {s['encoding']}, the manifest says {cache.encoding.name}")
    total = cache.stats()[-1]  # the row named "total"
    columns: dict[str, int] = {}
    for index in range(cache.manifest["num_shards"]):
        meta = pq.ParquetFile(shard_paths(cache.path, index, cache.manifest["num_shards"])[0]).metadata
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(g).column(c)
                name = col.path_in_schema.split(".")[0]
                columns[name] = columns.get(name, 0) + col.total_compressed_size
    P_cache = total["positions"]
    s.update(positions=P_cache, bytes=total["bytes"], bytes_per_position=total["bytes"] / P_cache,
             distribution_bytes_per_position=sum(columns.get(c, 0) for c in DIST_COLUMNS) / P_cache,
             column_bytes_per_position={c: b / P_cache for c, b in columns.items()})
    log(f"{s['label']}: mod-extract {s['extract_seconds']:.0f} s, {P_cache} positions, "
        f"{s['bytes_per_position']:.1f} B/position")

# ---- 2. teacher and students on the cache's own tokens ----------------------------------------------------
first = caches[settings[0]["label"]]
layout = {rec.sample_id: (rec.input_ids, rec.positions) for rec in first.records(columns=["input_ids", "positions"])}
for label, cache in caches.items():  # every cache must hold the same tokens and positions, or nothing compares
    other = {rec.sample_id: (rec.input_ids, rec.positions) for rec in cache.records(columns=["input_ids", "positions"])}
    if other.keys() != layout.keys() or any(
            not (np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])) for a, b in
            ((layout[i], other[i]) for i in layout)):
        sys.exit(f"{label}: its records' tokens or positions differ from {settings[0]['label']}'s")
order = sorted(layout)  # records in sample_id order; every (P, ...) array below follows it

teacher = load_teacher(args.teacher, torch.float32, device)
model, vocab = teacher.model, teacher.fingerprint["tokenizer_vocab_size"]
decoder = model.get_decoder()
L = model.config.num_hidden_layers
if not 1 <= args.far_layer < L or not 1 <= args.close_layer < L:
    sys.exit(f"--far-layer and --close-layer must lie in [1, {L - 1}] for a {L}-layer teacher")
W0 = model.get_output_embeddings().weight[:vocab].detach().float()  # (V, H): the tokenizer's rows
hid = {"teacher": [], "far": [], "close": []}
targets, starts = [], {}
with torch.no_grad():
    for sid in order:
        input_ids, positions = layout[sid]
        ids = torch.from_numpy(input_ids.astype(np.int64))[None].to(device)  # (1, T)
        pos = torch.from_numpy(positions.astype(np.int64)).to(device)  # (P_r,)
        hs = decoder(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states  # L + 1 of (1, T, H)
        starts[sid] = sum(len(t) for t in targets)
        hid["teacher"].append(hs[-1][0, pos].float())  # the final norm already applied
        hid["far"].append(decoder.norm(hs[args.far_layer][0, pos]).float())  # hs[l]: after l layers
        hid["close"].append(decoder.norm(hs[args.close_layer][0, pos]).float())
        targets.append(ids[0, pos + 1])
hid = {name: torch.cat(h) for name, h in hid.items()}  # (P, H) each
targets = torch.cat(targets)  # (P,) int64: the token each position predicts
P = targets.shape[0]
if P != settings[0]["positions"]:
    sys.exit(f"{P} positions read back, the cache's stats say {settings[0]['positions']}")
chunks = [slice(a, min(a + CHUNK, P)) for a in range(0, P, CHUNK)]
logp_teacher = torch.empty((P, vocab), dtype=torch.float32, device=device)  # (P, V) fp32: 800 MB at 4k x 49k
with torch.no_grad():
    for sl in chunks:
        logp_teacher[sl] = torch.log_softmax(F.linear(hid["teacher"][sl], W0), dim=-1)
log(f"teacher: {P} positions of {len(order)} records, vocabulary {vocab}")


def full_kd_grad(h: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """(lm_head gradient of sum_t KL(p_t || q_t) over the full vocabulary, mean KL in nats, closed-form check:
    max |autograd - (q - p)^T h| / max |autograd| on the first chunk)."""
    W = W0.clone().requires_grad_(True)
    kl, check = 0.0, float("nan")
    for i, sl in enumerate(chunks):
        logq = torch.log_softmax(F.linear(h[sl], W), dim=-1)  # (C, V)
        logp = logp_teacher[sl]
        loss = (logp.exp() * (logp - logq)).sum()
        if i == 0:
            g = torch.autograd.grad(loss, W, retain_graph=True)[0]
            closed = (logq.detach().exp() - logp.exp()).T @ h[sl]  # (V, H)
            check = ((g - closed).abs().max() / g.abs().max()).item()
        loss.backward()
        kl += loss.item()
    return W.grad, kl / P, check


def cached_grad(h: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, tail: torch.Tensor | None) -> torch.Tensor:
    """lm_head gradient of the cached KL summed over positions, as student/trainer.py computes the loss."""
    W = W0.clone().requires_grad_(True)
    p_all = probs if tail is None else probs * (1.0 - tail)[:, None]  # tail bucket: top-k keeps 1 - tail of the mass
    for sl in chunks:
        logq, _, logq_tail = student_logprobs(h[sl], W, ids[sl], targets[sl], tail=tail is not None)
        loss = forward_kl(logq, p_all[sl], None if tail is None else tail[sl], None if tail is None else logq_tail)
        loss.sum().backward()
    return W.grad


def compare(g: torch.Tensor, ref: torch.Tensor) -> dict:
    g, ref = g.double(), ref.double()
    cos = (g * ref).sum() / (g.norm() * ref.norm())
    return {"angle_deg": float(torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))), "norm_ratio": float(g.norm() / ref.norm())}


students = {}
reference = {}
for name, layer in (("far", args.far_layer), ("close", args.close_layer)):
    reference[name], mean_kl, check = full_kd_grad(hid[name])
    students[name] = {"layer": layer, "mean_kl_nats": mean_kl, "closed_form_rel_err": check}
    log(f"{name} student (exit after layer {layer}/{L}): mean KL(teacher || student) {mean_kl:.2f} nats")

# ---- 3. decoded cache targets: cross-check against the codec, then the cached gradients --------------------


def decoded(cache: Cache):
    """(P, n) int64 ids, (P, n) fp32 probs (rows padded with id 0, prob 0 as student/data.py does), (P,) tail or None."""
    recs = {rec.sample_id: rec for rec in cache.records()}
    width = max(recs[s].target_ids.shape[1] for s in order)
    pad = lambda a: np.pad(a, ((0, 0), (0, width - a.shape[1])))  # noqa: E731
    ids = torch.from_numpy(np.concatenate([pad(recs[s].target_ids) for s in order]).astype(np.int64))
    probs = torch.from_numpy(np.concatenate([pad(recs[s].target_probs) for s in order]))
    tails = [recs[s].tail_mass for s in order]
    tail = None if tails[0] is None else torch.from_numpy(np.concatenate(tails))
    return ids.to(device), probs.to(device), None if tail is None else tail.to(device)


def check_topk(k: int, ids: torch.Tensor, probs: torch.Tensor, tail: torch.Tensor) -> dict:
    same_ids, prob_err, tail_err = 0, 0.0, 0.0
    for sl in chunks:
        lp, top = logp_teacher[sl].topk(k, dim=-1)  # (C, k) rank order
        top1, codes = quantise_logprobs(lp.cpu().numpy())
        expect = np.exp(dequantise_logprobs(top1, codes).astype(np.float64))
        expect = torch.from_numpy(expect / expect.sum(1, keepdims=True)).float().to(device)  # (C, k) renormalised
        sorted_ids, perm = ids[sl].sort(dim=1)
        ref_ids, ref_perm = top.sort(dim=1)
        same = (sorted_ids == ref_ids).all(1)  # (C,) the same top-k set
        same_ids += int(same.sum())
        diff = (probs[sl].gather(1, perm) - expect.gather(1, ref_perm)).abs().max(1).values  # (C,)
        prob_err = max(prob_err, float(diff[same].max()) if same.any() else 0.0)
        tail_err = max(tail_err, float((tail[sl] - torch.from_numpy(tail_mass(lp.cpu().numpy())).to(device)).abs().max()))
    return {"same_topk_set": same_ids / P, "max_abs_prob_diff": prob_err, "max_abs_tail_diff": tail_err}


def check_sampled(cache: Cache, ids: torch.Tensor, probs: torch.Tensor) -> dict:
    N, seed = cache.encoding.samples, cache.encoding.seed
    u = np.concatenate([sample_uniforms(seed, s, layout[s][1], N) for s in order])  # (P, N)
    draws = []
    for sl in chunks:  # inverse CDF in float64, as the codec's docstring defines the draws
        cdf = torch.cumsum(logp_teacher[sl].double().exp(), dim=-1)  # (C, V)
        uu = torch.from_numpy(u[sl]).to(device) * cdf[:, -1:]
        draws.append(torch.searchsorted(cdf, uu, right=True).clamp(max=vocab - 1).cpu())
    e_ids, e_counts = draws_to_counts(torch.cat(draws).numpy())  # (P, n') ascending, zero-padded
    width = max(e_ids.shape[1], ids.shape[1])
    got_ids = np.pad(ids.cpu().numpy(), ((0, 0), (0, width - ids.shape[1])))
    got_counts = np.pad(np.rint(probs.cpu().numpy() * N).astype(np.int64), ((0, 0), (0, width - ids.shape[1])))
    e_ids = np.pad(e_ids, ((0, 0), (0, width - e_ids.shape[1])))
    e_counts = np.pad(e_counts, ((0, 0), (0, width - e_counts.shape[1])))
    same = ((np.where(e_counts > 0, e_ids, -1) == np.where(got_counts > 0, got_ids, -1)) & (e_counts == got_counts)).all(1)
    return {"same_draws": float(same.mean()), "counts_sum_to_N": bool((got_counts.sum(1) == N).all())}


for s in settings:
    cache = caches[s["label"]]
    ids, probs, tail = decoded(cache)
    if ids.shape[0] != P:
        sys.exit(f"{s['label']}: {ids.shape[0]} decoded positions, expected {P}")
    rows = probs.sum(1)
    s["max_abs_row_sum_err"] = float((rows - 1).abs().max())
    s["distinct_ids_per_position"] = float((probs > 0).sum(1).double().mean())
    if s["encoding"] == "topk":
        s["check"] = check_topk(s["k"], ids, probs, tail)
        s["mean_tail_mass"] = float(tail.double().mean())
        estimators = {"renormalised": None, "tail bucket": tail}
    else:
        s["check"] = check_sampled(cache, ids, probs)
        estimators = {"sampled": None}
    s["estimators"] = {}
    for est, t in estimators.items():
        s["estimators"][est] = {name: compare(cached_grad(hid[name], ids, probs, t), reference[name])
                                for name in students}
    log(f"{s['label']}: " + "; ".join(f"{est} " + ", ".join(f"{n} {r['angle_deg']:.2f} deg" for n, r in v.items())
                                      for est, v in s["estimators"].items()) + f"; check {s['check']}")
    del ids, probs, tail

# ---- 4. report -------------------------------------------------------------------------------------------
seconds = time.perf_counter() - t_start
results = {
    "machine": m, "teacher": args.teacher, "records": len(order), "positions": P, "vocab": vocab,
    "input_tokens": int(sum(len(layout[s][0]) for s in order)), "layers": L, "students": students,
    "settings": settings, "seconds": seconds,
}
print(machine_line(m))
print(f"teacher {args.teacher} (float32), {len(order)} records, {P} stored positions, vocabulary {vocab}; "
      f"students = early exits of the teacher, full-vocabulary KD as the reference gradient")
for name, st in students.items():
    print(f"  {name:5s} student: exit after layer {st['layer']}/{L}, mean KL(teacher || student) "
          f"{st['mean_kl_nats']:.2f} nats (closed-form check {st['closed_form_rel_err']:.1e})")
head = (f"  {'setting':15s} {'estimator':13s} {'B/pos':>6s} {'dist B/pos':>10s} {'ids/pos':>7s} "
        f"{'far angle':>9s} {'far |G|/|G*|':>12s} {'close angle':>11s} {'close |G|/|G*|':>14s}")
print(head)
for s in settings:
    for est, v in s["estimators"].items():
        print(f"  {s['label']:15s} {est:13s} {s['bytes_per_position']:6.1f} {s['distribution_bytes_per_position']:10.1f} "
              f"{s['distinct_ids_per_position']:7.2f} {v['far']['angle_deg']:8.2f}d {v['far']['norm_ratio']:12.3f} "
              f"{v['close']['angle_deg']:10.2f}d {v['close']['norm_ratio']:14.3f}")
print("  cross-check against the codec: " + "; ".join(
    f"{s['label']} " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in s["check"].items())
    for s in settings))
print(f"  total {seconds:.0f} s (mod-extract {sum(s['extract_seconds'] for s in settings):.0f} s)")

png = plot(results, RESULTS / "fidelity.png")
if args.keep is None:
    shutil.rmtree(work)
print(f"results: {save_results('fidelity', results)}, plot: {png}")
