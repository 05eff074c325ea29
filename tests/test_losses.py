"""pytest tests/test_losses.py -q   # mathematical properties of modkd.student.losses

Small tensors from seeded torch.Generators, the functions under test run in fp32; references are
computed independently (full-vocabulary KL, analytic gradients, hand-worked numbers), in float64
where an exact reference helps.

Trick used below: with weight = eye(V) (H = V) the student's logits are the hidden states
themselves, so a gradient w.r.t. `hidden` is the gradient w.r.t. the logits z.
"""

from __future__ import annotations

import math

import pytest
import torch

from modkd.student.losses import forward_kl, masked_sum, student_logprobs

MODES = ["renorm", "tail"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _kl(logq_topk, logp_topk, logq_tail, mode):
    """The two top-k estimators from the teacher's top-k log-probs: renormalised, or true p plus the tail bucket."""
    if mode == "renorm":
        return forward_kl(logq_topk, torch.softmax(logp_topk.float(), dim=-1))
    p = logp_topk.float().exp()  # (N, k)
    return forward_kl(logq_topk, p, (1.0 - p.sum(-1)).clamp(min=0.0), logq_tail)


def _perms(n: int, v: int, g: torch.Generator) -> torch.Tensor:
    """(n, v) int64: a random permutation of arange(v) per row, i.e. top-k ids with k = V in random order."""
    return torch.stack([torch.randperm(v, generator=g) for _ in range(n)])


def _teacher_topk(n: int, v: int, k: int, g: torch.Generator, scale: float = 3.0):
    """The teacher's true top-k of random logits: ids (n, k) int64, log-probs (n, k) fp32, full log-probs (n, v) fp64."""
    logp = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * scale, dim=-1)  # (n, v) fp64
    logp_topk, ids = logp.topk(k, dim=-1)  # (n, k)
    return ids, logp_topk.float(), logp


def _logits_as_hidden(z: torch.Tensor):
    """hidden = z (n, V) leaf, weight = eye(V): student_logprobs then sees logits exactly z."""
    hidden = z.clone().float().requires_grad_(True)
    weight = torch.eye(z.shape[1])
    return hidden, weight


