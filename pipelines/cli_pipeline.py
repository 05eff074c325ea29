"""`mod-pipeline demo`: the whole offline pipeline on the built-in toy world, on CPU, nothing downloaded.

    mod-pipeline demo --out runs/demo          # teacher, one extraction, SFT baseline, init -> d2d -> d2s -> pd, eval
    mod-pipeline demo --smoke                  # the same at CI size, under 2 minutes
    mod-pipeline toy                           # only build (or reuse) the toy world and the trained toy teacher
    mod-pipeline reproduce --out runs/reproduce  # LLaVA-MoD's ablations, 3 seeds, the paper's numbers beside ours
    mod-pipeline kd-vs-sft --out runs/kd-vs-sft  # KD against SFT at equal steps from one cache (LLaVA-MoD Table 5)
    mod-pipeline mimic-vs-pd --out runs/mimic-vs-pd  # d2s against d2s + pd (kto, dpo), 3 seeds (Tables 4, 15-16)
    mod-pipeline llava-kd --out runs/llava-kd  # LLaVA-KD: PT/DPT -> SFT -> DFT and its ablations (Tables 2-3), 3 seeds
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer

from modkd.pipelines.toyworld.build import BIG, STUDENT_LLMS, ToyConfig, build_toy, student_init, toy_cache
from modkd.pipelines.toyworld.compare import kd_vs_sft as run_kd_vs_sft, mimic_vs_pd as run_mimic_vs_pd
from modkd.pipelines.toyworld.demo import DEMO, DEMO_STEPS, TRANSFER_IMAGES, demo as run_demo
from modkd.pipelines.toyworld.report import comparison_table, seeds_table

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
SMOKE = ToyConfig(n_train_images=48, n_eval_images=8, n_pref=8, steps=30, student_llm_steps=20)  # exercises every step, proves nothing about quality


# the command's start, inherited by the processes it spawns (toyworld/parallel.py), so their lines count from it too
_START = float(os.environ.setdefault("MODKD_PIPELINE_START", str(time.time())))


def _log(msg: str) -> None:
    typer.echo(f"[{time.time() - _START:6.0f}s] {msg}")


def _prepared(cfg: ToyConfig, out: Path, llm: str = "pretrained"):
    """(toy world + teacher, student init, the one cache under OUT/cache), each built once and reused."""
    if llm not in STUDENT_LLMS:
        raise typer.BadParameter(f"--student-llm must be one of {', '.join(STUDENT_LLMS)}")
    toy = build_toy(cfg, log=_log)
    return toy, student_init(toy, llm, log=_log), toy_cache(toy, out / "cache", log=_log)


STUDENT_LLM_HELP = "pretrained: LM on the world's text, as the papers' students (default); random: the control"


@app.command()
def toy(smoke: bool = typer.Option(False, help="CI-sized world and a few training steps"),
        train: bool = typer.Option(False, help="train the teacher here from its seed instead of copying the pre-built one")):
    """Build (or reuse) the toy world, tokenizer and trained toy teacher under $MODKD_HOME."""
    t = build_toy(SMOKE if smoke else ToyConfig(), log=_log, train=train)
    _log(f"toy world: {t.world}\ntoy teacher: {t.teacher} (preset `toy-teacher` for the default config)")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="cache, runs (checkpoints, TensorBoard), plots, results"),
    smoke: bool = typer.Option(False, help="CI-sized world and a few training steps: checks the plumbing only"),
    steps: int = typer.Option(DEMO_STEPS, min=10, help="student steps S per arm (init + sft + sft-moe, or init + d2d + d2s)"),
    student_llm: str = typer.Option("pretrained", help=STUDENT_LLM_HELP),
    seeds: int = typer.Option(1, min=1, help="train both arms from seeds 0..N-1 and judge the effect over them "
                                             "(each extra seed adds ~3 min on 2 cores)"),
):
    """Toy world -> teacher -> one extraction -> SFT baseline and init -> d2d -> d2s -> pd -> evaluation -> plots."""
    if student_llm not in STUDENT_LLMS:
        raise typer.BadParameter(f"--student-llm must be one of {', '.join(STUDENT_LLMS)}")
    summary = run_demo(SMOKE if smoke else DEMO, out, 20 if smoke else steps, 16 if smoke else None, llm=student_llm,
                       transfer=None if smoke else TRANSFER_IMAGES, seeds=seeds, log=_log)
    typer.echo("\n" + comparison_table(summary["results"]) + "\n\n" + "\n".join(summary["effect"]))
    typer.echo(f"\nresults:     {out / 'results.json'}, {out / 'report.md'}\n"
               f"cache:       {summary['cache']} (mod-store inspect / verify)\n"
               f"checkpoints: {summary['runs']}/*/checkpoints, final models in {summary['runs']}/*/final\n"
               f"TensorBoard: tensorboard --logdir {summary['runs']}\n"
               f"plots:       {summary['plot']}")


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
    toy, student, cache = _prepared(SMOKE if smoke else BIG if teacher == "big" else ToyConfig(), out)
    results = run_kd_vs_sft(toy.teacher, student, cache, toy.world, out, steps, seed, 16 if smoke else None, log=_log)
    typer.echo("\n" + comparison_table(results) + f"\n\nresults: {out / 'results.json'}, {out / 'report.md'}")


@app.command(name="mimic-vs-pd")
def mimic_vs_pd(
    out: Path = typer.Option(Path("runs/mimic-vs-pd"), help="cache, runs, results.json and report.md"),
    steps: int = typer.Option(2000, min=2, help="mimic steps (d2d then d2s, half each)"),
    pd_steps: int = typer.Option(200, min=1, help="pd steps after d2s (batch 32: 19 steps = one epoch of the 600 pairs)"),
    seeds: int = typer.Option(3, min=1, help="seeds 0..N-1"),
    smoke: bool = typer.Option(False, help="CI-sized world, a few steps: checks the plumbing only"),
):
    """d2d -> d2s against d2d -> d2s -> pd with KTO and with DPO, teacher-free, over seeds; mean and std."""
    toy, student, cache = _prepared(SMOKE if smoke else ToyConfig(), out)
    results = run_mimic_vs_pd(toy.teacher, student, cache, toy.world, out, steps, seeds, pd_steps,
                              16 if smoke else None, log=_log)
    typer.echo("\n" + seeds_table(results) + f"\n\nresults: {out / 'results.json'}, {out / 'report.md'}")


@app.command()
def reproduce(
    out: Path = typer.Option(Path("runs/reproduce"), help="cache, seed*/runs, results.json, report.md, plots/"),
    steps: int = typer.Option(1000, min=2, help="mimic steps S per arm (d2d S/2 + d2s S/2); pd adds one epoch of the pairs"),
    seeds: int = typer.Option(3, min=1, help="seeds 0..N-1"),
    smoke: bool = typer.Option(False, help="CI-sized world, a few steps: checks the plumbing only"),
    student_llm: str = typer.Option("pretrained", help=STUDENT_LLM_HELP),
):
    """LLaVA-MoD's ablations (Tables 4-8, 12-16) and offline vs online KD on the toy world, from one cache."""
    from modkd.pipelines.toyworld.reproduce import reproduce as run_reproduce

    toy, student, cache = _prepared(SMOKE if smoke else ToyConfig(), out, student_llm)
    run_reproduce(toy.teacher, student, cache, toy.world, out, steps, seeds, 16 if smoke else None, log=_log)
    typer.echo("\n" + (out / "report.md").read_text() + f"\nresults: {out / 'results.json'}, {out / 'report.md'}")


@app.command(name="llava-kd")
def llava_kd(
    out: Path = typer.Option(Path("runs/llava-kd"), help="cache, seed*/runs, results.json, report.md"),
    steps: int = typer.Option(400, min=4, help="S: PT/DPT S/4, SFT S/2, DFT S/4 steps per arm"),
    seeds: int = typer.Option(3, min=1, help="seeds 0..N-1"),
    smoke: bool = typer.Option(False, help="CI-sized world, a few steps: checks the plumbing only"),
):
    """LLaVA-KD's three-stage scheme (DPT -> SFT -> DFT) against PT -> SFT and its MDist / RDist ablations,
    teacher-free from the toy world's one cache (image positions and relation matrices included)."""
    from modkd.pipelines.toyworld.llava_kd import llava_kd as run_llava_kd

    toy, student, cache = _prepared(SMOKE if smoke else ToyConfig(), out)
    run_llava_kd(toy.teacher, student, cache, toy.world, out, steps, seeds, 16 if smoke else None, log=_log)
    typer.echo("\n" + (out / "report.md").read_text() + f"\nresults: {out / 'results.json'}, {out / 'report.md'}")


def main():
    app()
