"""mod-pipeline demo [--out runs/demo] [--smoke]

The whole offline pipeline on the built-in toy world, on CPU (or the GPU when there is one), nothing
downloaded:

  1. the toy world and the toy teacher (trained once, then cached under $MODKD_HOME)
  2. ONE extraction: the teacher's top-20 log-probs over every position of the training set, and its
     reference log-probs of the preference pairs
  3. the baseline, labels only: init (projector) -> sft (projector + LLM) -> upcycled to E4T2 and trained
     with CE only: the same architecture, data and steps as the distilled student (LLaVA-MoD Table 5's SFT)
  4. the distilled student, teacher-free: the same init -> d2d (KL) -> d2s (E4T2, KL + CE + aux)
     -> pd (KTO, teacher as reference): S steps of init + mimic, then S/20 of pd
  5. evaluation of the teacher and the students on held-out images (greedy decoding)
  6. training-curve plots; results.json and report.md

The teacher is trained for fewer steps than the default toy teacher (DEMO) so a first run on a fresh
2-core machine stays within 10 minutes; `mod-pipeline reproduce` measures the paper's ablations with
the default teacher and several seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

from .build import ToyConfig, build_toy, student_init, toy_cache
from .compare import run_arm
from .evaluate import evaluate
from .plots import training_curves
from .report import comparison_table, parameters

DEMO = ToyConfig(steps=800)  # 40% of the default teacher's steps: a fresh demo fits in 10 minutes on 2 cores
DEMO_STEPS = 600  # student steps S per arm: init S/10 + 9S/20 + 9S/20; pd adds S/20
INIT = ("init", 0.1, {})  # shared by both arms (trained once)
SFT_ONLY = [INIT, ("sft", 0.45, {}), ("d2s", 0.45, {"kd_weight": 0.0})]
# pd: S/20 = 30 steps = ~1.5 epochs of the 600 pairs; longer pd collapses the toy's captions (README, preference section)
DISTILLED = [INIT, ("d2d", 0.45, {}), ("d2s", 0.45, {}), ("pd", 0.05, {})]


def demo(cfg: ToyConfig, out: Path, steps: int, limit: int | None = None, log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    log(f"[1/6] toy world and toy teacher (config {json.dumps(cfg.__dict__)})")
    toy = build_toy(cfg, log=log)
    log("[2/6] one extraction of the teacher: top-20 over every position, and preference reference log-probs")
    cache = toy_cache(toy, out / "cache", log=log)
    student = student_init(toy, log=log)
    done: dict[tuple, Path] = {}
    log(f"[3/6] the baseline, labels only: init -> sft -> sft-moe (E4T2, CE only), {steps} steps")
    sft = run_arm("SFT only", SFT_ONLY, student, cache, toy.world, out, steps, 0, done, log)
    log("[4/6] the distilled student, teacher-free: init -> d2d -> d2s (E4T2) -> pd (KTO)")
    distilled = run_arm("distilled", DISTILLED, student, cache, toy.world, out, steps, 0, done, log)
    models = {"toy teacher": toy.teacher, "student, SFT only (init -> sft -> sft-moe)": sft[-1],
              "student, init -> d2d -> d2s": distilled[2], "student, init -> d2d -> d2s -> pd": distilled[3]}
    log("[5/6] evaluating on held-out images (greedy decoding)")
    results = {name: {**evaluate(path, toy.world, limit), **parameters(path), "model": str(path)}
               for name, path in models.items()}
    log("[6/6] plots of the training curves")
    runs = {"init": sft[0].parent, "SFT only: sft": sft[1].parent, "SFT only: sft-moe": sft[2].parent,
            **{f"distilled: {stage}": final.parent for (stage, _, _), final in zip(DISTILLED[1:], distilled[1:])}}
    plot = training_curves(runs, out / "plots" / "training.png", "demo: training curves")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(comparison_table(results) + "\n")
    return {"results": results, "cache": cache, "runs": out / "runs", "plot": plot}
