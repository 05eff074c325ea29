"""`pytest tests/test_store_cli.py -q`: `mod-store verify` and `mod-store inspect` through typer's runner."""

from __future__ import annotations

import json

from test_store_helpers import build_cache
from typer.testing import CliRunner

from modkd.pipelines.cli_store import app

runner = CliRunner()


def test_verify_ok_and_broken(tmp_path):
    build_cache(tmp_path, [3, 4, 2])
    result = runner.invoke(app, ["verify", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK: ") and "9 records" in result.output and "3 of 12 input records rejected" in result.output
    shard = tmp_path / "shards/part-00002-of-00003.parquet"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    result = runner.invoke(app, ["verify", str(tmp_path)])
    assert result.exit_code == 1
    assert "shards/part-00002-of-00003.parquet: sha256 differs" in result.output


def test_verify_incomplete_cache(tmp_path):
    result = runner.invoke(app, ["verify", str(tmp_path)])
    assert result.exit_code == 1
    assert "no manifest.json" in result.output


def test_inspect_table_and_json(tmp_path):
    written = build_cache(tmp_path, [3, 4, 2])
    result = runner.invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:4] == ["shard", "records", "positions", "bytes"]
    assert [line.split()[0] for line in lines[1:5]] == [
        "part-00000-of-00003", "part-00001-of-00003", "part-00002-of-00003", "total"
    ]
    assert lines[4].split()[1] == "9"
    assert "rejected input records: 3 (missing_image 3)" in result.output
    result = runner.invoke(app, ["inspect", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert len(report["shards"]) == 3
    assert report["total"]["positions"] == sum(r.positions.shape[0] for r in written)
    assert report["rejects"] == {"missing_image": 3}


def test_inspect_incomplete_cache(tmp_path):
    result = runner.invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 1
    assert "no manifest.json" in result.output


def test_status_of_a_half_done_cache(tmp_path):
    build_cache(tmp_path, [3, 4, 2])
    assert json.loads(runner.invoke(app, ["status", str(tmp_path), "--json"]).output)["shards"]["manifest_final"]
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "shards/part-00001-of-00003.done.json").unlink()  # its shard file is there: partial
    for path in (tmp_path / "shards").glob("part-00002-of-00003.*"):
        path.unlink()  # nothing of shard 2: missing
    (tmp_path / "preference").mkdir()  # a preference extraction just started: shard count from the temporary's name
    (tmp_path / "preference/.part-00000-of-00002.parquet.tmp-7").write_bytes(b"PAR1")
    result = runner.invoke(app, ["status", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {
        "shards": {"num_shards": 3, "complete": [0], "partial": [1], "missing": [2], "manifest_final": False},
        "preference": {"num_shards": 2, "complete": [], "partial": [0], "missing": [1], "manifest_final": False}}
    lines = runner.invoke(app, ["status", str(tmp_path)]).output.splitlines()
    assert lines[0] == "shards: 1 of 3 shards complete, 1 partial, 1 missing; manifest not written yet"
    assert lines[4:] == ["preference: 0 of 2 shards complete, 1 partial, 1 missing; manifest not written yet",
                         "  complete: none", "  partial:  0", "  missing:  1"]
