"""pytest tests/test_encoding.py -q

The cache's two encodings (store/encoding.py): bit-packing at real vocabulary sizes, the top-k
quantisation within its documented error, sampled targets that are unbiased where renormalised top-k
is not, the anchor for sampled targets (many draws on a tiny vocabulary give full KD), and sampled
caches from the hf backend: draws equal an independent inverse-CDF computation, do not depend on the
shard count, and train with the estimator the manifest names.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from modkd.extract.run import ExtractConfig, run
from modkd.extract.topk import sampled_ids
from modkd.pipelines.toyworld.models import STUDENT_LLM, build_model
from modkd.store import Cache, DistillRecord, Encoding, verify_cache
from modkd.store.encoding import (LOGPROB_STEP, dequantise_logprobs, draws_to_counts, pack_bits, quantise_logprobs,
                                  sample_uniforms, tail_mass, unpack_bits)
from modkd.student.config import TrainConfig
from modkd.student.data import ImageLoader, collate
from modkd.student.losses import forward_kl, student_logprobs
from modkd.student.trainer import train


@pytest.mark.parametrize("vocab", [151_936, 152_064, 2**17 + 1, 49_152, 2])
def test_bit_packing_round_trips_at_real_vocabulary_sizes(vocab):
    enc = Encoding("topk", vocab, k=min(20, vocab))
    assert enc.id_bits == math.ceil(math.log2(vocab))  # 18, 18, 18, 16, 1
    rng = np.random.default_rng(vocab)
    ids = np.concatenate([[0, vocab - 1], rng.integers(0, vocab, size=997)])  # the extremes and an odd count
    packed = pack_bits(ids, enc.id_bits)
    assert len(packed) == math.ceil(ids.size * enc.id_bits / 8)
    assert np.array_equal(unpack_bits(packed, enc.id_bits, ids.size), ids)
    with pytest.raises(ValueError, match="must lie in"):
        pack_bits(np.array([1 << enc.id_bits]), enc.id_bits)
    with pytest.raises(ValueError, match="cannot hold exactly"):
        unpack_bits(packed[:-1], enc.id_bits, ids.size)


def _teacher(rng, P: int, V: int) -> np.ndarray:
    """(P, V) float64 log-probs of a peaked random distribution, as a language model's."""
    logits = rng.standard_normal((P, V)) * 4
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def _record(enc: Encoding, logp: np.ndarray, draws: np.ndarray | None = None) -> DistillRecord:
    P = logp.shape[0]
    fields = dict(sample_id="r", input_ids=np.zeros(P + 1, np.int32), positions=np.arange(P, dtype=np.int32),
                  position_kinds=np.zeros(P, np.int8), target_logprobs=logp[:, 0].astype(np.float32), image=None,
                  num_image_tokens=0, encoding=enc)
    if enc.name == "topk":
        ids = np.argsort(-logp, axis=1)[:, : enc.k].astype(np.int32)  # (P, k) rank order
        lps = np.take_along_axis(logp, ids, axis=1).astype(np.float32)
        return DistillRecord(**fields, topk_ids=ids, topk_logprobs=lps, tail_mass=tail_mass(lps))
    ids, counts = draws_to_counts(draws)
    return DistillRecord(**fields, sampled_ids=ids, sampled_counts=counts)


def test_topk_round_trips_within_the_documented_error():
    rng = np.random.default_rng(0)
    logp = _teacher(rng, 64, 500)
    enc = Encoding("topk", 500, k=50)
    rec = _record(enc, logp)
    back = DistillRecord.from_row(rec.to_row(), enc)
    assert np.array_equal(back.topk_ids, rec.topk_ids) and np.array_equal(back.tail_mass, rec.tail_mass)
    error = np.abs(back.topk_logprobs.astype(np.float64) - rec.topk_logprobs)  # (P, k)
    assert error[:, 0].max() == 0  # the top-1 is kept in float32
    assert 0 < error.max() <= LOGPROB_STEP / 2 + 1e-6  # 1/256 nat, as documented
    assert error.max() > LOGPROB_STEP / 2 * 0.9  # the error is the quantisation's, not hidden by a finer grid
    np.testing.assert_allclose(back.target_probs.sum(axis=1), 1.0, rtol=1e-6)
    # offsets beyond 32 nats below the top-1 clamp there: probability < e^-32 of the top-1's
    far = np.array([[-0.1, -5.0, -80.0]], dtype=np.float32)
    assert dequantise_logprobs(*quantise_logprobs(far))[0, 2] == pytest.approx(-0.1 - 4095 * LOGPROB_STEP)
    assert (quantise_logprobs(far)[1] <= 4095).all()


