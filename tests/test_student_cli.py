"""pytest tests/test_student_cli.py -q

`mod-student` as users type it: train through the CLI (recipes, --set, the image root recorded in the
manifest), two processes under `accelerate launch` (CPU, gloo) against one process, and `eval`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import accelerate_launch
from modkd.extract.run import ExtractConfig, run
from modkd.pipelines.toyworld.models import STUDENT_LLM, build_model
from modkd.student.config import TrainConfig

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
MOD_STUDENT = str(Path(sys.executable).with_name("mod-student"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory, teacher_dir, mixed_data, world) -> Path:
    out = tmp_path_factory.mktemp("cli") / "cache"
    run(ExtractConfig(teacher=str(teacher_dir), data=mixed_data, out=out, image_root=world, shards=2, top_k=8,
                      positions="response+instruction", row_group_size=4))
    return out


@pytest.fixture(scope="module")
def student(tmp_path_factory, tokenizer) -> Path:
    return build_model(tmp_path_factory.mktemp("student"), tokenizer, STUDENT_LLM, seed=1)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_args(cache: Path, student: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--stage", "d2d", "--cache", str(cache), "--student", str(student), "--out", str(out),
            "--max-steps", "8", "--lr", "1e-3", "--set", "log_every=1", *extra]


def test_train_as_the_user_types_it(cache, student, tmp_path):
    """No --image-root: the trainer reads the root recorded at extraction; --set overrides the recipe."""
    out = tmp_path / "run"
    res = subprocess.run([MOD_STUDENT, *train_args(cache, student, out, "--batch-size", "4", "--global-batch", "32",
                                                   "--set", "tail=true")],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    config = json.loads((out / "train_config.json").read_text())
    assert config["tail"] is True and config["lr"] == 1e-3 and config["kd_weight"] == 1.0  # recipe's value kept
    assert config["global_batch"] == 32 and config["grad_accum"] == 8  # derived: 32 / (4 x 1 process), recorded
    assert "global batch 32 = 1 process(es) x batch 4 x grad_accum 8 (derived" in res.stdout + res.stderr
    assert config["image_root"] == json.loads((cache / "manifest.json").read_text())["image_root"]
    assert [m["step"] for m in metrics(out)] == list(range(1, 9))
    assert (out / "final" / "model.safetensors").is_file() and list((out / "tensorboard").rglob("events.out.tfevents*"))


def test_bad_set_key_is_refused(cache, student, tmp_path):
    res = subprocess.run([MOD_STUDENT, *train_args(cache, student, tmp_path / "r", "--set", "learning_rate=1")],
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "expected key=value with key one of" in res.stderr


def test_two_processes_match_one_on_disjoint_data(cache, student, tmp_path):
    """2 processes x batch 2 against 1 process x batch 4: same global batch, different records, close loss.

    `--multi_gpu` is accelerate's torchrun launcher; on a machine without CUDA the trainer runs it on gloo.
    (`--cpu` would pick accelerate's MPI launcher, and without either flag it starts one process.)"""
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--grad-accum", "1", "--set", "save_every=8"]
    res = subprocess.run([MOD_STUDENT, *train_args(cache, student, one, "--batch-size", "4", *args)],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    launch = [*accelerate_launch(2), MOD_STUDENT, *train_args(cache, student, two, "--batch-size", "2", *args)]
    res = subprocess.run(launch, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = metrics(one), metrics(two)
    assert len(a) == len(b) == 8
    last = [sum(m["loss/kd"] for m in run[-3:]) / 3 for run in (a, b)]  # mean of the last 3 steps
    assert abs(last[0] - last[1]) < 0.2 * last[0], last
    assert last[0] < 0.97 * a[0]["loss/kd"] and last[1] < 0.97 * b[0]["loss/kd"]  # both learned (8 steps: ~5%)
    for rank in (0, 1):  # each rank streamed its own part (parts are disjoint: tests/test_student_data.py)
        state = json.loads((two / "checkpoints" / "step-0000008" / f"stream-rank{rank}.json").read_text())
        assert state["step"] == 8 and state["stream"]["0"]["read"] > 0


def test_eval_prints_a_table_and_writes_json(student, world, tmp_path):
    out = tmp_path / "eval.json"
    res = subprocess.run([MOD_STUDENT, "eval", str(student), "--world", str(world), "--limit", "4", "--out", str(out)],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {"exact_match", "pope", "chair"} <= results.keys()
    assert "POPE" in res.stdout or "pope" in res.stdout.lower()


def test_bad_input_is_a_clear_error_not_a_traceback(student, tmp_path):
    not_a_cache = tmp_path / "empty"
    not_a_cache.mkdir()
    res = subprocess.run([MOD_STUDENT, *train_args(not_a_cache, student, tmp_path / "r")],
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("mod-student train: ") and "Traceback" not in res.stderr
    assert "manifest.json" in res.stderr


def test_grad_accum_follows_the_global_batch_and_the_process_count():
    """Recipes give the global batch (LLaVA-MoD Table 10); grad_accum adapts to processes, or is refused."""
    from modkd.pipelines.cli_student import build_config
    from modkd.student.config import for_processes

    paths = dict(cache="c", student="s", out="o")
    d2d = build_config("d2d", paths, {}, None, [])
    assert d2d.global_batch == 128 and d2d.batch_size == 16 and d2d.grad_accum is None
    assert [for_processes(d2d, n).grad_accum for n in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(ValueError, match="global batch 128 is not a multiple of batch_size 16 x 3 process"):
        for_processes(d2d, 3)
    given = for_processes(build_config("d2d", paths, {"grad_accum": 2}, None, []), 3)
    assert given.grad_accum == 2 and given.global_batch == 16 * 2 * 3  # explicit wins; the real global batch recorded


def test_set_keeps_string_values_as_text():
    """YAML reads `no` as False: a string key must keep the text, a typed key still gets its YAML type."""
    from modkd.pipelines.cli_student import parse_set

    assert parse_set(["mixed_precision=no", "lr=5e-4", "tail=true", "online_teacher=null"]) == {
        "mixed_precision": "no", "lr": 5e-4, "tail": True, "online_teacher": None}
    with pytest.raises(ValueError, match="mixed_precision must be a string.*quote"):
        TrainConfig(stage="d2d", cache="c", student="s", out="o", mixed_precision=False)
