"""pytest tests/test_student_train.py -q

The student trainer on tiny models: offline KD equals online KD when the cache holds the whole
distribution (the anchor), gradient accumulation is invariant to the split, checkpoints resume
bit-exactly, and the trainer refuses what it cannot train on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from modkd.extract.run import ExtractConfig, run
from modkd.pipelines.toyworld.models import STUDENT_LLM, VOCAB_SIZE, build_model
from modkd.store import Cache
from modkd.student.config import TrainConfig
from modkd.student.data import ImageLoader, collate
from modkd.store.encoding import LOGPROB_STEP
from modkd.student.model import freeze_for, load_student
from modkd.student.routing import RouterTap
from modkd.student.trainer import (StudentWithLoss, TrainingDiverged, _teacher_logprobs, accumulate_gradients,
                                    build_student, train)


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory, teacher_dir, mixed_data, world) -> Path:
    """Every position of 30 records with the teacher's whole distribution (k = V)."""
    out = tmp_path_factory.mktemp("full") / "cache"
    run(ExtractConfig(teacher=str(teacher_dir), data=mixed_data, out=out, image_root=world, shards=2,
                      top_k=VOCAB_SIZE, positions="all", row_group_size=4))
    return out


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tokenizer) -> Path:
    return build_model(tmp_path_factory.mktemp("student"), tokenizer, STUDENT_LLM, seed=1)


def config(tmp: Path, cache: Path, student: Path, world: Path, **kw) -> TrainConfig:
    base = dict(stage="d2d", cache=cache, student=str(student), out=tmp / "run", image_root=world, max_steps=4,
                batch_size=4, lr=1e-3, save_every=100, log_every=1)
    return TrainConfig(**{**base, **kw})


def first_records(cache: Path, n: int):
    return [r for _, r in zip(range(n), Cache.open(cache).records())]


def batch_of(records, processor, world):
    return collate(records, processor.tokenizer.pad_token_id, ImageLoader(world, processor.image_processor))


