"""mod-pipeline llava-kd --out runs/llava-kd [--seeds 3] [--steps 400]

LLaVA-KD's training-scheme and distillation-strategy ablations (llava-kd Tables 2 and 3) at toy scale, from
the ONE cache every toy pipeline trains from (toyworld.build.toy_cache: the teacher's top-20 over every
position, image positions included, and its relation matrices, `--relation logits`), every arm trained by the
real trainer from the same student init over seeds 0..N-1 (seed: data order), the seeds side by side.

Stage lengths are shares of `--steps` S: PT or DPT S/4, SFT S/2, DFT S/4 (the paper trains one epoch per
stage; DPT+SFT+DFT therefore trains S/4 more steps than PT+SFT, as in the paper: the control arm
"pt -> sft (3S/4)" trains PT+SFT for the same total). Every stage uses the toy's batch 32
(toyworld.compare.TOY_TRAINING, as `reproduce`). Learning rates are per stage, in the paper's ratio (llava-kd
Sec. 4.1: DPT 1e-3, SFT and DFT 2e-5, so projector-only : full-model = 50) from the toy's own lr: the toy's
5e-4 (ToyConfig.lr) is a whole-model lr, so it is SFT's and DFT's, and the projector-only stages PT and DPT
get 50 x 5e-4 = 2.5e-2 (`LR` below; a projector alone is trained at a larger lr than a whole LLM, as LLaVA's
PT vs SFT). Chosen from the paper's values alone, before any evaluation. Loss weights are the
recipes' (alpha, beta, gamma) = (1, 1, 0.5). PT is the `init` stage (projector, CE on responses).
For each paper comparison the report puts the paper's averages beside our paired difference (mean ± std
over seeds of treatment minus reference), called within noise when its mean is under two standard errors.
EM overall stands in for the paper's 10-benchmark average.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .build import ToyConfig
from .compare import TOY_TRAINING, seeds_side_by_side
from .evaluate import evaluate
from .report import SEED_COLUMNS, parameters, seeds_table

PT, SFT, DFT = 0.25, 0.5, 0.25  # shares of S per stage
MDIST_ONLY = {"rel_weight": 0.0}
RDIST_ONLY = {"kd_weight": 0.0, "vis_weight": 0.0}  # L_reg + gamma L_rel
# the paper's DPT : SFT = DFT lr ratio (1e-3 : 2e-5) applied to the toy's whole-model lr (module docstring)
PROJECTOR_LR = ToyConfig.lr * round(1e-3 / 2e-5)  # init (PT) and dpt: 50 x 5e-4 = 2.5e-2
LR = {"init": PROJECTOR_LR, "dpt": PROJECTOR_LR, "sft": ToyConfig.lr, "dft": ToyConfig.lr}


def _stage(stage: str, share: float, **overrides) -> tuple:
    """(stage, share of S, TrainConfig overrides) with the stage's lr, as run_arm takes it."""
    return stage, share, {"lr": LR[stage], **overrides}


def arms() -> dict[str, list[tuple]]:
    dpt_sft = [_stage("dpt", PT), _stage("sft", SFT)]
    return {
        "pt -> sft": [_stage("init", PT), _stage("sft", SFT)],
        "pt -> dft": [_stage("init", PT), _stage("dft", SFT)],
        "dpt -> sft": dpt_sft,
        "dpt -> dft": [_stage("dpt", PT), _stage("dft", SFT)],
        "dpt -> sft -> dft": [*dpt_sft, _stage("dft", DFT)],
        "dpt (MDist only) -> sft": [_stage("dpt", PT, **MDIST_ONLY), _stage("sft", SFT)],
        "dpt (RDist only) -> sft": [_stage("dpt", PT, **RDIST_ONLY), _stage("sft", SFT)],
        "dpt -> sft -> dft (MDist only)": [*dpt_sft, _stage("dft", DFT, **MDIST_ONLY)],
        "dpt -> sft -> dft (RDist only)": [*dpt_sft, _stage("dft", DFT, **RDIST_ONLY)],
        "pt -> sft (3S/4)": [_stage("init", PT), _stage("sft", SFT + DFT)],
    }


