"""mod-pipeline demo [--out runs/demo] [--seeds 1] [--student-llm pretrained|random] [--smoke]

The whole offline pipeline on the built-in toy world, on CPU (or the GPU when there is one), nothing
downloaded:

  1. the toy world, the toy teacher (shipped pre-built, see build.py) and the student's pretrained LLM
     (plain LM on the world's text, no images: trained once, then cached under $MODKD_HOME)
  2. ONE extraction: the teacher's top-20 log-probs over every position of the students' transfer set
     (500 of the teacher's 2,000 training images), and its reference log-probs of the preference pairs
  3. the baseline, labels only: init (projector) -> sft (projector + LLM) -> upcycled to E4T2 and trained
     with CE only: the same architecture, data and steps as the distilled student (LLaVA-MoD Table 5's SFT)
  4. the distilled student, teacher-free: the same init -> d2d (KL) -> d2s (E4T2, KL + CE + aux)
     -> pd (KTO, teacher as reference, one epoch of the pairs as in the paper)
  5. evaluation of the teacher and the students on held-out images (greedy decoding), and the effect:
     distilled - labels-only EM paired over the probes with its standard error, and what pd did to
     CHAIR beside object recall and distinct captions; a row that does not show the effect says so
  6. training-curve plots; results.json and report.md
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .build import ToyConfig, build_toy, student_init, toy_cache, transfer_set
from .compare import pd_epoch_steps, run_arm
from .evaluate import evaluate
from .parallel import in_parallel, one_thread_between_jobs
from .plots import training_curves
from .report import TASKS, comparison_table, parameters

DEMO = ToyConfig()  # the default toy teacher (EM 0.605), shipped pre-built: training it takes ~8 min on 2 cores
TRANSFER_IMAGES = 500  # the students' data: a quarter of the teacher's, as a 7B teacher has seen more than the transfer set
DEMO_STEPS = 600  # student steps S per arm: init S/10 + 9S/20 + 9S/20; ~3 epochs of the 3,125-record transfer set
INIT = ("init", 0.1, {})  # shared by both arms (trained once)
SFT_ONLY = [INIT, ("sft", 0.45, {}), ("d2s", 0.45, {"kd_weight": 0.0})]
DISTILLED = [INIT, ("d2d", 0.45, {}), ("d2s", 0.45, {})]
SE_TARGET = 3  # the bar for "shows the effect": distilled - labels-only >= 3 standard errors
DISTINCT_KEPT = 0.8  # pd must keep >= 80% of the pre-pd student's distinct captions (no collapse)

SFT_NAME, D2S_NAME, PD_NAME = ("student, labels only (init -> sft -> sft-moe)", "student, distilled (init -> d2d -> d2s)",
                               "student, distilled + pd (init -> d2d -> d2s -> pd)")


def demo(cfg: ToyConfig, out: Path, steps: int, limit: int | None = None, llm: str = "pretrained",
         transfer: int | None = TRANSFER_IMAGES, pd_steps: int | None = None, seeds: int = 1, log=print) -> dict:
    """pd_steps None: one epoch of the preference pairs (compare.pd_epoch_steps). seeds > 1 trains both arms
    again from seeds 1.. (data order, routers) under out/seed{n}, and judges the effect over the seeds."""
    out.mkdir(parents=True, exist_ok=True)
    log(f"[1/6] toy world, toy teacher and the {llm} student LLM (config {json.dumps(cfg.__dict__)})")
    toy = build_toy(cfg, log=log)
    data = transfer_set(toy.world, transfer)
    log(f"[2/6] one extraction of the teacher over the transfer set ({data.name}): top-20 over every position, "
        "and preference reference log-probs (beside the student LLM's pretraining, when it is not cached)")
    student, cache = in_parallel([(student_init, (toy, llm), {"log": log}),
                                  (toy_cache, (toy, out / "cache"), {"data": data, "log": log})])
    pd_steps = pd_steps or pd_epoch_steps(cache)
    chain = [*DISTILLED, ("pd", pd_steps / steps, {})]
    log(f"[3/6] the baseline, labels only: init -> sft -> sft-moe (E4T2, CE only), {steps} steps")
    log(f"[4/6] the distilled student, teacher-free: init -> d2d -> d2s (E4T2), {steps} steps, -> pd (KTO, "
        f"{pd_steps} steps); both arms side by side after the shared init" + (f"; seeds 0-{seeds - 1}" if seeds > 1 else ""))
    models, runs = {"toy teacher": toy.teacher}, {}
    for seed in range(seeds):
        seed_out, done = (out if seed == 0 else out / f"seed{seed}"), {}
        with one_thread_between_jobs():
            run_arm("init", [INIT], student, cache, toy.world, seed_out, steps, seed, done, log)
        sft, distilled = in_parallel([
            (run_arm, ("labels only", SFT_ONLY, student, cache, toy.world, seed_out, steps, seed, dict(done)), {"log": log}),
            (run_arm, ("distilled", chain, student, cache, toy.world, seed_out, steps, seed, dict(done)),
             {"log": log, "number_from": len(SFT_ONLY) - 1})])
        tag = seed_tag(seed, seeds)
        models |= {SFT_NAME + tag: sft[-1], D2S_NAME + tag: distilled[2], PD_NAME + tag: distilled[3]}
        if seed == 0:  # the plots show seed 0's curves
            runs = {"init": sft[0].parent, "labels only: sft": sft[1].parent, "labels only: sft-moe": sft[2].parent,
                    **{f"distilled: {stage}": final.parent for (stage, _, _), final in zip(chain[1:], distilled[1:])}}
    log("[5/6] evaluating on held-out images (greedy decoding)")
    scores = in_parallel([(evaluate, (path, toy.world, limit), {}) for path in models.values()])
    results = {name: {**score, **parameters(path), "model": str(path)}
               for (name, path), score in zip(models.items(), scores)}
    log("[6/6] plots of the training curves")
    plot = training_curves(runs, out / "plots" / "training.png", "demo: training curves" + (" (seed 0)" if seeds > 1 else ""))
    effect = effect_lines(results, steps, pd_steps, seeds)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(comparison_table(results) + "\n\n" + "\n".join(effect) + "\n")
    return {"results": results, "effect": effect, "cache": cache, "runs": out / "runs", "plot": plot}


def seed_tag(seed: int, seeds: int) -> str:
    return f" [seed {seed}]" if seeds > 1 else ""


def paired(a: list[int], b: list[int]) -> tuple[float, float]:
    """Mean of b - a over paired probes and its standard error (sample std of the differences / sqrt n)."""
    d = [y - x for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1) if len(d) > 1 else 0.0
    return mean, math.sqrt(var / len(d))


def effect_lines(results: dict, steps: int, pd_steps: int, seeds: int = 1) -> list[str]:
    """The demo's two claims, each measured and judged against its bar, in words. Over several seeds the EM
    difference is the mean of the seeds' paired differences, with the larger of two standard errors: the spread
    of the seeds' differences (std / sqrt(seeds)) and the probes' noise (sqrt(sum of the seeds' SE^2) / seeds)."""
    tags = [seed_tag(seed, seeds) for seed in range(seeds)]
    sft, d2s, pd = ([results[name + tag] for tag in tags] for name in (SFT_NAME, D2S_NAME, PD_NAME))
    diffs = [paired(a["qa_hits"], b["qa_hits"]) for a, b in zip(sft, d2s)]
    mean = sum(m for m, _ in diffs) / seeds
    se = math.sqrt(sum(e**2 for _, e in diffs)) / seeds
    if seeds > 1:
        se = max(se, math.sqrt(sum((m - mean) ** 2 for m, _ in diffs) / (seeds - 1) / seeds))
    z = mean / se if se else float("inf") if mean else 0.0
    avg = lambda rs, f: sum(f(r) for r in rs) / len(rs)  # noqa: E731
    tasks = [t for t in TASKS[:-1] if t in sft[0]["exact_match"]]
    gain = {t: avg(d2s, lambda r: r["exact_match"][t]) - avg(sft, lambda r: r["exact_match"][t]) for t in tasks}
    ahead = [t for t in tasks if gain[t] > 0]
    per_task = ", ".join(f"{t} {gain[t]:+.3f}" for t in tasks)
    kd_ok = z >= SE_TARGET and len(ahead) >= 3
    chair = lambda rs, k: avg(rs, lambda r: r["chair"][k])  # noqa: E731
    kept = avg(list(zip(d2s, pd)), lambda ab: ab[1]["chair"]["distinct"] / max(1, ab[0]["chair"]["distinct"]))
    pd_ok = chair(pd, "chair_s") < chair(d2s, "chair_s") and kept >= DISTINCT_KEPT
    over = "" if seeds == 1 else f", mean over {seeds} seeds"
    noise = (f"paired over the {len(sft[0]['qa_hits'])} QA probes" if seeds == 1 else
             "per seed " + ", ".join(f"{m:+.3f} ± {e:.3f}" for m, e in diffs))
    return [
        f"Distillation vs labels only (same E4T2 student, transfer set and {steps} steps{over}): EM overall "
        f"{avg(sft, lambda r: r['exact_match']['overall']):.3f} -> {avg(d2s, lambda r: r['exact_match']['overall']):.3f}, "
        f"difference {mean:+.3f} ± {se:.3f} ({noise}; {z:+.1f} standard errors); per task {per_task} "
        f"(distilled ahead on {len(ahead)} of {len(tasks)}).",
        "  -> " + ("shows the effect" if kd_ok else "does NOT show the effect") +
        f" (bar: >= {SE_TARGET} standard errors and ahead on >= 3 of the {len(tasks)} tasks).",
        f"Preference distillation ({pd_steps} steps of KTO after d2s{over}): CHAIR_s {chair(d2s, 'chair_s'):.3f} -> "
        f"{chair(pd, 'chair_s'):.3f}, CHAIR_i {chair(d2s, 'chair_i'):.3f} -> {chair(pd, 'chair_i'):.3f}, object recall "
        f"{chair(d2s, 'recall'):.3f} -> {chair(pd, 'recall'):.3f}, objects per caption {chair(d2s, 'objects'):.2f} -> "
        f"{chair(pd, 'objects'):.2f}, distinct captions {chair(d2s, 'distinct'):.0f} -> {chair(pd, 'distinct'):.0f} "
        f"({kept:.0%} kept), EM overall {avg(d2s, lambda r: r['exact_match']['overall']):.3f} -> "
        f"{avg(pd, lambda r: r['exact_match']['overall']):.3f}.",
        "  -> " + ("shows the effect" if pd_ok else "does NOT show the effect") +
        f" (bar: CHAIR_s lower with >= {DISTINCT_KEPT:.0%} of the distinct captions kept).",
    ]
