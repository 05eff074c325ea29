"""pytest tests/test_student_pd.py -q

Stage pd on tiny models: it trains from the cache with the teacher's files deleted, the cached
reference equals the teacher's own log-probs as the trainer computes them (student = teacher gives
DPO's log 2 and KTO's 1/2 at step 1), sequence sums cover response tokens only, and splitting a step
into micro-batches does not change the gradient (KTO's z is one number over the whole step).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from conftest import accelerate_launch
from modkd.extract.run import ExtractConfig, run
from modkd.pipelines.toyworld.models import STUDENT_LLM, build_model
from modkd.store import Cache
from modkd.student.config import TrainConfig
from modkd.student.data import ImageLoader, collate_preference
from modkd.student.model import freeze_for, load_student, upcycle
from modkd.student.pd import accumulate_preference
from modkd.student.trainer import StudentWithLoss, train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
MOD_STUDENT = str(Path(sys.executable).with_name("mod-student"))


@pytest.fixture(scope="module")
def pref_cache(tmp_path_factory, teacher_dir, world) -> Path:
    """The toy world's 8 preference pairs, extracted by a copy of the teacher that is then deleted."""
    tmp = tmp_path_factory.mktemp("pd")
    teacher = shutil.copytree(teacher_dir, tmp / "teacher")
    out = tmp / "cache"
    run(ExtractConfig(teacher=str(teacher), data=world / "pref.jsonl", out=out, image_root=world, shards=1,
                      row_group_size=4))
    shutil.rmtree(teacher)  # nothing below can load it
    return out


@pytest.fixture(scope="module")
def sparse_student(tmp_path_factory, tokenizer) -> Path:
    """A d2s-shaped student: the tiny dense student upcycled to E4T2, saved in HF format."""
    dense = build_model(tmp_path_factory.mktemp("dense"), tokenizer, STUDENT_LLM, seed=1)
    model, processor = load_student(str(dense))
    out = tmp_path_factory.mktemp("sparse")
    upcycle(model, experts=4, top_k=2, every=1).save_pretrained(out)
    processor.save_pretrained(out)
    return out


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_pd_trains_from_the_cache_with_the_teacher_deleted(pref_cache, sparse_student, tmp_path):
    out = tmp_path / "pd"
    res = subprocess.run([MOD_STUDENT, "train", "--stage", "pd", "--cache", str(pref_cache), "--student",
                          str(sparse_student), "--out", str(out), "--max-steps", "3", "--batch-size", "4",
                          "--grad-accum", "1", "--lr", "1e-3", "--set", "log_every=1"],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss/pd", "z", "mean_r", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert (out / "final" / "model.safetensors").is_file() and list((out / "tensorboard").rglob("events.*"))
    config = json.loads((out / "final" / "modkd_train_config.json").read_text())
    assert (config["stage"], config["pref_loss"], config["pref_beta"]) == ("pd", "kto", 0.1)


@pytest.mark.parametrize("loss, expected", [("dpo", math.log(2)), ("kto", 0.5), ("kto_pair", 0.5)])
def test_student_equal_to_the_teacher_starts_where_the_loss_is_neutral(pref_cache, teacher_dir, world, tmp_path,
                                                                       loss, expected):
    """The trainer's student log-probs of the teacher's own weights equal the cached reference: r = 0."""
    cfg = TrainConfig(stage="pd", cache=pref_cache, student=str(teacher_dir), out=tmp_path / loss, image_root=world,
                      max_steps=1, batch_size=8, lr=0.0, pref_loss=loss, log_every=1, save_every=100)
    train(cfg, log=lambda *a: None)
    step = metrics(cfg.out)[0]
    assert step["loss/pd"] == pytest.approx(expected, abs=1e-5)
    assert abs(step["mean_r"]) < 1e-4 and abs(step["rewards/margins"]) < 1e-5
    if loss == "kto":  # z = clamp(mean(r') , 0): the mismatched pairs' r' are fp32 noise around 0 whose mean's sign
        assert 0.0 <= step["z"] < 1e-4  # varies with the tiny model (9.5e-7, 0, 1.5e-5 seen): mean_r's fp32 bound


def _batches(cache: Path, processor, world: Path, sizes: list[int]):
    records = list(Cache.open(cache).preference_records())
    loader = ImageLoader(world, processor.image_processor)
    out, start = [], 0
    for n in sizes:
        out.append(collate_preference(records[start : start + n], processor.tokenizer.pad_token_id, loader))
        start += n
    return out


def test_sums_cover_the_response_tokens_only(pref_cache, sparse_student, world):
    model, processor = load_student(str(sparse_student))
    records = list(Cache.open(pref_cache).preference_records())[:3]
    batch = _batches(pref_cache, processor, world, [3])[0]
    expected = torch.cat([torch.from_numpy(getattr(r, f"{x}_ids")).long() for x in ("chosen", "rejected") for r in records])
    assert torch.equal(batch.policy.targets, expected)  # exactly the response tokens, chosen rows then rejected
    rows = batch.policy
    with torch.no_grad():
        got = StudentWithLoss(model)(rows)  # (6,)
        logits = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask,
                       pixel_values=rows.pixel_values).logits.float()  # (6, T, V)
    logp = torch.log_softmax(logits, -1)
    for s, (r, x) in enumerate([(r, x) for x in ("chosen", "rejected") for r in records]):
        n, ids = len(r.prompt_ids), torch.from_numpy(getattr(r, f"{x}_ids")).long()
        manual = logp[s, n - 1 : n - 1 + len(ids)].gather(1, ids[:, None]).sum()
        assert got[s].item() == pytest.approx(manual.item(), abs=1e-4)


