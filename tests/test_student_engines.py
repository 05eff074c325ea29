"""pytest tests/test_student_engines.py -q   # FSDP2 and DeepSpeed ZeRO-2/3 through pipelines/accelerate/*.yaml

The same student step under each engine config that README names: step 1's loss and gradient norm and the
updated weights equal those of one plain process over the same 8 records (fp32, `--mixed_precision no`), for
a tied and an untied student; a run stopped after its step-1 checkpoint and resumed gives the weights of a run
that was not stopped. These need CUDA (accelerate runs FSDP and DeepSpeed only there; DeepSpeed must be
installed) and are marked `gpu`. On CPU, a launch with such a config is refused with a message that says why
(accelerate would otherwise fall back to plain DDP without a word).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modkd.pipelines.toyworld.models import STUDENT_LLM, build_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "pipelines" / "accelerate"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
MOD_STUDENT = str(Path(sys.executable).with_name("mod-student"))
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent))


@pytest.fixture(scope="module")
def cache(eight_image_cache) -> Path:
    return eight_image_cache  # tests/conftest.py: 8 image records in two row groups of 4, and 8 preference pairs


def train(cache: Path, student: Path, out: Path, stage: str, launch: list[str], processes: int, steps: int = 1,
          save_every: int = 1) -> subprocess.CompletedProcess:
    args = ["train", "--stage", stage, "--cache", str(cache), "--student", str(student), "--out", str(out),
            "--max-steps", str(steps), "--batch-size", str(8 // processes), "--grad-accum", "1", "--lr", "1e-4",
            "--set", "log_every=1", "--set", "warmup_ratio=0", "--set", f"save_every={save_every}",
            "--set", "aux_loss_coef=0", "--set", "mixed_precision=no"]
    return subprocess.run([*launch, MOD_STUDENT, *args], env=ENV, capture_output=True, text=True, timeout=900)


def engine_launch(config: str, processes: int) -> list[str]:
    return [ACCELERATE, "launch", "--config_file", str(CONFIGS / f"{config}.yaml"), "--num_processes", str(processes),
            "--mixed_precision", "no"]


def test_an_fsdp_config_without_cuda_is_refused_not_silently_run_as_ddp(cache, tokenizer, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA, where accelerate runs FSDP (the gpu tests below cover it)")
    student = build_model(tmp_path / "student", tokenizer, STUDENT_LLM, seed=1)
    res = train(cache, student, tmp_path / "fsdp", "d2d", engine_launch("fsdp2", 2), 2)
    assert res.returncode != 0
    assert "asks for FSDP but accelerate runs MULTI_CPU" in res.stderr, res.stderr[-3000:]
    assert not (tmp_path / "fsdp" / "final").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["fsdp2", "zero2", "zero3"])
@pytest.mark.parametrize("stage", ["d2d", "d2s"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_each_engine_gives_the_step_of_one_plain_process(cache, tokenizer, tmp_path, config, stage, tied):
    if not torch.cuda.is_available():
        pytest.skip("FSDP and DeepSpeed run only on CUDA under accelerate (the CPU refusal is tested above)")
    if config.startswith("zero"):
        pytest.importorskip("deepspeed", reason="pip install deepspeed")
    processes = min(2, torch.cuda.device_count())  # NCCL: one process per GPU
    student = build_model(tmp_path / "student", tokenizer, STUDENT_LLM, seed=1, tie=tied)
    res = train(cache, student, tmp_path / "one", stage, [], 1)
    assert res.returncode == 0, res.stderr[-4000:]
    res = train(cache, student, tmp_path / "engine", stage, engine_launch(config, processes), processes)
    assert res.returncode == 0, res.stderr[-4000:]
    one, two = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()][0]
                for run in ("one", "engine"))
    assert two["loss/kd"] == pytest.approx(one["loss/kd"], rel=1e-5)
    assert one["grad_norm"] > 0 and two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
    a, b = (load_file(str(tmp_path / run / "final" / "model.safetensors")) for run in ("one", "engine"))
    assert a.keys() == b.keys() and any(k.endswith("lm_head.weight") for k in a) == (not tied)
    for name in a:  # AdamW moves each weight by ~lr = 1e-4: a wrong gradient moves it differently by ~lr
        torch.testing.assert_close(b[name].float(), a[name].float(), rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["fsdp2", "zero2", "zero3"])
def test_each_engine_resumes_from_its_own_checkpoint(cache, tokenizer, tmp_path, config):
    if not torch.cuda.is_available():
        pytest.skip("FSDP and DeepSpeed run only on CUDA under accelerate (the CPU refusal is tested above)")
    if config.startswith("zero"):
        pytest.importorskip("deepspeed", reason="pip install deepspeed")
    processes = min(2, torch.cuda.device_count())
    student = build_model(tmp_path / "student", tokenizer, STUDENT_LLM, seed=1, tie=False)
    launch = engine_launch(config, processes)
    for out in ("straight", "resumed"):
        res = train(cache, student, tmp_path / out, "d2d", launch, processes, steps=4, save_every=2)
        assert res.returncode == 0, res.stderr[-4000:]
    shutil.rmtree(tmp_path / "resumed" / "final")  # what a kill right after the step-2 checkpoint leaves
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-0000004")
    res = train(cache, student, tmp_path / "resumed", "d2d", launch, processes, steps=4, save_every=2)
    assert res.returncode == 0 and "resuming" in res.stdout + res.stderr, res.stderr[-4000:]
    a, b = (load_file(str(tmp_path / out / "final" / "model.safetensors")) for out in ("straight", "resumed"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
