"""`mod-student`: train the student from the cache alone, and evaluate it on the toy world.

    mod-student train --stage d2s --cache cache/ --student runs/d2d/final --out runs/d2s
    mod-student train --stage pd --cache cache/ --student runs/d2s/final --out runs/pd [--pref-loss dpo]
    mod-student eval runs/d2s/final --world ~/.cache/modkd/toy/world

Thin: options are layered (the stage's recipe in pipelines/recipes/, then --config FILE, then the
flags given, then each --set key=value) into a TrainConfig, printed whole, and handed to the trainer.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import typer
import yaml

from modkd.pipelines.recipe import recipe
from modkd.store import Cache, CacheError
from modkd.student.config import PREFERENCE_LOSSES, STAGES, TrainConfig
from modkd.student.routing import ROUTINGS

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])


def parse_set(items: list[str]) -> dict:
    """key=value pairs, each value read as its key's type: float and int keys by Python (YAML reads 5e-4 as a
    string), string keys as the text given (YAML reads mixed_precision=no as False), the rest as YAML scalars
    (true -> bool, null -> None)."""
    out = {}
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in types:
            raise typer.BadParameter(f"--set {item!r}: expected key=value with key one of {sorted(types)}")
        parse = {"float": float, "int": int, "str": str}.get(types[key], yaml.safe_load)
        try:
            out[key] = parse(value)
        except ValueError:
            raise typer.BadParameter(f"--set {item!r}: {key} takes a {types[key]}") from None
    return out


def build_config(stage: str, paths: dict, flags: dict, config_file: Path | None, sets: list[str]) -> TrainConfig:
    if stage not in STAGES:
        raise typer.BadParameter(f"--stage must be one of {', '.join(STAGES)}")
    values = recipe(stage)
    if config_file is not None:
        loaded = yaml.safe_load(config_file.read_text()) or {}
        unknown = sorted(set(loaded) - TrainConfig.keys())
        if unknown:
            raise typer.BadParameter(f"{config_file}: unknown keys {unknown}")
        values.update(loaded)
    values.update({k: v for k, v in flags.items() if v is not None})
    values.update(parse_set(sets))
    return TrainConfig(stage=stage, **paths, **values)


@app.command()
def train(
    stage: str = typer.Option(..., help=f"{' | '.join(STAGES)}"),
    cache: Path = typer.Option(..., exists=True, file_okay=False, help="cache written by mod-extract"),
    student: str = typer.Option(..., help="LLaVA student: local HF directory or hub id (d2s upcycles a dense one)"),
    out: Path = typer.Option(..., help="run directory; a rerun into it resumes from its newest checkpoint"),
    image_root: Path = typer.Option(None, exists=True, file_okay=False, help="default: the root recorded at extraction"),
    max_steps: int = typer.Option(None, min=1, help="optimizer steps (recipe default)"),
    batch_size: int = typer.Option(None, min=1, help="records per micro-batch per process"),
    global_batch: int = typer.Option(None, min=1, help="records per optimizer step over all processes (recipe: Table 10)"),
    grad_accum: int = typer.Option(None, min=1, help="micro-batches per step (default: global batch / (batch x processes))"),
    lr: float = typer.Option(None, help="peak learning rate (recipe: Table 10)"),
    seed: int = typer.Option(None),
    save_every: int = typer.Option(None, min=1, help="optimizer steps between checkpoints"),
    experts: int = typer.Option(None, min=1, help="d2s: experts per upcycled FFN (default 4)"),
    top_k_experts: int = typer.Option(None, min=1, help="d2s: experts per token (default 2)"),
    routing: str = typer.Option(None, help=f"d2s: {' | '.join(ROUTINGS)} (default topk)"),
    online_teacher: str = typer.Option(None, help="comparison mode: load this teacher and distil its full distribution"),
    pref_loss: str = typer.Option(None, help=f"pd: {' | '.join(PREFERENCE_LOSSES)} (default kto)"),
    pref_beta: float = typer.Option(None, help="pd: KTO / DPO beta (default 0.1)"),
    config: Path = typer.Option(None, exists=True, dir_okay=False, help="YAML file of TrainConfig keys"),
    set_: list[str] = typer.Option([], "--set", help="key=value override of any TrainConfig key (repeatable)"),
):
    """Train one stage (init | sft | d2d | d2s | pd) from the cache; writes OUT/final in HF format."""
    from modkd.student.trainer import TrainingDiverged, train as run_training

    flags = dict(max_steps=max_steps, batch_size=batch_size, global_batch=global_batch, grad_accum=grad_accum, lr=lr,
                 seed=seed, save_every=save_every, experts=experts, top_k_experts=top_k_experts, routing=routing,
                 online_teacher=online_teacher, pref_loss=pref_loss, pref_beta=pref_beta)
    try:
        if image_root is None:  # the root recorded at extraction (Cache.open also checks the cache is complete)
            opened = Cache.open(cache)
            manifest = opened.preference_manifest if stage == "pd" else opened.manifest
            image_root = (manifest or {}).get("image_root")
        paths = dict(cache=cache, student=student, out=out, image_root=image_root)
        cfg = build_config(stage, paths, flags, config, set_)
        typer.echo(f"mod-student config: {json.dumps(cfg.to_json())}")
        final = run_training(cfg)
    except (CacheError, ValueError, TrainingDiverged) as err:  # bad input or a diverged run: the message says it all
        typer.echo(f"mod-student train: {err}", err=True)
        raise typer.Exit(2 if not isinstance(err, TrainingDiverged) else 1) from None
    typer.echo(f"done: {final} (TensorBoard: tensorboard --logdir {out})")


@app.command(name="eval")
def evaluate_cmd(
    model: Path = typer.Argument(..., exists=True, file_okay=False, help="a saved student (or teacher) directory"),
    world: Path = typer.Option(None, help="toy world directory (default: the built-in toy world)"),
    out: Path = typer.Option(None, help="JSON results file (default: MODEL/eval.json)"),
    limit: int = typer.Option(None, min=1, help="evaluate only the first N records of each split"),
):
    """Per-task exact match, POPE F1 and CHAIR-style hallucination on the toy world's evaluation splits."""
    from modkd.pipelines.toyworld.build import ToyConfig, toy_root
    from modkd.pipelines.toyworld.evaluate import evaluate
    from modkd.pipelines.toyworld.report import comparison_table, parameters
    from modkd.pipelines.toyworld.world import world_paths

    world = world or toy_root(ToyConfig()) / "world"
    if not world_paths(world)["eval_qa"].is_file():
        raise typer.BadParameter(f"{world} is not a toy world (no eval/qa.jsonl); build it with `mod-pipeline toy`")
    results = {**evaluate(model, world, limit), **parameters(model)}
    out = out or model / "eval.json"
    out.write_text(json.dumps(results, indent=1))
    typer.echo(comparison_table({model.name: results}))
    typer.echo(f"results: {out}")


def main():
    app()