def test_sampled_round_trips_exactly_and_counts_sum_to_n():
    rng = np.random.default_rng(1)
    enc = Encoding("sampled", 151_936, samples=64, seed=3)
    draws = rng.integers(0, 151_936, size=(40, 64))
    draws[:10] = rng.integers(0, 3, size=(10, 64))  # peaked rows: few distinct ids, large counts
    draws[10] = 7  # one id drawn N times: count N needs all of count_bits
    rec = _record(enc, np.zeros((40, 1)), draws)
    assert enc.count_bits == 6 and (rec.sampled_counts.sum(axis=1) == 64).all()
    back = DistillRecord.from_row(rec.to_row(), enc)
    assert np.array_equal(back.sampled_ids, rec.sampled_ids) and np.array_equal(back.sampled_counts, rec.sampled_counts)
    assert back.target_ids is back.sampled_ids
    np.testing.assert_allclose(back.target_probs.sum(axis=1), 1.0, rtol=1e-6)
    assert (back.target_probs[back.sampled_counts == 0] == 0).all()  # padding carries no probability
    assert back.topk_ids is None and back.tail_mass is None
    row = rec.to_row()
    with pytest.raises(ValueError, match="do not split into"):
        DistillRecord.from_row(dict(row, num_ids=row["num_ids"] - 1,
                                    ids=pack_bits(back.sampled_ids[back.sampled_counts > 0][:-1], enc.id_bits),
                                    values=pack_bits(back.sampled_counts[back.sampled_counts > 0][:-1] - 1, 6)), enc)


def test_sample_uniforms_depend_on_seed_id_and_position_only():
    u = sample_uniforms(0, "line:7", np.array([3, 0, 9]), 16)
    assert u.shape == (3, 16) and (0 <= u).all() and (u < 1).all()
    np.testing.assert_array_equal(u[2], sample_uniforms(0, "line:7", np.array([9]), 16)[0])  # any subset of positions
    assert not np.array_equal(u, sample_uniforms(1, "line:7", np.array([3, 0, 9]), 16))
    assert not np.array_equal(u, sample_uniforms(0, "line:8", np.array([3, 0, 9]), 16))


def _lm_head_gradient(hidden, weight, ids, p) -> torch.Tensor:
    """d/dW of the summed KL of the cached sparse p (N, n) at ids (N, n), through the trainer's loss functions."""
    w = weight.clone().requires_grad_(True)
    logq, _, _ = student_logprobs(hidden, w, ids, torch.zeros(len(ids), dtype=torch.long), tail=False)
    forward_kl(logq, p).sum().backward()
    return w.grad


