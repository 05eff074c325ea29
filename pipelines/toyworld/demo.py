"""mod-pipeline demo [--out runs/demo] [--smoke]

The whole offline pipeline on the built-in toy world, on CPU (or the GPU when there is one), nothing
downloaded:

  1. the toy world and the toy teacher (trained once, then cached under $MODKD_HOME)
  2. ONE extraction: the teacher's top-20 log-probs over every position of the training set, and its
     reference log-probs of the preference pairs
  3. the student baseline: plain SFT from the cache's labels, S steps (projector + LLM)
  4. the distilled student, teacher-free: init (projector) -> d2d (KL) -> d2s (E4T2, KL + CE + aux)
     -> pd (KTO, teacher as reference): S steps of init + mimic, S/10 of pd
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
from .compare import PD_SHARE, run_arm
from .evaluate import evaluate
from .plots import training_curves
from .report import comparison_table, parameters

DEMO = ToyConfig(steps=1000)  # half the default teacher's steps: a fresh demo fits in 10 minutes on 2 cores
DEMO_STEPS = 800  # student steps S per arm: SFT S; init S/10 + d2d 9S/20 + d2s 9S/20, then pd S/10
DISTILLED = [("init", 0.1, {}), ("d2d", 0.45, {}), ("d2s", 0.45, {}), ("pd", PD_SHARE, {})]


def demo(cfg: ToyConfig, out: Path, steps: int, limit: int | None = None, log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    log(f"[1/6] toy world and toy teacher (config {json.dumps(cfg.__dict__)})")
    toy = build_toy(cfg, log=log)
    log("[2/6] one extraction of the teacher: top-20 over every position, and preference reference log-probs")
    cache = toy_cache(toy, out / "cache", log=log)
    student = student_init(toy, log=log)
    done: dict[tuple, Path] = {}
    log(f"[3/6] the baseline: the student trained by plain SFT on the cache's labels, {steps} steps")
    sft = run_arm("SFT only", [("sft", 1.0, {})], student, cache, toy.world, out, steps, 0, done, log)
    log("[4/6] the distilled student, teacher-free: init -> d2d -> d2s (E4T2) -> pd (KTO)")
    distilled = run_arm("distilled", DISTILLED, student, cache, toy.world, out, steps, 0, done, log)
    models = {"toy teacher": toy.teacher, "student, SFT only": sft[-1],
              "student, init -> d2d -> d2s": distilled[2], "student, init -> d2d -> d2s -> pd": distilled[3]}
    log("[5/6] evaluating on held-out images (greedy decoding)")
    results = {name: {**evaluate(path, toy.world, limit), **parameters(path), "model": str(path)}
               for name, path in models.items()}
    log("[6/6] plots of the training curves")
    runs = {"SFT only: sft": sft[0].parent, **{f"distilled: {stage}": final.parent
                                                for (stage, _, _), final in zip(DISTILLED, distilled)}}
    plot = training_curves(runs, out / "plots" / "training.png", "demo: training curves")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(comparison_table(results) + "\n")
    return {"results": results, "cache": cache, "runs": out / "runs", "plot": plot}