@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("kd_positions", ["response", "all"])
def test_offline_equals_online_kd_when_cache_holds_full_distribution(full_cache, student_dir, teacher_dir, world,
                                                                     tmp_path, tail, kd_positions):
    """The anchor. With k = V the offline path (cache -> records -> batch -> loss) gives online KD's value and
    gradient: exactly once the cached probabilities are the teacher's float32 ones at the cached ids (every id,
    position, kind and shift of the offline path is then checked), and within the topk encoding's documented
    quantisation error (store/encoding.py) with the decoded ones."""
    cfg = config(tmp_path, full_cache, student_dir, world, tail=tail, kd_positions=kd_positions)
    model, processor = load_student(student_dir)
    freeze_for(model, "d2d")
    teacher = AutoModelForImageTextToText.from_pretrained(teacher_dir).eval()
    batch = batch_of(first_records(full_cache, 6), processor, world)
    assert batch.pixel_values is not None and batch.target_ids.shape[1] == VOCAB_SIZE
    kd_mask = batch.kind_mask(kd_positions)
    no_lm = torch.zeros_like(kd_mask)  # KL only
    with torch.no_grad():
        every = torch.ones_like(kd_mask)
        exact = _teacher_logprobs(teacher, batch, every).exp().gather(1, batch.target_ids)  # (N, V) at the cached ids
    decoded_error = (batch.target_probs - exact).abs() / exact  # (N, V) relative error of the decoded probabilities
    assert 0 < decoded_error.max() <= 2 * math.expm1(LOGPROB_STEP / 2) + 1e-5  # renormalised: up to twice the bound
    exact_batch = dataclasses.replace(batch, target_probs=exact, tail_mass=torch.zeros_like(batch.tail_mass))
    results = []
    for b, online in ((batch, None), (exact_batch, None), (batch, teacher)):
        model.zero_grad()
        teacher_logprobs = None if online is None else _teacher_logprobs(online, b, kd_mask)
        kd = StudentWithLoss(model, tail=cfg.tail)(b, kd_mask, no_lm, teacher_logprobs)[0]
        kd.backward()
        results.append((kd.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (decoded, g_dec), (offline, g_off), (online_kd, g_on) = results
    assert offline.item() > 1.0  # a random student is far from the teacher: the comparison is not 0 == 0
    torch.testing.assert_close(offline, online_kd, rtol=1e-5, atol=1e-6)
    assert g_off.keys() == g_on.keys() == g_dec.keys() and len(g_off) > 10
    for name in g_off:  # atol relative to the tensor's scale: the cached teacher ran in other batches (fp32 noise ~1e-7)
        scale = g_on[name].abs().max().item()
        torch.testing.assert_close(g_off[name], g_on[name], rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")
    # Decoded: each probability within 0.8% (relative) of the teacher's moves the logit gradient q - p by at most
    # 0.8% of p; against |q - p| of a random student that is well under 1% of the loss and of each gradient.
    torch.testing.assert_close(decoded, online_kd, rtol=1e-2, atol=0)
    for name in g_dec:
        error = (g_dec[name] - g_on[name]).norm() / g_on[name].norm()
        assert error < 1e-2, f"{name}: decoded cache gradient off by {error:.2%}"


def test_a_sampled_cache_approaches_online_kd_as_draws_grow(tmp_path_factory, teacher_dir, mixed_data, student_dir,
                                                            world):
    """The sampled anchor, end to end: counts / N of a cache with many draws per position on the toy's 384-token
    vocabulary gives online KD's value and gradient within sampling noise, which shrinks like 1 / sqrt(N)."""
    model, processor = load_student(student_dir)
    freeze_for(model, "d2d")
    teacher = AutoModelForImageTextToText.from_pretrained(teacher_dir).eval()
    errors = {}
    for n in (2**8, 2**14):
        out = tmp_path_factory.mktemp(f"sampled{n}") / "cache"
        run(ExtractConfig(teacher=str(teacher_dir), data=mixed_data, out=out, image_root=world, encoding="sampled",
                          samples=n, positions="all"))
        batch = batch_of(first_records(out, 6), processor, world)
        kd_mask = batch.kind_mask("all")
        results = []
        for online in (None, teacher):
            model.zero_grad()
            teacher_logprobs = None if online is None else _teacher_logprobs(online, batch, kd_mask)
            kd, *_ = StudentWithLoss(model)(batch, kd_mask, torch.zeros_like(kd_mask), teacher_logprobs)
            kd.backward()
            results.append((kd.detach(), torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])))
        (offline, g_off), (online_kd, g_on) = results
        # the value differs by the entropy of counts / N against the teacher's (biased, gradient-free); the gradient
        # q - counts / N is unbiased, its error ~ 1 / sqrt(N)
        errors[n] = ((g_off - g_on).norm() / g_on.norm()).item()
        torch.testing.assert_close(offline, online_kd, rtol=0.1 if n == 2**8 else 0.01, atol=0)
    assert errors[2**14] < 0.03 and errors[2**14] < errors[2**8] / 4, errors  # 64x the draws: ~8x less error


def test_grad_accumulation_4x2_equals_1x8(full_cache, student_dir, world, tmp_path):
    cfg = config(tmp_path, full_cache, student_dir, world, lm_weight=1.0, kd_positions="response+instruction")
    model, processor = load_student(student_dir)
    freeze_for(model, "d2d")
    records = first_records(full_cache, 8)
    grads = []
    for split in ([records], [records[i : i + 2] for i in range(0, 8, 2)]):
        model.zero_grad()
        micro = [batch_of(part, processor, world) for part in split]
        sums, n_kd, n_lm = accumulate_gradients(cfg, Accelerator(cpu=True), StudentWithLoss(model), micro)
        grads.append(({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sums[:2], n_kd, n_lm))
    (g1, s1, *n1), (g4, s4, *n4) = grads
    assert n1 == n4 and n1[0] > n1[1] > 0
    torch.testing.assert_close(s1, s4, rtol=1e-6, atol=1e-6)
    for name in g1:
        torch.testing.assert_close(g1[name], g4[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("stage", ["d2d", "d2s"])
def test_gradient_checkpointing_gives_the_same_gradient(full_cache, student_dir, world, tmp_path, stage):
    records = first_records(full_cache, 4)
    grads = []
    for checkpointing in (False, True):
        cfg = config(tmp_path, full_cache, student_dir, world, stage=stage, lm_weight=1.0, routing="jitter",
                     gradient_checkpointing=checkpointing)
        torch.manual_seed(0)
        model, processor, _ = build_student(cfg, log=lambda *a: None)
        assert model.is_gradient_checkpointing == checkpointing and model.training
        tap = RouterTap(model, cfg.routing) if stage == "d2s" else None
        torch.manual_seed(1)  # jitter draws: the recomputed forward must replay them
        accumulate_gradients(cfg, Accelerator(cpu=True), StudentWithLoss(model, tail=cfg.tail, tap=tap),
                             [batch_of(records, processor, world)])
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 5
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("stage", ["d2d", "d2s"])
def test_a_packed_batch_gives_the_loss_and_gradient_of_the_padded_one(full_cache, student_dir, world, tmp_path, stage):
    """Records of different lengths (and images) packed into one row with per-record position ids: the same
    KL, CE, MoE aux loss and gradients as right-padded rows; the online teacher reads the packed row alike."""
    records = first_records(full_cache, 6)
    assert len({len(r.input_ids) for r in records}) > 1  # padding to remove
    cfg = config(tmp_path, full_cache, student_dir, world, stage=stage, lm_weight=1.0, aux_loss_coef=0.01)
    torch.manual_seed(0)
    model, processor, _ = build_student(cfg, log=lambda *a: None)
    tap = RouterTap(model, cfg.routing) if stage == "d2s" else None
    teacher = AutoModelForImageTextToText.from_pretrained(student_dir).eval()  # any model reading the same inputs
    results = []
    for pack in (False, True):
        b = collate(records, processor.tokenizer.pad_token_id, ImageLoader(world, processor.image_processor), pack)
        assert (b.input_ids.shape[0] == 1 and b.attention_mask.all()) if pack else not b.attention_mask.all()
        model.zero_grad()
        losses = StudentWithLoss(model, tap=tap)(b, b.kind_mask("response"), b.kind_mask("response"))
        (losses[0] + losses[1] + losses[2]).backward()
        online = _teacher_logprobs(teacher, b, b.kind_mask("response"))
        results.append((torch.stack(losses).detach(), online, {n: p.grad.clone() for n, p in model.named_parameters()
                                                                if p.grad is not None}))
    (l_pad, t_pad, g_pad), (l_pack, t_pack, g_pack) = results
    assert (l_pad[2] > 0) == (stage == "d2s")
    torch.testing.assert_close(l_pack, l_pad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t_pack, t_pad, rtol=1e-5, atol=1e-5)
    assert g_pad.keys() == g_pack.keys() and len(g_pad) > 5
    for name in g_pad:  # other row layouts sum in another order: atol relative to the tensor's scale (fp32 noise)
        scale = g_pad[name].abs().max().item()
        torch.testing.assert_close(g_pack[name], g_pad[name], rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")


def weights(run_dir: Path) -> dict:
    return load_file(run_dir / "final" / "model.safetensors")


def test_resume_from_a_checkpoint_is_bit_exact(full_cache, student_dir, world, tmp_path):
    """d2s with jitter (the model consumes torch RNG), 2N steps straight vs N, stop, resume N."""
    kw = dict(stage="d2s", routing="jitter", max_steps=6, save_every=3, lm_weight=1.0)
    straight = config(tmp_path / "a", full_cache, student_dir, world, **kw)
    train(straight)
    resumed = config(tmp_path / "b", full_cache, student_dir, world, **kw)
    train(resumed)
    # what a kill right after the step-3 checkpoint leaves on disk
    shutil.rmtree(resumed.out / "final")
    shutil.rmtree(resumed.out / "checkpoints" / "step-0000006")
    logs = []
    train(resumed, log=logs.append)
    assert any("resuming" in line and "step-0000003" in line for line in logs)
    steps = [json.loads(line)["step"] for line in (resumed.out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))  # the redone steps are logged once
    a, b = weights(straight.out), weights(resumed.out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    sparse = AutoModelForImageTextToText.from_pretrained(resumed.out / "final")
    assert sparse.config.text_config.model_type == "qwen2_moe"


def test_a_loaded_sparse_student_trains_with_its_routing_strategy(full_cache, student_dir, world, tmp_path):
    """A saved d2s student loads in eval mode; the trainer must train it in training mode, where jitter acts:
    d2s continued from OUT/final with jitter sees another step-1 loss than with plain top-k (lr 0: same weights)."""
    first = config(tmp_path / "d2s", full_cache, student_dir, world, stage="d2s", max_steps=2, lm_weight=1.0,
                   warmup_ratio=0.0)  # a real update: upcycled experts start identical, and routing would not matter
    sparse = train(first)
    losses = {}
    for routing in ("topk", "jitter"):
        run_cfg = config(tmp_path / routing, full_cache, sparse, world, stage="d2s", max_steps=1, lm_weight=1.0,
                         lr=0.0, routing=routing)
        train(run_cfg)
        losses[routing] = json.loads((run_cfg.out / "metrics.jsonl").read_text().splitlines()[0])["loss/kd"]
    assert losses["jitter"] != losses["topk"], losses


def test_rerun_with_other_options_is_refused(full_cache, student_dir, world, tmp_path):
    train(config(tmp_path, full_cache, student_dir, world, max_steps=1))
    with pytest.raises(ValueError, match="lr differ"):
        train(config(tmp_path, full_cache, student_dir, world, max_steps=1, lr=0.5))


def test_refuses_a_student_with_another_tokenizer(full_cache, student_dir, world, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(student_dir, other)
    processor = AutoProcessor.from_pretrained(other)
    processor.chat_template = processor.chat_template.replace("<|im_start|>", "<|im_start|> ")
    processor.save_pretrained(other)
    with pytest.raises(ValueError, match=r"tokenizer mismatch: .*toy|tokenizer mismatch") as err:
        train(config(tmp_path, full_cache, other, world))
    assert str(err.value).count("...") == 2  # both fingerprints are named


def test_refuses_a_vision_tower_with_another_image_token_count(full_cache, student_dir, world, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(student_dir)
    config_ = model.config
    config_.vision_config.patch_size = 12  # 16 patches instead of 9
    other = tmp_path / "patch12"
    type(model)(config_).save_pretrained(other)
    AutoProcessor.from_pretrained(student_dir).save_pretrained(other)
    with pytest.raises(ValueError, match="image tokens differ: .* 9 tokens .* yields 16"):
        train(config(tmp_path, full_cache, other, world))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(full_cache, student_dir, world, tmp_path):
    cfg = config(tmp_path, full_cache, student_dir, world, lr=1e30, max_steps=10, save_every=1, warmup_ratio=0.0)
    with pytest.raises(TrainingDiverged, match="non-finite loss at step .*Last good checkpoint: .*step-") as err:
        train(cfg)
    saved = sorted(p.name for p in (cfg.out / "checkpoints").iterdir())
    assert saved and all(not name.endswith(".tmp") for name in saved)
    assert saved[-1] in str(err.value)
    assert not (cfg.out / "final").exists()




def test_resume_onto_another_number_of_processes_is_refused(tmp_path):
    """Each process's stream position is its own: a run resumed by another process count is refused by name."""
    from types import SimpleNamespace

    from modkd.student.trainer import _claim_out

    cfg = TrainConfig(stage="d2d", cache=tmp_path / "cache", student="s", out=tmp_path / "run")
    launch = lambda n: SimpleNamespace(num_processes=n, is_main_process=True, wait_for_everyone=lambda: None)  # noqa: E731
    _claim_out(cfg, launch(2))
    _claim_out(cfg, launch(2))  # the same count resumes
    with pytest.raises(ValueError, match="trained by 2 process.*resume it with 2"):
        _claim_out(cfg, launch(1))
