"""`mod-pipeline demo`: the whole offline pipeline on the built-in toy world, on CPU, nothing downloaded.

    mod-pipeline demo --out runs/demo          # toy world + teacher (cached), SFT baseline, eval, extraction, inspect
    mod-pipeline demo --smoke                  # the same at CI size, under 2 minutes
    mod-pipeline toy                           # only build (or reuse) the toy world and the trained toy teacher
    mod-pipeline kd-vs-sft --out runs/kd-vs-sft  # KD against SFT at equal steps from one cache (LLaVA-MoD Table 5)
    mod-pipeline mimic-vs-pd --out runs/mimic-vs-pd  # d2s against d2s + pd (kto, dpo), 3 seeds (Tables 4, 15-16)

Still to come (issue 6): the distilled student stages (init, d2d, d2s, pd) inside the demo; until then
`mod-pipeline kd-vs-sft` runs them against SFT from one cache.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from modkd.extract.run import ExtractConfig, run as extract
from modkd.pipelines.cli_store import inspect as inspect_cache
from modkd.pipelines.toyworld.build import BIG, ToyConfig, build_toy, student_init, student_sft
from modkd.pipelines.toyworld.compare import kd_vs_sft as run_kd_vs_sft, mimic_vs_pd as run_mimic_vs_pd
from modkd.pipelines.toyworld.evaluate import evaluate
from modkd.pipelines.toyworld.report import comparison_table, parameters, seeds_table
from modkd.store import Cache

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
SMOKE = ToyConfig(n_train_images=48, n_eval_images=8, n_pref=8, steps=30)  # exercises every step, proves nothing about quality


_START = time.monotonic()


def _log(msg: str) -> None:
    typer.echo(f"[{time.monotonic() - _START:6.0f}s] {msg}")


@app.command()
def toy(smoke: bool = typer.Option(False, help="CI-sized world and a few training steps")):
    """Build (or reuse) the toy world, tokenizer and trained toy teacher under $MODKD_HOME."""
    t = build_toy(SMOKE if smoke else ToyConfig(), log=_log)
    _log(f"toy world: {t.world}\ntoy teacher: {t.teacher} (preset `toy-teacher` for the default config)")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="where the cache and results go"),
    smoke: bool = typer.Option(False, help="CI-sized world and a few training steps: checks the plumbing only"),
    shards: int = typer.Option(8, min=1),
):
    """Toy world -> trained teacher -> plain-SFT student baseline -> evaluation -> one extraction -> inspect."""
    cfg = SMOKE if smoke else ToyConfig()
    _log(f"demo config: {json.dumps(cfg.__dict__)}")
    _log("[1/5] toy world and toy teacher")
    toy = build_toy(cfg, log=_log)
    _log("[2/5] small student trained by plain SFT on the same data and steps (the baseline to beat)")
    sft = student_sft(toy, log=_log)
    _log("[3/5] evaluating on held-out images (greedy decoding)")
    limit = None if not smoke else 16
    results = {name: {**evaluate(path, toy.world, limit), **parameters(path)}
               for name, path in (("teacher", toy.teacher), ("student (SFT)", sft))}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _log(f"[4/5] extracting the teacher's top-20 log-probs over every position into {out / 'cache'}")
    summary = extract(ExtractConfig(teacher=str(toy.teacher), data=toy.world / "train.jsonl", out=out / "cache",
                                    image_root=toy.world, shards=shards, top_k=20, positions="all"))
    totals = summary["manifest"]["totals"]
    _log(f"      {totals['records_written']} records, {totals['positions']} positions, {totals['bytes']} bytes")
    _log("[5/5] the cache")
    inspect_cache(out / "cache", as_json=False)
    typer.echo("\n" + comparison_table(results))
    typer.echo(f"\nresults: {out / 'results.json'}\ncache:   {out / 'cache'} (mod-store inspect / verify)\n"
               f"teacher: {toy.teacher}\nSFT student: {sft}")


@app.command(name="kd-vs-sft")
def kd_vs_sft(
    out: Path = typer.Option(Path("runs/kd-vs-sft"), help="cache, runs, results.json and report.md"),
    steps: int = typer.Option(2000, min=2, help="optimizer steps per arm (batch 32, lr 5e-4)"),
    seed: int = typer.Option(0),
    teacher: str = typer.Option("small", help="small: the demo's toy teacher; big: 6 x 192, trained once (~30 min)"),
    smoke: bool = typer.Option(False, help="CI-sized world, a few steps: checks the plumbing only"),
):
    """Train the student four ways from one cache (SFT, SFT -> SFT-MoE, d2d -> d2s, d2d -> d2s with CE) and compare."""
    if teacher not in ("small", "big"):
        raise typer.BadParameter("--teacher must be small or big")
    toy = build_toy(SMOKE if smoke else BIG if teacher == "big" else ToyConfig(), log=_log)
    student = student_init(toy, log=_log)
    cache = out / "cache"
    if not (cache / "manifest.json").is_file():
        _log(f"extracting the teacher's top-20 log-probs over every position into {cache}")
        extract(ExtractConfig(teacher=str(toy.teacher), data=toy.world / "train.jsonl", out=cache,
                              image_root=toy.world, shards=8, top_k=20, positions="all"))
    results = run_kd_vs_sft(toy.teacher, student, cache, toy.world, out, steps, seed, 16 if smoke else None, log=_log)
    typer.echo("\n" + comparison_table(results) + f"\n\nresults: {out / 'results.json'}, {out / 'report.md'}")


@app.command(name="mimic-vs-pd")
def mimic_vs_pd(
    out: Path = typer.Option(Path("runs/mimic-vs-pd"), help="cache, runs, results.json and report.md"),
    steps: int = typer.Option(2000, min=2, help="mimic steps (d2d then d2s, half each); pd adds a tenth of it"),
    seeds: int = typer.Option(3, min=1, help="seeds 0..N-1"),
    smoke: bool = typer.Option(False, help="CI-sized world, a few steps: checks the plumbing only"),
):
    """d2d -> d2s against d2d -> d2s -> pd with KTO and with DPO, teacher-free, over seeds; mean and std."""
    toy = build_toy(SMOKE if smoke else ToyConfig(), log=_log)
    student = student_init(toy, log=_log)
    cache = out / "cache"
    settings = dict(teacher=str(toy.teacher), out=cache, image_root=toy.world, shards=8)
    if not (cache / "manifest.json").is_file():
        _log(f"extracting the teacher's top-20 log-probs over every position into {cache}")
        extract(ExtractConfig(data=toy.world / "train.jsonl", top_k=20, positions="all", **settings))
    if Cache.open(cache).preference_manifest is None:
        _log(f"extracting the teacher's reference log-probs of the world's preference pairs into {cache}/preference")
        extract(ExtractConfig(data=toy.world / "pref.jsonl", **{**settings, "shards": 2}))
    results = run_mimic_vs_pd(toy.teacher, student, cache, toy.world, out, steps, seeds, 16 if smoke else None, log=_log)
    typer.echo("\n" + seeds_table(results) + f"\n\nresults: {out / 'results.json'}, {out / 'report.md'}")


def main():
    app()
