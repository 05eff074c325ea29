"""`mod-pipeline demo --smoke`: the main job end to end at CI size (plumbing, not quality).

    pytest tests/test_demo.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modkd.pipelines.cli_pipeline import SMOKE, app
from modkd.pipelines.toyworld.build import TOKENIZER, build_toy, toy_root
from modkd.pipelines.toyworld.demo import D2S_NAME, PD_NAME, SFT_NAME, effect_lines, seed_tag
from modkd.store import Cache


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One MODKD_HOME for the module: the smoke toy world and teacher are built by the first test, then reused."""
    return tmp_path_factory.mktemp("home")


def test_demo_smoke_runs_end_to_end(tmp_path, monkeypatch, home):
    monkeypatch.setenv("MODKD_HOME", str(home))
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--smoke", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for step in ("[1/6]", "[2/6]", "[3/6]", "[4/6]", "[5/6]", "[6/6]"):
        assert step in result.output
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["toy teacher", SFT_NAME, D2S_NAME, PD_NAME]
    distilled, sft = results[PD_NAME], results[SFT_NAME]
    assert len(sft["qa_hits"]) == len(distilled["qa_hits"]) > 0 and "distinct" in sft["chair"]
    assert distilled["params_active"] < distilled["params_total"] == sft["params_total"]  # same E4T2 architecture
    cache = Cache.open(out / "cache")
    t = cache.manifest["totals"]
    assert t["records_written"] == t["records_in"] > 0 and t["records_rejected"] == 0
    assert cache.num_preference_records > 0
    stages = [json.loads((run / "train_config.json").read_text())["stage"] for run in sorted((out / "runs").iterdir())]
    assert stages == ["init", "sft", "d2s", "d2d", "d2s", "pd"]  # the init stage is shared by both arms
    assert all(list((run / "tensorboard").rglob("events.*")) for run in (out / "runs").iterdir())
    assert (out / "plots" / "training.png").stat().st_size > 0
    for line in ("| toy teacher |", f"| {SFT_NAME} |", f"| {PD_NAME} |", "EM overall ± SE", "object recall",
                 "distinct captions", "TensorBoard:", "Distillation vs labels only", "Preference distillation"):
        assert line in result.output
    assert result.output.count("-> shows the effect") + result.output.count("-> does NOT show the effect") == 2
    init = json.loads((toy_root(SMOKE) / "student-init-pretrained" / "student_init.json").read_text())
    assert init == {"llm": "pretrained", "tokenizer": TOKENIZER, "student_llm_steps": SMOKE.student_llm_steps}  # the pretrained LLM is the default
    messages = []
    build_toy(SMOKE, log=messages.append)
    assert any("teacher: reusing" in m for m in messages)  # trained once, then cached


def _fake(hits: list[int], chair_s: float, distinct: int) -> dict:
    em = sum(hits) / len(hits)
    return {"qa_hits": hits, "exact_match": {t: em for t in ("count", "colour", "position", "exist", "text", "overall")},
            "chair": {"chair_s": chair_s, "chair_i": 0.0, "recall": 0.5, "objects": 1.0, "distinct": distinct}}


def test_effect_over_seeds_is_the_mean_paired_difference_with_the_larger_standard_error():
    n = 400
    base = [i % 2 for i in range(n)]  # EM 0.5
    lifts = [0.10, 0.10, 0.10]  # each seed's distilled student answers 40 more probes right
    results = {}
    for seed, lift in enumerate(lifts):
        better = [1 if i % 2 or i < 2 * int(lift * n) else 0 for i in range(n)]
        tag = seed_tag(seed, 3)
        results |= {SFT_NAME + tag: _fake(base, 0.5, 50), D2S_NAME + tag: _fake(better, 0.5, 50),
                    PD_NAME + tag: _fake(better, 0.4, 45)}
    lines = effect_lines(results, 100, 10, seeds=3)
    # identical seeds: no spread, so the probes' noise is the standard error: sqrt(3 se^2) / 3
    se = (0.1 * 0.9 / (n - 1)) ** 0.5
    assert f"difference +0.100 ± {se / 3 ** 0.5:.3f}" in lines[0] and "mean over 3 seeds" in lines[0]
    assert lines[1].startswith("  -> shows the effect") and lines[3].startswith("  -> shows the effect")
    # seeds that disagree: their spread is the standard error, and the effect is not shown
    for seed, lift in enumerate([0.10, -0.10, 0.02]):
        better = [1 if i % 2 or i < 2 * int(abs(lift) * n) else 0 for i in range(n)]
        worse = [0 if i < 2 * int(abs(lift) * n) else b for i, b in enumerate(base)]
        results[D2S_NAME + seed_tag(seed, 3)] = _fake(better if lift > 0 else worse, 0.5, 50)
    lines = effect_lines(results, 100, 10, seeds=3)
    assert "difference +0.007 ± 0.058" in lines[0] and lines[1].startswith("  -> does NOT show the effect")