def test_sampled_targets_are_unbiased_and_renormalised_topk_is_not():
    """Averaging the sampled-target lm_head gradient over seeds converges to full KD's (error ~ 1/sqrt(seeds));
    renormalised top-k's gradient is the same every time, with a fixed bias."""
    torch.manual_seed(0)
    P, V, H, N = 12, 60, 8, 8
    t_hidden, t_head = torch.randn(P, H), torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        t_head.weight.mul_(2.0)  # a peaked teacher, as a language model is
        logp = torch.log_softmax(t_head(t_hidden), dim=-1).double()  # (P, V)
    hidden, weight = torch.randn(P, H), torch.randn(V, H) * 0.5  # the student
    every = torch.arange(V).expand(P, V)
    full = _lm_head_gradient(hidden, weight, every, logp.exp().float())  # (V, H) full-vocabulary KD

    def sampled(seed: int) -> torch.Tensor:
        u = torch.from_numpy(sample_uniforms(seed, "r", np.arange(P), N))
        draws, _ = sampled_ids(t_hidden, t_head, torch.zeros(P, dtype=torch.long), u, chunk=5)  # (P, N)
        ids, counts = draws_to_counts(draws.numpy())
        p = torch.from_numpy(counts / N).float()
        return _lm_head_gradient(hidden, weight, torch.from_numpy(ids).long(), p)

    grads = torch.stack([sampled(seed) for seed in range(256)])  # (256, V, H)
    errors = {s: ((grads[:s].mean(0) - full).norm() / full.norm()).item() for s in (4, 64, 256)}
    assert errors[256] < errors[64] < errors[4]
    assert errors[4] / errors[256] > 4  # sqrt(256 / 4) = 8 expected; 4 leaves room for the noise of the estimate
    assert errors[256] < 0.1
    top = torch.topk(logp, 5, dim=-1)
    renormalised = _lm_head_gradient(hidden, weight, top.indices, torch.softmax(top.values, -1).float())
    bias = ((renormalised - full).norm() / full.norm()).item()
    assert bias > 3 * errors[256], (bias, errors)  # no number of seeds removes it


def test_many_draws_on_a_tiny_vocabulary_give_full_kd():
    """The sampled anchor: counts / N -> p as N grows, so the cached loss's gradient -> full KD's (~ 1/sqrt(N))."""
    torch.manual_seed(1)
    P, V, H = 10, 12, 6
    t_hidden, t_head = torch.randn(P, H), torch.nn.Linear(H, V, bias=False)
    hidden, weight = torch.randn(P, H), torch.randn(V, H)
    with torch.no_grad():
        p_full = torch.softmax(t_head(t_hidden), dim=-1)  # (P, V)
    full = _lm_head_gradient(hidden, weight, torch.arange(V).expand(P, V), p_full)
    errors = []
    for n in (2**8, 2**16):
        u = torch.from_numpy(sample_uniforms(0, "r", np.arange(P), n))
        draws, _ = sampled_ids(t_hidden, t_head, torch.zeros(P, dtype=torch.long), u, chunk=4)
        ids, counts = draws_to_counts(draws.numpy())
        p_hat = np.zeros((P, V))
        np.put_along_axis(p_hat, ids, counts / n, axis=1)  # padding adds count 0 at id 0
        assert np.abs(p_hat - p_full.numpy()).max() < 5 / math.sqrt(n)  # binomial: std <= 0.5 / sqrt(n)
        grad = _lm_head_gradient(hidden, weight, torch.from_numpy(ids).long(), torch.from_numpy(counts / n).float())
        errors.append(((grad - full).norm() / full.norm()).item())
    assert errors[1] < 0.02 and errors[1] < errors[0] / 4  # sqrt(2^8) = 16x fewer draws: ~16x the error


@pytest.fixture(scope="module")
def sampled_caches(tmp_path_factory, teacher_dir, mixed_data, world):
    """The same data extracted with --encoding sampled into 1 and into 3 shards, one record per teacher batch (so
    the teacher's float outputs are bit-identical), and into 1 shard with the default batches of 8."""
    tmp = tmp_path_factory.mktemp("sampled")
    for name, shards, batch_size in (("s1", 1, 1), ("s3", 3, 1), ("b8", 1, 8)):
        run(ExtractConfig(str(teacher_dir), mixed_data, tmp / name, world, shards=shards, encoding="sampled",
                          samples=16, positions="all", row_group_size=4, batch_size=batch_size))
    return tmp / "s1", tmp / "s3", tmp / "b8"