def _full_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary KL(p || q) per row, independent of the code under test."""
    return torch.nn.functional.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)


# 1. KL of a distribution with itself is 0


@pytest.mark.parametrize("mode", MODES)
def test_forward_kl_identical_full_support_is_zero(mode):
    g = _gen(1)
    n, v, h = 16, 20, 8
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)
    ids, targets = _perms(n, v, g), torch.randint(0, v, (n,), generator=g)
    logq_topk, _, logq_tail = student_logprobs(hidden, weight, ids, targets)
    assert torch.isneginf(logq_tail).all()  # k = V: nothing outside the support
    logp_topk = torch.log_softmax(hidden @ weight.T, dim=-1).gather(1, ids)  # teacher == student
    kl = _kl(logq_topk, logp_topk, logq_tail, mode)
    assert kl.shape == (n,)
    torch.testing.assert_close(kl, torch.zeros(n), rtol=0, atol=1e-6)


def test_forward_kl_identical_with_tail_bucket_is_zero():
    g = _gen(2)
    n, v, h, k = 32, 30, 8, 4
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)
    ids = _perms(n, v, g)[:, :k]
    targets = torch.randint(0, v, (n,), generator=g)
    logq_topk, _, logq_tail = student_logprobs(hidden, weight, ids, targets)
    assert torch.isfinite(logq_tail).all()
    kl = _kl(logq_topk, logq_topk.detach().clone(), logq_tail, "tail")  # p == q on the k ids and (so) on the tail
    torch.testing.assert_close(kl, torch.zeros(n), rtol=0, atol=1e-6)


# 2. KL is non-negative


@pytest.mark.parametrize("mode", MODES)
def test_forward_kl_nonnegative(mode):
    g = _gen(3)
    n, v, h, k = 64, 50, 16, 5
    ids, logp_topk, _ = _teacher_topk(n, v, k, g)
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    logq_topk, _, logq_tail = student_logprobs(hidden, weight, ids, targets)
    kl = _kl(logq_topk, logp_topk, logq_tail, mode)
    assert torch.isfinite(kl).all()
    assert (kl >= 0).all(), kl.min()
    assert (kl > 1e-3).any()  # a random student is not the teacher


@pytest.mark.parametrize("mode", MODES)
def test_forward_kl_nonnegative_near_teacher(mode):
    """A student close to the teacher: KL is small, and rounding must not push it below -1e-6."""
    g = _gen(4)
    n, v, k = 64, 50, 5
    ids, logp_topk, logp = _teacher_topk(n, v, k, g)
    z = logp.float() + 1e-3 * torch.randn(n, v, generator=g)  # student logits ~ teacher log-probs
    hidden, weight = _logits_as_hidden(z)
    logq_topk, _, logq_tail = student_logprobs(hidden, weight, ids, torch.zeros(n, dtype=torch.int64))
    kl = _kl(logq_topk, logp_topk, logq_tail, mode)
    assert (kl >= -1e-6).all(), kl.min()
    if mode == "tail":  # the exact (k + 1)-bucket KL
        assert (kl < 1e-3).all()
    else:  # sum_S p^ (log p^ - log q) = KL(p^ || q^) - log q(S), and q^ ~ p^ here
        torch.testing.assert_close(kl, -logq_topk.detach().exp().sum(-1).log(), rtol=0, atol=1e-3)


# 3. Anchor: k = V equals the full-vocabulary KL, in value and gradient


@pytest.mark.parametrize("mode", MODES)
def test_forward_kl_full_support_equals_full_kl_value_and_grad(mode):
    g = _gen(5)
    n, v, h = 24, 40, 12
    hidden0, weight0 = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) / math.sqrt(h) * 3
    logp = torch.log_softmax(torch.randn(n, v, generator=g) * 2, dim=-1)  # (n, v) fp32 teacher
    ids, targets = _perms(n, v, g), torch.randint(0, v, (n,), generator=g)

    hidden, weight = hidden0.clone().requires_grad_(True), weight0.clone().requires_grad_(True)
    logq_topk, _, logq_tail = student_logprobs(hidden, weight, ids, targets)
    kl = _kl(logq_topk, logp.gather(1, ids), logq_tail, mode)
    kl.sum().backward()

    hidden_ref = hidden0.double().requires_grad_(True)
    weight_ref = weight0.double().requires_grad_(True)
    kl_ref = _full_kl(logp.double(), torch.log_softmax(hidden_ref @ weight_ref.T, dim=-1))
    kl_ref.sum().backward()

    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl, kl_ref.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad, hidden_ref.grad.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, weight_ref.grad.float(), rtol=1e-5, atol=1e-6)


# 4. Chunking (with activation checkpointing) changes nothing


def test_student_logprobs_chunked_equals_unchunked():
    g = _gen(6)
    n, v, h, k = 20, 30, 8, 4
    hidden0, weight0 = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)
    ids = _perms(n, v, g)[:, :k]
    targets = torch.randint(0, v, (n,), generator=g)
    _, logp_topk, _ = _teacher_topk(n, v, k, g)
    results = []
    for chunk in (3, 1000):  # 3 does not divide 20: the last chunk is short
        hidden, weight = hidden0.clone().requires_grad_(True), weight0.clone().requires_grad_(True)
        outs = student_logprobs(hidden, weight, ids, targets, chunk=chunk)
        loss = _kl(outs[0], logp_topk, outs[2], "tail").sum() - outs[1].sum() + _kl(outs[0], logp_topk, None, "renorm").sum()
        loss.backward()
        results.append((outs, hidden.grad, weight.grad))
    (outs_c, gh_c, gw_c), (outs_u, gh_u, gw_u) = results
    assert [o.shape for o in outs_c] == [(n, k), (n,), (n,)]
    for a, b in zip(outs_c, outs_u):  # the lm_head matmul may round differently per chunk shape (seen on AMD EPYC
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # BLAS: 9.5e-7 on a tail log-prob near 0): fp32 noise
    # the weight gradient is accumulated over chunks in another order: fp32 summation-order noise only
    torch.testing.assert_close(gh_c, gh_u, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw_c, gw_u, rtol=1e-5, atol=1e-6)


# 5. Nothing selected: 0, never NaN


def test_masked_sum_all_masked_is_zero_with_zero_grad():
    values = torch.randn(7, generator=_gen(7)).requires_grad_(True)
    out = masked_sum(values, torch.zeros(7, dtype=torch.bool))
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(values.grad, torch.zeros(7))


def test_masked_sum_empty_is_zero():
    values = torch.zeros(0, requires_grad=True)
    out = masked_sum(values, torch.zeros(0, dtype=torch.bool))
    assert out.shape == () and out.item() == 0.0
    out.backward()
    assert values.grad.shape == (0,)


@pytest.mark.parametrize("mode", MODES)
def test_forward_kl_no_positions_returns_empty(mode):
    v, h, k = 10, 4, 3
    hidden = torch.zeros(0, h, requires_grad=True)
    weight = torch.randn(v, h, generator=_gen(8), requires_grad=True)
    logq_topk, logq_target, logq_tail = student_logprobs(
        hidden, weight, torch.zeros(0, k, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    kl = _kl(logq_topk, torch.zeros(0, k), logq_tail, mode)
    assert kl.shape == (0,) and logq_target.shape == (0,)
    loss = masked_sum(kl, torch.zeros(0, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(weight.grad, torch.zeros(v, h))


# 6. masked_sum selects exactly the masked positions


def test_masked_sum_selects_exactly_the_mask():
    g = _gen(9)
    values = torch.randn(40, generator=g).requires_grad_(True)
    mask = torch.rand(40, generator=g) < 0.4
    assert 0 < mask.sum() < 40
    out = masked_sum(values, mask)
    torch.testing.assert_close(out, values.detach()[mask].sum(), rtol=1e-6, atol=0)
    out.backward()
    assert torch.equal(values.grad, mask.float())  # d/dv_i = 1 exactly where selected, 0 elsewhere


def test_masked_sum_ignores_non_finite_values_outside_the_mask():
    values = torch.tensor([1.0, float("nan"), 2.0, float("inf"), -float("inf")], requires_grad=True)
    mask = torch.tensor([True, False, True, False, False])
    out = masked_sum(values, mask)
    assert out.item() == 3.0
    out.backward()
    assert torch.equal(values.grad, torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0]))


# 7. Tail stability at the edges of fp32


def _near_complete_case(seed: int):
    """Teacher top-k holds all but ~1e-9 of its mass; the student's tail is ~e^-40. Logits as hidden."""
    g = _gen(seed)
    n, v, k = 16, 50, 5
    ids = _perms(n, v, g)[:, :k]
    on_support = torch.zeros(n, v, dtype=torch.bool).scatter(1, ids, True)
    head = torch.randn(n, v, generator=g, dtype=torch.float64)
    teacher = torch.where(on_support, head, head + math.log(1e-9 / (v - k)))  # tail mass ~1e-9
    logp = torch.log_softmax(teacher, dim=-1)  # (n, v) fp64
    student = torch.where(on_support, torch.randn(n, v, generator=g, dtype=torch.float64),
                          torch.randn(n, v, generator=g, dtype=torch.float64) - 40.0)
    return ids, logp, student