def test_kd_vs_sft_smoke_trains_every_arm_from_one_cache(tmp_path, monkeypatch, home):
    monkeypatch.setenv("MODKD_HOME", str(home))
    out = tmp_path / "kd"
    result = CliRunner().invoke(app, ["kd-vs-sft", "--smoke", "--steps", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"teacher", "sft", "sft -> sft-moe", "d2d -> d2s", "d2d -> d2s(sft)"}
    sparse = results["d2d -> d2s"]
    assert sparse["params_active"] < sparse["params_total"] == results["sft -> sft-moe"]["params_total"]
    assert results["sft"]["params_active"] == results["sft"]["params_total"]
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == 6 and sum(r.endswith("-d2d") for r in runs) == 1  # the shared d2d stage is trained once
    assert (out / "report.md").read_text().count("| d2d -> d2s") == 2


def test_mimic_vs_pd_smoke_trains_pd_from_the_cache_over_seeds(tmp_path, monkeypatch, home):
    monkeypatch.setenv("MODKD_HOME", str(home))
    out = tmp_path / "pd"
    result = CliRunner().invoke(app, ["mimic-vs-pd", "--smoke", "--steps", "20", "--pd-steps", "2", "--seeds", "2",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert {name: len(runs) for name, runs in results.items()} == {
        "teacher": 1, "d2d -> d2s": 2, "d2d -> d2s -> pd (kto)": 2, "d2d -> d2s -> pd (dpo)": 2}
    for seed in (0, 1):
        runs = sorted(p.name for p in (out / f"seed{seed}" / "runs").iterdir())
        assert runs == ["00-d2d", "01-d2s", "02-pd", "03-pd"]  # d2d and d2s trained once per seed, shared
        configs = [json.loads((out / f"seed{seed}" / "runs" / r / "train_config.json").read_text()) for r in runs[2:]]
        assert [(c["pref_loss"], c["max_steps"], c["seed"]) for c in configs] == [("kto", 2, seed), ("dpo", 2, seed)]
    pairs = [json.loads(line) for line in (toy_root(SMOKE) / "world" / "pref.jsonl").read_text().splitlines()]
    replaced = sum(p["edit"] == "replace" for p in pairs)
    assert 0 < replaced < len(pairs) == SMOKE.n_pref  # pd trains on the pairs that replace an object, never add one
    assert Cache.open(out / "cache").num_preference_records == replaced
    assert "± " in (out / "report.md").read_text()


def test_reproduce_smoke_reports_every_paper_comparison(tmp_path, monkeypatch, home):
    from modkd.pipelines.toyworld.reproduce import COMPARISONS, arms

    monkeypatch.setenv("MODKD_HOME", str(home))
    out = tmp_path / "reproduce"
    result = CliRunner().invoke(app, ["reproduce", "--smoke", "--steps", "10", "--seeds", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert {name: len(runs) for name, runs in results.items()} == {"teacher": 1, **{name: 2 for name in arms(Path("t"))}}
    rows = [line for line in (out / "report.md").read_text().splitlines()
            if line.startswith("| Table ") or line.startswith("| not in the papers")]
    assert len(rows) == len(COMPARISONS)
    verdicts = ("| agrees", "| **disagrees**", "| no difference", "| n/a")  # the verdict column of every row
    assert all(any(v in row for v in verdicts) for row in rows), rows
    breakdowns = {"EM overall": "| count ", "CHAIR_s": "| objects/caption ", "POPE F1": "| yes-ratio "}
    assert all(any(m in row and b in row for m, b in breakdowns.items()) or "CHAIR_i" in row for row in rows), rows
    assert all((out / f"seed{seed}" / "results.json").is_file() for seed in (0, 1))  # each seed's partial results
    assert all((out / "plots" / f"{s}.png").is_file() for s in ("d2d", "sft", "d2s", "pd"))
    configs = [json.loads((run / "train_config.json").read_text()) for run in (out / "seed0" / "runs").iterdir()]
    assert [c["stage"] for c in configs if c["online_teacher"]] == ["d2d"]  # one run loads the teacher: online KD