def test_sampled_draws_are_the_teachers_and_independent_of_sharding(sampled_caches, teacher_dir, world):
    one, three, batched = (Cache.open(c) for c in sampled_caches)
    assert one.encoding == Encoding("sampled", one.encoding.vocab, samples=16, seed=0)
    assert one.manifest["settings"]["encoding"] == "sampled" and verify_cache(one.path) == []
    records = list(one.records())
    for other in (three, batched):
        assert sorted(r.sample_id for r in other.records()) == sorted(r.sample_id for r in records)
    in_three, in_batches = ({r.sample_id: r for r in c.records()} for c in (three, batched))
    differ = total = 0
    for rec in records:
        other = in_three[rec.sample_id]  # the same logits, another sharding: the very same draws
        assert np.array_equal(rec.sampled_ids, other.sampled_ids) and np.array_equal(rec.sampled_counts, other.sampled_counts)
        assert (rec.sampled_counts.sum(axis=1) == 16).all()
        # batched with other records, the teacher's logits move in their last bits (padding changes the kernels'
        # blocking): a draw flips only where its uniform lies within that noise of a CDF boundary
        b = in_batches[rec.sample_id]
        width = max(rec.sampled_ids.shape[1], b.sampled_ids.shape[1])  # a flip may change the widest row
        x, y = (np.pad(np.stack([r.sampled_ids, r.sampled_counts], -1), ((0, 0), (0, width - r.sampled_ids.shape[1]),
                                                                           (0, 0))) for r in (rec, b))
        differ += int((x != y).any(axis=(1, 2)).sum())
        total += len(rec.positions)
    assert len(records) > 10 and differ <= max(2, total // 500), (differ, total)
    teacher = AutoModelForImageTextToText.from_pretrained(teacher_dir).eval()
    processor = AutoProcessor.from_pretrained(teacher_dir)
    for rec in records[:6]:  # an independent inverse CDF over a float64 cumsum of the teacher's softmax
        batch = collate([rec], processor.tokenizer.pad_token_id, ImageLoader(world, processor.image_processor))
        with torch.no_grad():
            out = teacher.model(**batch.model_inputs()).last_hidden_state[0, rec.positions]  # (P, H)
            logp = torch.log_softmax(teacher.lm_head(out).float(), dim=-1)  # (P, V)
        cdf = np.cumsum(np.exp(logp.double().numpy()), axis=1)  # (P, V)
        u = sample_uniforms(0, rec.sample_id, rec.positions, 16) * cdf[:, -1:]
        draws = np.stack([np.searchsorted(cdf[i], u[i], side="right") for i in range(len(u))])
        ids, counts = draws_to_counts(draws)
        assert np.array_equal(ids, rec.sampled_ids) and np.array_equal(counts, rec.sampled_counts), rec.sample_id
        np.testing.assert_allclose(rec.target_logprobs, logp[np.arange(len(u)), rec.input_ids[rec.positions + 1]],
                                   atol=1e-5)


def test_a_sampled_cache_trains_with_its_own_estimator_and_refuses_the_tail(sampled_caches, tokenizer, world,
                                                                            tmp_path):
    student = build_model(tmp_path / "student", tokenizer, STUDENT_LLM, seed=1)
    base = dict(stage="d2d", cache=sampled_caches[0], student=str(student), image_root=world, max_steps=2,
                batch_size=4, save_every=100, log_every=1)
    logs: list[str] = []
    train(TrainConfig(**base, out=tmp_path / "run"), log=logs.append)
    assert "[train] KL estimator: sampled (the cache's encoding is sampled N=16)" in logs
    kd = [json.loads(line)["loss/kd"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(kd) == 2 and all(math.isfinite(x) and x > 0 for x in kd)
    with pytest.raises(ValueError, match="tail=true needs a topk cache"):
        train(TrainConfig(**base, out=tmp_path / "tail", tail=True))


def test_vllm_cannot_write_sampled_targets(tmp_path, text_teacher_dir, mixed_data):
    with pytest.raises(ValueError, match="vLLM returns only its top-K"):
        run(ExtractConfig(str(text_teacher_dir), mixed_data, tmp_path / "c", backend="vllm", encoding="sampled"))