def test_forward_kl_tail_stable_when_tails_are_tiny():
    ids, logp, z = _near_complete_case(10)
    hidden, weight = _logits_as_hidden(z)
    logq_topk, _, logq_tail = student_logprobs(hidden, weight, ids, torch.zeros(len(ids), dtype=torch.int64))
    assert torch.isfinite(logq_tail).all() and (logq_tail < -30).all()  # log space: no underflow to -inf
    kl = _kl(logq_topk, logp.gather(1, ids).float(), logq_tail, "tail")
    assert torch.isfinite(kl).all()
    kl_ref = _full_kl(logp, torch.log_softmax(z, dim=-1)).float()
    torch.testing.assert_close(kl, kl_ref, rtol=1e-5, atol=1e-5)
    kl.sum().backward()
    assert torch.isfinite(hidden.grad).all()


def test_forward_kl_tail_stable_when_teacher_mass_exceeds_one():
    ids, logp, z = _near_complete_case(11)
    logp_topk = logp.gather(1, ids).float() + 1e-6  # cached log-probs that sum to slightly more than 1
    assert (logp_topk.double().exp().sum(-1) > 1).all()
    hidden, weight = _logits_as_hidden(z)
    logq_topk, _, logq_tail = student_logprobs(hidden, weight, ids, torch.zeros(len(ids), dtype=torch.int64))
    kl = _kl(logq_topk, logp_topk, logq_tail, "tail")
    assert torch.isfinite(kl).all()
    assert (kl >= -1e-6).all(), kl.min()
    kl.sum().backward()
    assert torch.isfinite(hidden.grad).all()


# 8. Golden analytic gradients w.r.t. the student's logits


def test_forward_kl_full_support_grad_is_q_minus_p():
    """k = V: d/dz sum_i p_i (log p_i - log softmax(z)_i) = softmax(z) - p, in both modes."""
    g = _gen(12)
    n, v = 8, 12
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    logp = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 2, dim=-1)
    ids = _perms(n, v, g)
    expected = (torch.softmax(z, dim=-1) - logp.exp()).float()
    for mode in MODES:
        hidden, weight = _logits_as_hidden(z)
        logq_topk, _, logq_tail = student_logprobs(hidden, weight, ids, torch.zeros(n, dtype=torch.int64))
        _kl(logq_topk, logp.gather(1, ids).float(), logq_tail, mode).sum().backward()
        torch.testing.assert_close(hidden.grad, expected, rtol=1e-5, atol=1e-6, msg=mode)


