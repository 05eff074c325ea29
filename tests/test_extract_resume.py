"""pytest tests/test_extract_resume.py -q

SIGKILL in the middle of `mod-extract`, then a rerun, gives the same cache as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from modkd.extract.run import ExtractConfig, run
from modkd.pipelines.cli_store import app as store_app
from modkd.store import Cache
from test_extract import assert_same_records

SHARDS = 12
REPEATS = 3  # copies of the toy training set, with fresh ids


def cli(teacher: Path, data: Path, root: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", "from modkd.pipelines.cli_extract import main; main()",
            "--teacher", str(teacher), "--data", str(data), "--image-root", str(root), "--out", str(out),
            "--shards", str(SHARDS), "--batch-size", "1"]


def test_sigkill_then_rerun_equals_uninterrupted(tmp_path, teacher_dir, world):
    records = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()]
    data = tmp_path / "big.jsonl"  # ~300 records: a couple of seconds of extraction, long enough to kill midway
    data.write_text("".join(json.dumps({**r, "id": f"{r['id']}-{i}"}) + "\n" for i in range(REPEATS) for r in records))
    out = tmp_path / "killed"
    shards_dir = out / "shards"
    proc = subprocess.Popen(cli(teacher_dir, data, world, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(shards_dir.glob("*.done.json"))) < 2 and proc.poll() is None:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list(shards_dir.glob("*.done.json")))
    assert 0 < done_at_kill < SHARDS, f"the kill landed after {done_at_kill} of {SHARDS} shards; make the data bigger"
    assert not (out / "manifest.json").exists()

    rerun = subprocess.run(cli(teacher_dir, data, world, out), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f'"shards_skipped": {done_at_kill}' in rerun.stdout
    assert not [p.name for p in shards_dir.iterdir() if p.name.startswith(".")]  # no temporaries left behind

    straight = tmp_path / "straight"
    run(ExtractConfig(str(teacher_dir), data, straight, world, shards=SHARDS, batch_size=1))
    killed, uninterrupted = Cache.open(out), Cache.open(straight)
    assert killed.num_records == uninterrupted.num_records == len(records) * REPEATS
    assert_same_records(killed, uninterrupted, atol=0)
    assert killed.manifest == uninterrupted.manifest
    result = CliRunner().invoke(store_app, ["verify", str(out)])
    assert result.exit_code == 0, result.output