# (paper table, comparison, (reference arm, paper row, paper AVG), (treatment arm, paper row, paper AVG)).
# Table 2's AVG column as printed. Table 3's DPT rows: its appendix Table A1 (MDist 55.1, RDist 55.5, both
# 55.6 = Table 2's DPT+SFT); its DFT rows (Table A2) did not survive in our copy of the paper, whose text says
# only "using MDist alone is more effective than using RDist alone" and that both together are best (57.9):
# None marks a value we do not have, and the direction is then the text's.
COMPARISONS = [
    ("Table 2", "DPT+SFT+DFT vs PT+SFT", ("pt -> sft", "PT+SFT", 54.7), ("dpt -> sft -> dft", "DPT+SFT+DFT", 57.9)),
    ("Table 2", "DPT+SFT vs PT+SFT", ("pt -> sft", "PT+SFT", 54.7), ("dpt -> sft", "DPT+SFT", 55.6)),
    ("Table 2", "PT+DFT vs PT+SFT", ("pt -> sft", "PT+SFT", 54.7), ("pt -> dft", "PT+DFT", 55.8)),
    ("Table 2", "DPT+SFT+DFT vs DPT+DFT", ("dpt -> dft", "DPT+DFT", 55.9), ("dpt -> sft -> dft", "DPT+SFT+DFT", 57.9)),
    ("Table 3 (DPT)", "RDist vs MDist in DPT, then SFT", ("dpt (MDist only) -> sft", "MDist", 55.1),
     ("dpt (RDist only) -> sft", "RDist", 55.5)),
    ("Table 3 (DPT)", "MDist+RDist vs MDist in DPT, then SFT", ("dpt (MDist only) -> sft", "MDist", 55.1),
     ("dpt -> sft", "MDist+RDist", 55.6)),
    ("Table 3 (DPT)", "MDist+RDist vs RDist in DPT, then SFT", ("dpt (RDist only) -> sft", "RDist", 55.5),
     ("dpt -> sft", "MDist+RDist", 55.6)),
    ("Table 3 (DFT)", "MDist vs RDist in DFT", ("dpt -> sft -> dft (RDist only)", "RDist", None),
     ("dpt -> sft -> dft (MDist only)", "MDist", None)),
    ("Table 3 (DFT)", "MDist+RDist vs MDist in DFT", ("dpt -> sft -> dft (MDist only)", "MDist", None),
     ("dpt -> sft -> dft", "MDist+RDist", 57.9)),
    ("not in the paper", "DPT+SFT+DFT vs PT+SFT at equal total steps", ("pt -> sft (3S/4)", "", None),
     ("dpt -> sft -> dft", "", None)),
]
PAPER_DIRECTION = {  # comparisons whose paper values we lack: +1 if the paper says the treatment is better
    "MDist vs RDist in DFT": 1, "MDist+RDist vs MDist in DFT": 1}
METRIC = "EM overall"


def llava_kd(teacher: Path, student: Path, cache: Path, world: Path, out: Path, steps: int, seeds: int,
             limit: int | None = None, log=print) -> dict:
    """Trains and evaluates every arm for seeds 0..seeds-1, the seeds side by side (one process per core:
    parallel.py); writes results.json and report.md."""
    out.mkdir(parents=True, exist_ok=True)
    results, _ = seeds_side_by_side("llava-kd", arms(), student, cache, world, out, steps, seeds, limit, log)
    results = {"teacher": [{**evaluate(teacher, world, limit), **parameters(teacher)}], **results}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(report(results, steps))
    return results


def paired(results: dict[str, list[dict]], reference: str, treatment: str) -> tuple[float, float, int]:
    value = SEED_COLUMNS[METRIC]
    diffs = [value(t) - value(r) for r, t in zip(results[reference], results[treatment])]
    mean = sum(diffs) / len(diffs)
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)) if len(diffs) > 1 else float("nan")
    return mean, std, len(diffs)


def report(results: dict[str, list[dict]], steps: int) -> str:
    n_seeds = len(results["pt -> sft"])
    lines = [f"# LLaVA-KD's ablations on the toy world (S = {steps} steps, {n_seeds} seed(s))", "",
             f"Stage lrs: PT and DPT {LR['dpt']:g}, SFT and DFT {LR['sft']:g} (the paper's DPT : SFT ratio, 50, "
             f"from the toy's lr); batch {TOY_TRAINING['batch_size']} in every stage.", "",
             "## Every arm (mean ± std over seeds)", "", seeds_table(results), "",
             "## The paper's comparisons (metric: EM overall; paper: 10-benchmark AVG)", "",
             "| paper | comparison | paper: reference -> treatment | ours: reference -> treatment | "
             "ours: treatment - reference (paired) | verdict |", "|---|---|---|---|---|---|"]
    value = SEED_COLUMNS[METRIC]
    for table, what, (ref, ref_row, ref_paper), (treat, treat_row, treat_paper) in COMPARISONS:
        means = [sum(value(r) for r in results[arm]) / len(results[arm]) for arm in (ref, treat)]
        mean, std, n = paired(results, ref, treat)
        noise = n > 1 and abs(mean) < 2 * std / math.sqrt(n)
        if ref_paper is not None and treat_paper is not None:
            paper, direction = f"{ref_row} {ref_paper} -> {treat_row} {treat_paper}", treat_paper - ref_paper
        elif what in PAPER_DIRECTION:
            paper = (f"{ref_row} {ref_paper or '?'} -> {treat_row} {treat_paper or '?'} "
                     "(text: treatment better)")
            direction = PAPER_DIRECTION[what]
        else:
            paper, direction = "not measured", None
        if direction is None:
            verdict = "n/a" + (" (within noise)" if noise else "")
        elif n < 2:
            verdict = ("agrees" if direction * mean > 0 else "disagrees") + " (one seed: no noise estimate)"
        elif noise:
            verdict = "within noise"
        else:
            verdict = "agrees" if direction * mean > 0 else "**disagrees**"
        lines.append(f"| {table} | {what} | {paper} | {ref} {means[0]:.3f} -> {treat} {means[1]:.3f} | "
                     f"{mean:+.3f} ± {std:.3f} | {verdict} |")
    return "\n".join(lines) + "\n"