@pytest.mark.parametrize("loss", ["kto", "dpo"])
def test_micro_batches_give_the_gradient_of_one_batch(pref_cache, sparse_student, world, tmp_path, loss):
    """4 + 4 pairs in two micro-batches == 8 in one: sums over examples, z over the whole step (not per micro)."""
    accelerator = Accelerator(cpu=True)
    cfg = TrainConfig(stage="pd", cache=pref_cache, student=str(sparse_student), out=tmp_path, pref_loss=loss)
    grads = []
    for sizes in ([8], [4, 4]):
        model, processor = load_student(str(sparse_student))
        freeze_for(model, "pd")
        model.train()
        wrapped = StudentWithLoss(model)
        scalars = accumulate_preference(cfg, accelerator, wrapped, _batches(pref_cache, processor, world, sizes))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        grads[-1]["loss"] = torch.tensor(scalars["loss/pd"])
        if loss == "kto" and len(sizes) == 1:
            model.zero_grad()
            half = accumulate_preference(cfg, accelerator, wrapped, _batches(pref_cache, processor, world, [4]))
            assert scalars["z"] > 0 and abs(half["z"] - scalars["z"]) > 1e-3  # a per-micro z would differ: power
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 1
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_two_processes_give_the_step_of_one(pref_cache, sparse_student, tmp_path):
    """The 8 pairs as 2 processes x 4 (each rank streams its own row group) against 1 process x 8: the same
    global batch, so step 1 must agree in loss and z (all-reduced sums) and in the update (step 2's loss)."""
    def args(out: Path, batch: int) -> list[str]:
        return ["train", "--stage", "pd", "--cache", str(pref_cache), "--student", str(sparse_student), "--out",
                str(out), "--max-steps", "2", "--batch-size", str(batch), "--grad-accum", "1", "--lr", "1e-3",
                "--set", "log_every=1"]

    res = subprocess.run([MOD_STUDENT, *args(tmp_path / "one", 8)], env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    launch = [*accelerate_launch(2), MOD_STUDENT, *args(tmp_path / "two", 4)]
    res = subprocess.run(launch, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert one[0]["z"] > 0
    for key in ("loss/pd", "z", "mean_r", "rewards/margins"):
        assert two[0][key] == pytest.approx(one[0][key], rel=1e-4, abs=1e-6), key
    assert two[1]["loss/pd"] == pytest.approx(one[1]["loss/pd"], rel=1e-3)