def test_forward_kl_renorm_grad_is_q_minus_renormalised_p():
    """k < V, no tail: L = sum_S p^_i (log p^_i - z_i + lse z), so dL/dz = q - p^ (p^ zero off the support)."""
    g = _gen(13)
    n, v, k = 8, 12, 4
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    ids, logp_topk, _ = _teacher_topk(n, v, k, g, scale=2.0)
    p_hat = torch.zeros(n, v, dtype=torch.float64).scatter(1, ids, torch.softmax(logp_topk.double(), dim=-1))
    hidden, weight = _logits_as_hidden(z)
    logq_topk, _, _ = student_logprobs(hidden, weight, ids, torch.zeros(n, dtype=torch.int64))
    _kl(logq_topk, logp_topk, None, "renorm").sum().backward()
    torch.testing.assert_close(hidden.grad, (torch.softmax(z, dim=-1) - p_hat).float(), rtol=1e-5, atol=1e-6)


def test_forward_kl_tail_grad_spreads_teacher_tail_like_student_tail():
    """k < V, tail bucket: dL/dz_j = q_j - p_j on the support and q_j - p_tail * q_j / q_tail off it."""
    g = _gen(14)
    n, v, k = 8, 12, 4
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    ids, logp_topk, _ = _teacher_topk(n, v, k, g, scale=2.0)
    q = torch.softmax(z, dim=-1)
    on_support = torch.zeros(n, v, dtype=torch.bool).scatter(1, ids, True)
    p_tail = 1 - logp_topk.double().exp().sum(-1, keepdim=True)
    q_tail = (q * ~on_support).sum(-1, keepdim=True)
    p_tilde = torch.where(on_support, torch.zeros(n, v, dtype=torch.float64).scatter(1, ids, logp_topk.double().exp()),
                          p_tail * q / q_tail)
    hidden, weight = _logits_as_hidden(z)
    logq_topk, _, logq_tail = student_logprobs(hidden, weight, ids, torch.zeros(n, dtype=torch.int64))
    _kl(logq_topk, logp_topk, logq_tail, "tail").sum().backward()
    torch.testing.assert_close(hidden.grad, (q - p_tilde).float(), rtol=1e-5, atol=1e-6)


# 9. Golden values worked by hand


def test_forward_kl_golden_values():
    """V = 3, k = 2.  Student q = (1/2, 1/4, 1/4); teacher p = (0.6, 0.3, 0.1), cached ids {0, 1}.

    renorm: p^ = (2/3, 1/3); KL = 2/3 log((2/3)/(1/2)) + 1/3 log((1/3)/(1/4)) = log(4/3) = 0.28768207245178085
    tail:   0.6 log(0.6/0.5) + 0.3 log(0.3/0.25) + 0.1 log(0.1/0.25) = 0.9 log 1.2 + 0.1 log 0.4
            = 0.9 * 0.18232155679395462 - 0.1 * 0.916290731874155 = 0.07246032792714363
    Row 1 lists the same ids in the other order: the value must not change.
    target log q: row 0 target 2 -> log(1/4) = -1.3862943611198906; row 1 target 0 -> log(1/2) = -0.6931471805599453
    """
    z = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]])) + torch.tensor([[0.0], [7.0]])  # shift-invariant
    hidden, weight = _logits_as_hidden(z)
    ids = torch.tensor([[0, 1], [1, 0]])
    logp_topk = torch.log(torch.tensor([[0.6, 0.3], [0.3, 0.6]]))
    logq_topk, logq_target, logq_tail = student_logprobs(hidden, weight, ids, torch.tensor([2, 0]))
    torch.testing.assert_close(logq_tail, torch.full((2,), -1.3862943611198906), rtol=1e-6, atol=0)  # log q(2) = log 1/4
    torch.testing.assert_close(logq_target, torch.tensor([-1.3862943611198906, -0.6931471805599453]), rtol=1e-6, atol=0)
    torch.testing.assert_close(_kl(logq_topk, logp_topk, None, "renorm"), torch.full((2,), 0.28768207245178085),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(_kl(logq_topk, logp_topk, logq_tail, "tail"), torch.full((2,), 0.07246032792714363),
                               rtol=1e-5, atol=0)
