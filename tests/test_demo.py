"""`mod-pipeline demo --smoke`: the main job end to end at CI size (plumbing, not quality).

    pytest tests/test_demo.py -q
"""

from __future__ import annotations

import json

from typer.testing import CliRunner

from modkd.pipelines.cli_pipeline import app
from modkd.store import Cache


def test_demo_smoke_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("MODKD_HOME", str(tmp_path / "home"))
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--smoke", "--out", str(out), "--shards", "3"])
    assert result.exit_code == 0, result.output
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert step in result.output
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"teacher", "student (SFT)"}
    assert results["teacher"]["params_total"] > results["student (SFT)"]["params_total"]
    cache = Cache.open(out / "cache")
    t = cache.manifest["totals"]
    assert t["records_written"] == t["records_in"] > 0 and t["records_rejected"] == 0
    assert "| teacher |" in result.output and "| student (SFT) |" in result.output
    again = CliRunner().invoke(app, ["demo", "--smoke", "--out", str(out), "--shards", "3"])
    assert again.exit_code == 0 and "reusing" in again.output  # the toy teacher is trained once, then cached
