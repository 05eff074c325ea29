"""`mod-pipeline llava-kd --smoke`: LLaVA-KD's ablation arms end to end at CI size (plumbing, not quality).

    pytest tests/test_llava_kd_pipeline.py -q
"""

from __future__ import annotations

import json

import pytest

from typer.testing import CliRunner

from modkd.pipelines.cli_pipeline import app
from modkd.pipelines.recipe import recipe
from modkd.pipelines.toyworld.build import ToyConfig
from modkd.pipelines.toyworld.llava_kd import COMPARISONS, LR, arms
from modkd.store import Cache


def test_llava_kd_smoke_trains_every_arm_from_one_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MODKD_HOME", str(tmp_path / "home"))
    out = tmp_path / "kd"
    result = CliRunner().invoke(app, ["llava-kd", "--smoke", "--seeds", "1", "--steps", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["teacher", *arms()] and all(len(results[a]) == 1 for a in arms())
    settings = Cache.open(out / "cache").manifest["settings"]
    assert settings["positions"] == "all" and settings["relation"] == "logits"  # one cache serves every arm
    report = (out / "report.md").read_text()
    assert all(what in report for _, what, _, _ in COMPARISONS)
    first_dpt = sorted((out / "seed0" / "runs").glob("*-dpt"))[0]  # the full dpt (the ablations' come later)
    metrics = [json.loads(line) for line in (first_dpt / "metrics.jsonl").read_text().splitlines()]
    assert all("loss/vis" in m and "loss/rel" in m for m in metrics)
    trained = [(run.name.split("-", 1)[1], json.loads((run / "train_config.json").read_text())["lr"])
               for run in (out / "seed0" / "runs").iterdir()]  # (stage, the lr it trained at) per run
    assert {stage for stage, _ in trained} == set(LR) and all(lr == LR[stage] for stage, lr in trained)


def test_each_stage_trains_at_its_own_lr_in_the_papers_ratio():
    """llava-kd Sec. 4.1: DPT 1e-3 (projector only), SFT and DFT 2e-5 (projector + LLM): the toy keeps that ratio
    from its own whole-model lr, which the full-model stages keep."""
    assert LR["sft"] == LR["dft"] == ToyConfig.lr
    assert LR["init"] == LR["dpt"] == pytest.approx(ToyConfig.lr * recipe("dpt")["lr"] / recipe("dft")["lr"])
    assert LR["dpt"] > LR["sft"]
    for stages in arms().values():
        assert all(overrides["lr"] == LR[stage] for stage, _, overrides in stages)
