"""mod-pipeline kd-vs-sft --out runs/kd-vs-sft [--steps 2000]; mod-pipeline mimic-vs-pd --out runs/mimic-vs-pd [--pd-steps 200]

KD against SFT on the toy world, from ONE cache, same student init, data, batches and total steps:

  sft              dense student, CE on response tokens, all steps (projector + LLM)
  sft -> sft-moe   half the steps dense SFT, then upcycled to E4T2 with CE only (LLaVA-MoD Table 5's SFT row)
  d2d -> d2s       half the steps d2d (KL), then upcycled to E4T2 with KL + CE + aux (LLaVA-MoD's mimic
                   distillation; Table 5's KD row)
  d2d -> d2s(sft)  the same d2d student, then E4T2 with CE only: the d2s stage's loss alone changed

Mimic against mimic + preference distillation (LLaVA-MoD Table 4; KTO vs DPO as Tables 15-16), seeds 0..n-1:

  d2d -> d2s               as above
  d2d -> d2s -> pd (kto)   then preference distillation on the world's pairs, the teacher as reference
  d2d -> d2s -> pd (dpo)   the same with DPO

Each arm is trained by the real trainer (`modkd.student.trainer.train`) and evaluated with
`toyworld.evaluate`; the results (JSON) and a markdown table are written to --out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from modkd.pipelines.recipe import stage_config
from modkd.store import Cache
from modkd.student.trainer import train

from .build import ToyConfig
from .evaluate import evaluate
from .parallel import in_parallel
from .report import comparison_table, parameters, seeds_table

# arm -> its stages in order: (stage, share of the total steps, TrainConfig overrides)
ARMS = {
    "sft": [("sft", 1.0, {})],
    "sft -> sft-moe": [("sft", 0.5, {}), ("d2s", 0.5, {"kd_weight": 0.0})],
    "d2d -> d2s": [("d2d", 0.5, {}), ("d2s", 0.5, {})],
    "d2d -> d2s(sft)": [("d2d", 0.5, {}), ("d2s", 0.5, {"kd_weight": 0.0})],
}
def pd_arms(pd_steps: int, steps: int) -> dict[str, list[tuple]]:
    """d2d -> d2s, and the same followed by `pd_steps` of pd with KTO and with DPO (mimic-vs-pd's arms)."""
    pd = pd_steps / steps  # run_arm trains round(share * steps) steps
    return {"d2d -> d2s": ARMS["d2d -> d2s"],
            "d2d -> d2s -> pd (kto)": [*ARMS["d2d -> d2s"], ("pd", pd, {"pref_loss": "kto"})],
            "d2d -> d2s -> pd (dpo)": [*ARMS["d2d -> d2s"], ("pd", pd, {"pref_loss": "dpo"})]}


# the toy teacher's own batch and lr (ToyConfig explains why 5e-4), one micro-batch per step
TOY_TRAINING = dict(batch_size=ToyConfig.batch_size, grad_accum=1, lr=ToyConfig.lr)
TOY_PD_LR = ToyConfig.lr / 10  # Table 10: preference distillation's lr is a tenth of mimic distillation's


def pd_epoch_steps(cache: Path) -> int:
    """Optimizer steps of one epoch over the cache's preference pairs at the toy batch: LLaVA-MoD trains pd for
    one epoch, and on the toy ~5 epochs (100 steps) collapse every caption to the most popular object."""
    return max(1, math.ceil(Cache.open(cache).num_preference_records / TOY_TRAINING["batch_size"]))


def run_arm(label: str, stages: list[tuple], student: Path, cache: Path, image_root: Path, out: Path, steps: int,
            seed: int, done: dict[tuple, Path], log=print, number_from: int = 0) -> list[Path]:
    """Trains `stages` (stage, share of `steps`, overrides) in order from `student`; returns each stage's final
    model. A chain prefix already in `done` (same start, same stages) is reused, not retrained. Run directories
    are numbered from number_from + len(done) (arms trained side by side each pass their own)."""
    current, prefix, finals = student, (str(student),), []
    for stage, share, overrides in stages:
        prefix = (*prefix, (stage, share, tuple(sorted(overrides.items()))))
        if prefix not in done:
            run_dir = out / "runs" / f"{number_from + len(done):02d}-{stage}"
            cfg = stage_config(stage, cache=cache, student=str(current), out=run_dir, image_root=image_root,
                               max_steps=max(1, round(share * steps)), seed=seed, save_every=steps,
                               **{**TOY_TRAINING, **({"lr": TOY_PD_LR} if stage == "pd" else {}), **overrides})
            log(f"[train] {label}, seed {seed}: {stage} for {cfg.max_steps} steps from {current}")
            done[prefix] = train(cfg, log=log)
        current = done[prefix]
        finals.append(current)
    return finals


def seeds_side_by_side(label: str, chains: dict[str, list[tuple]], student: Path, cache: Path, world: Path, out: Path,
                       steps: int, seeds: int, limit: int | None = None, log=print) -> tuple[dict[str, list[dict]], list[dict]]:
    """Every arm of `chains` for seeds 0..seeds-1, the seeds side by side (one process per core: parallel.py):
    (arm -> its evaluation per seed, each seed's results as one_seed returns them)."""
    per_seed = in_parallel([(one_seed, (label, chains, student, cache, world, out, steps, seed, limit), {"log": log})
                            for seed in range(seeds)])
    results: dict[str, list[dict]] = {}
    for seed_results in per_seed:
        for name, result in seed_results.items():
            results.setdefault(name, []).append(result)
    return results, per_seed


def one_seed(label: str, chains: dict[str, list[tuple]], student: Path, cache: Path, world: Path, out: Path, steps: int,
             seed: int, limit: int | None = None, log=print) -> dict[str, dict]:
    """Every arm of one seed, trained and evaluated in order (arms sharing a prefix train it once): arm -> its
    evaluation, with its stages' final models. seed{seed}/results.json is rewritten after every arm, so a run cut
    short keeps what it finished."""
    done: dict[tuple, Path] = {}
    results: dict[str, dict] = {}
    for name, stages in chains.items():
        finals = run_arm(name, stages, student, cache, world, out / f"seed{seed}", steps, seed, done, log)
        log(f"[{label}] seed {seed}: evaluating {name}")
        results[name] = {**evaluate(finals[-1], world, limit), **parameters(finals[-1]), "model": str(finals[-1]),
                         "finals": [str(f) for f in finals]}
        (out / f"seed{seed}" / "results.json").write_text(json.dumps(results, indent=1))
    return results


def kd_vs_sft(teacher: Path, student: Path, cache: Path, world: Path, out: Path, steps: int, seed: int = 0,
              limit: int | None = None, log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    done: dict[tuple, Path] = {}
    models = {"teacher": teacher, **{name: run_arm(name, stages, student, cache, world, out, steps, seed, done, log)[-1]
                                     for name, stages in ARMS.items()}}
    results = {}
    for name, path in models.items():
        log(f"[kd-vs-sft] evaluating {name} ({path})")
        results[name] = {**evaluate(path, world, limit), **parameters(path), "model": str(path)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(comparison_table(results) + "\n")
    return results


def mimic_vs_pd(teacher: Path, student: Path, cache: Path, world: Path, out: Path, steps: int, seeds: int,
                pd_steps: int, limit: int | None = None, log=print) -> dict:
    """pd_arms for seeds 0..seeds-1 (seed: routers, data order, jitter); results.json per seed and a summary."""
    out.mkdir(parents=True, exist_ok=True)
    results = {"teacher": [{**evaluate(teacher, world, limit), **parameters(teacher), "model": str(teacher)}]}
    for seed in range(seeds):
        done: dict[tuple, Path] = {}
        seed_out = out / f"seed{seed}"
        for name, stages in pd_arms(pd_steps, steps).items():
            path = run_arm(name, stages, student, cache, world, seed_out, steps, seed, done, log)[-1]
            log(f"[mimic-vs-pd] seed {seed}: evaluating {name} ({path})")
            results.setdefault(name, []).append({**evaluate(path, world, limit), **parameters(path), "model": str(path)})
        (out / "results.json").write_text(json.dumps(results, indent=1))  # after every seed: partial runs are kept
    (out / "report.md").write_text(seeds_table(results) + "\n")
    return results
