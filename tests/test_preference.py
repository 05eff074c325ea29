"""pytest tests/test_preference.py -q   # mathematical properties of modkd.student.preference

Small tensors; the functions under test run in fp32. Expected values are worked by hand (the arithmetic
is in the comments) and evaluated with `math`, or derived analytically in float64, never by calling
the function under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from modkd.student.preference import dpo_loss, kto_loss, kto_pair_loss, sequence_logprobs


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _t(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, requires_grad=grad)


def _close(actual: torch.Tensor, expected, rtol: float = 1e-6, atol: float = 1e-7) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(actual.detach().float(), expected.reshape(actual.shape), rtol=rtol, atol=atol)


# 1. sequence_logprobs


def test_sequence_logprobs_matches_python_loop_and_empty_sequence_is_zero():
    g = _gen(0)
    n, s = 30, 6
    tokens = torch.randn(n, generator=g) * 3 - 2
    index = torch.randint(0, s, (n,), generator=g)
    index[index == 4] = 1  # sequence 4 gets no tokens at all
    out = sequence_logprobs(tokens, index, s)
    expected = [0.0] * s
    for value, i in zip(tokens.tolist(), index.tolist()):
        expected[i] += value
    assert out.shape == (s,) and out.dtype == torch.float32
    assert out[4].item() == 0.0
    _close(out, expected, rtol=1e-5, atol=1e-5)


def test_sequence_logprobs_accumulates_low_precision_input_in_fp32():
    """bf16 tokens, fp32 sum: -0.5 + 299 x -1.0 = -299.5 exactly. bf16 has 8 significant bits, so a bf16
    accumulator could not even hold -299.5 (its spacing is 2 between 256 and 512)."""
    tokens = torch.full((300,), -1.0, dtype=torch.bfloat16)
    tokens[0] = -0.5
    out = sequence_logprobs(tokens, torch.zeros(300, dtype=torch.int64), 1)
    assert out.dtype == torch.float32
    assert out.item() == -299.5


def test_sequence_logprobs_gradient_is_one_per_token():
    g = _gen(1)
    n, s = 25, 4
    tokens = torch.randn(n, generator=g).requires_grad_(True)
    index = torch.randint(0, s, (n,), generator=g)
    sequence_logprobs(tokens, index, s).sum().backward()
    assert torch.equal(tokens.grad, torch.ones(n))
    # with a weight per sequence each token's gradient is its own sequence's weight: it went to the right sum
    tokens.grad = None
    w = torch.tensor([1.0, 10.0, 100.0, 1000.0])
    (sequence_logprobs(tokens, index, s) * w).sum().backward()
    assert torch.equal(tokens.grad, w[index])


# 2. DPO


def test_dpo_golden_values():
    """beta = 0.1.
    pair 0: pi_c - ref_c = -10 - (-11) = 1, pi_r - ref_r = -12 - (-11) = -1
            chosen reward 0.1, rejected -0.1, margin 0.2, loss = -log sigmoid(0.2) = log(1 + e^-0.2)
    pair 1: pi_c - ref_c = -5 - (-5) = 0, pi_r - ref_r = -4 - (-6) = 2
            chosen reward 0, rejected 0.2, margin -0.2, loss = log(1 + e^0.2)
    accuracy 1/2.
    """
    out = dpo_loss(_t(-10, -5), _t(-12, -4), _t(-11, -5), _t(-11, -6), beta=0.1)
    _close(out["losses"], [math.log1p(math.exp(-0.2)), math.log1p(math.exp(0.2))])
    _close(out["chosen_rewards"], [0.1, 0.0])
    _close(out["rejected_rewards"], [-0.1, 0.2])
    _close(out["margins"], [0.2, -0.2])
    assert out["accuracy"].item() == 0.5


def test_dpo_golden_values_other_beta():
    """beta = 1, pair: pi_c - ref_c = 3, pi_r - ref_r = 1: logit 2, loss = log(1 + e^-2), accuracy 1."""
    out = dpo_loss(_t(-7), _t(-9), _t(-10), _t(-10), beta=1.0)
    _close(out["losses"], [math.log1p(math.exp(-2.0))])
    assert out["accuracy"].item() == 1.0


def test_dpo_policy_equals_reference_is_log2_and_grad_is_half_beta():
    g = _gen(2)
    b, beta = 5, 0.1
    chosen, rejected = torch.randn(b, generator=g) * 20 - 50, torch.randn(b, generator=g) * 20 - 50
    pc, pr = chosen.clone().requires_grad_(True), rejected.clone().requires_grad_(True)
    out = dpo_loss(pc, pr, chosen, rejected, beta=beta)
    assert torch.equal(out["losses"], torch.full((b,), math.log(2.0), dtype=torch.float32))
    assert out["accuracy"].item() == 0.0  # equal rewards are not a win
    out["losses"].sum().backward()
    # d/dlogit -log sigmoid(beta logit) at 0 = -beta sigmoid(0) = -beta/2, logit = pi_c - pi_r - const
    _close(pc.grad, [-beta / 2] * b)
    _close(pr.grad, [beta / 2] * b)


def test_dpo_rewards_are_detached():
    pc, pr = _t(-1, -2, grad=True), _t(-3, -4, grad=True)
    out = dpo_loss(pc, pr, _t(-1, -1), _t(-1, -1))
    for key in ("chosen_rewards", "rejected_rewards", "margins", "accuracy"):
        assert not out[key].requires_grad, key


# 3. KTO


def _kto_case():
    """r = policy - ref = [-10+12, -20+20, -30+25, -40+41] = [2, 0, -5, 1]; desirable [T, T, F, F];
    mismatched: policy - ref = [-8+10, -9+10] = [2, 1], mean 1.5 -> z = 1.5."""
    return dict(policy_logps=_t(-10, -20, -30, -40), ref_logps=_t(-12, -20, -25, -41),
                desirable=torch.tensor([True, True, False, False]),
                policy_mismatched=_t(-8, -9), ref_mismatched=_t(-10, -10))


def test_kto_golden_values():
    """beta = 0.1, z = 1.5.
    ex 0 desirable   r = 2:  1 - sigmoid(0.1 (2 - 1.5))    = 1 - sigmoid(0.05)
    ex 1 desirable   r = 0:  1 - sigmoid(0.1 (0 - 1.5))    = 1 - sigmoid(-0.15)
    ex 2 undesirable r = -5: 1 - sigmoid(0.1 (1.5 - -5))   = 1 - sigmoid(0.65)
    ex 3 undesirable r = 1:  1 - sigmoid(0.1 (1.5 - 1))    = 1 - sigmoid(0.05)
    accuracy: 2 > 1.5 yes, 0 > 1.5 no, -5 < 1.5 yes, 1 < 1.5 yes -> 3/4; mean r = (2 + 0 - 5 + 1) / 4 = -0.5
    """
    out = kto_loss(**_kto_case(), beta=0.1)
    _close(out["z"], 1.5)
    _close(out["losses"], [1 - _sig(0.05), 1 - _sig(-0.15), 1 - _sig(0.65), 1 - _sig(0.05)])
    _close(out["rewards"], [0.2, 0.0, -0.5, 0.1])
    _close(out["mean_r"], -0.5)
    assert out["accuracy"].item() == 0.75
    # weights scale each side: desirable x 2, undesirable x 0.5
    out = kto_loss(**_kto_case(), beta=0.1, desirable_weight=2.0, undesirable_weight=0.5)
    _close(out["losses"], [2 * (1 - _sig(0.05)), 2 * (1 - _sig(-0.15)), 0.5 * (1 - _sig(0.65)), 0.5 * (1 - _sig(0.05))])


def test_kto_grad_wrt_policy_is_analytic():
    """d/dr [1 - sigmoid(beta (r - z))] = -beta s'(beta (r - z));
    d/dr [1 - sigmoid(beta (z - r))] = +beta s'(beta (z - r)); s'(x) = s(x)(1 - s(x)); times the side's
    weight. z contributes nothing (detached)."""
    case = _kto_case()
    case["policy_logps"].requires_grad_(True)
    kto_loss(**case, beta=0.1, desirable_weight=2.0, undesirable_weight=0.5)["losses"].sum().backward()
    ds = lambda x: _sig(x) * (1 - _sig(x))  # noqa: E731
    _close(case["policy_logps"].grad, [-2 * 0.1 * ds(0.05), -2 * 0.1 * ds(-0.15), 0.5 * 0.1 * ds(0.65),
                                       0.5 * 0.1 * ds(0.05)])


def test_kto_z_clamped_at_zero():
    """mismatched policy - ref = [-3, -1], mean -2 -> z = 0; the losses then use z = 0:
    ex 0 desirable r = 2: 1 - sigmoid(0.2); ex 2 undesirable r = -5: 1 - sigmoid(0.5)."""
    case = _kto_case()
    case["policy_mismatched"], case["ref_mismatched"] = _t(-13, -11), _t(-10, -10)
    out = kto_loss(**case, beta=0.1)
    assert out["z"].item() == 0.0
    _close(out["losses"], [1 - _sig(0.2), 1 - _sig(0.0), 1 - _sig(0.5), 1 - _sig(-0.1)])
    # r = [2, 0, -5, 1] against z = 0: desirable 2 > 0 yes, 0 > 0 no; undesirable -5 < 0 yes, 1 < 0 no -> 1/2
    assert out["accuracy"].item() == 0.5


def test_kto_z_is_detached():
    case = _kto_case()
    case["policy_logps"].requires_grad_(True)
    case["policy_mismatched"].requires_grad_(True)
    out = kto_loss(**case, beta=0.1)
    assert out["z"].item() > 0  # not clamped: a gradient would flow if z were attached
    assert not out["z"].requires_grad
    out["losses"].sum().backward()
    grad = case["policy_mismatched"].grad
    assert grad is None or torch.equal(grad, torch.zeros_like(grad))


def _split_case(seed: int, b: int):
    g = _gen(seed)
    policy = torch.randn(b, generator=g) * 5 - 30
    ref = policy - torch.randn(b, generator=g) * 2 - 1  # r ~ 1 +- 2
    desirable = torch.rand(b, generator=g) < 0.5
    pol_mm = torch.randn(b, generator=g) * 5 - 30
    ref_mm = pol_mm - torch.linspace(-1.0, 6.0, b)  # mismatched log-ratios rise along the batch: halves differ
    return policy, ref, desirable, pol_mm, ref_mm


def _recorder(store: list):
    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        store.append(t.clone())
        return t
    return all_reduce


def _adder(others: list):
    calls = iter(others)

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        return t + next(calls)
    return all_reduce


@pytest.mark.parametrize("split", [4, 3])  # 4 + 4 and the unequal 3 + 5
def test_kto_z_invariant_to_splitting_the_batch(split):
    """Two simulated processes: each one's all_reduce adds what the other passed to its own all_reduce
    (recorded first with an identity reduce), whatever the packing; z and the losses must equal one
    process on all 8."""
    b, beta = 8, 0.1
    policy, ref, desirable, pol_mm, ref_mm = _split_case(3, b)
    whole = kto_loss(policy, ref, desirable, pol_mm, ref_mm, beta=beta)
    # hand reference: z = clamp(mean of all 8 mismatched log-ratios, 0)
    z_ref = max(0.0, sum((pol_mm.double() - ref_mm.double()).tolist()) / b)
    _close(whole["z"], z_ref, rtol=1e-5, atol=1e-6)

    halves = [slice(0, split), slice(split, b)]
    local = []
    for h in halves:
        store: list = []
        kto_loss(policy[h], ref[h], desirable[h], pol_mm[h], ref_mm[h], beta=beta, all_reduce=_recorder(store))
        assert store, "kto_loss never called all_reduce"
        local.append(store)
    outs = [kto_loss(policy[h], ref[h], desirable[h], pol_mm[h], ref_mm[h], beta=beta, all_reduce=_adder(local[1 - i]))
            for i, h in enumerate(halves)]
    for out in outs:
        _close(out["z"], whole["z"].item(), rtol=1e-6, atol=1e-6)
    _close(torch.cat([o["losses"] for o in outs]), whole["losses"], rtol=1e-6, atol=1e-7)

    if split != b - split:  # the test has power: a mean of per-process means is a different number here
        d = (pol_mm.double() - ref_mm.double()).tolist()
        mean_of_means = (sum(d[:split]) / split + sum(d[split:]) / (b - split)) / 2
        assert abs(mean_of_means - z_ref) > 0.1


def test_kto_no_mismatched_examples_gives_z_zero():
    case = _kto_case()
    case["policy_mismatched"], case["ref_mismatched"] = _t(), _t()
    out = kto_loss(**case, beta=0.1)
    assert out["z"].item() == 0.0 and torch.isfinite(out["losses"]).all()


# 4. kto_pair


def test_kto_pair_golden_values():
    """beta = 0.1.
    chosen log-ratios  c = [-10+12, -20+20] = [2, 0],   mean 1  -> chosen_KL C = 1
    rejected log-ratios r = [-30+27, -40+41] = [-3, 1], mean -1 -> rejected_KL R = 0 (clamped)
    chosen losses:   1 - sigmoid(0.1 (2 - 0)) = 1 - sigmoid(0.2);  1 - sigmoid(0.1 (0 - 0)) = 1/2
    rejected losses: 1 - sigmoid(0.1 (1 - -3)) = 1 - sigmoid(0.4); 1 - sigmoid(0.1 (1 - 1)) = 1/2
    rewards chosen [0.2, 0], rejected [-0.3, 0.1]; margins [0.5, -0.1]; accuracy 1/2.
    """
    out = kto_pair_loss(_t(-10, -20), _t(-30, -40), _t(-12, -20), _t(-27, -41), beta=0.1)
    assert out["losses"].shape == (4,)
    _close(out["losses"], [1 - _sig(0.2), 0.5, 1 - _sig(0.4), 0.5])
    _close(out["chosen_rewards"], [0.2, 0.0])
    _close(out["rejected_rewards"], [-0.3, 0.1])
    _close(out["margins"], [0.5, -0.1])
    assert out["accuracy"].item() == 0.5


def test_kto_pair_gradient_flows_through_kl_terms():
    """c = pi_c - ref_c = [2, 1, 0] (C = mean = 1 > 0), r = pi_r - ref_r = [1, 2, 0] (R = 1 > 0), B = 3, beta = 0.1.
    L = sum_i [1 - s(a_i)] + sum_j [1 - s(b_j)],  a_i = beta (c_i - R),  b_j = beta (C - r_j).
    dL/dpi_c_i = -beta s'(a_i) - (beta / B) sum_j s'(b_j)     (second term: through C)
    dL/dpi_r_j = +beta s'(b_j) + (beta / B) sum_i s'(a_i)     (second term: through R)
    With the KL terms detached only the first terms remain; the two must differ.
    """
    beta, b = 0.1, 3
    pc, pr = _t(-10, -20, -7, grad=True), _t(-30, -40, -5, grad=True)
    rc, rr = _t(-12, -21, -7), _t(-31, -42, -5)
    kto_pair_loss(pc, pr, rc, rr, beta=beta)["losses"].sum().backward()

    c, r = [2.0, 1.0, 0.0], [1.0, 2.0, 0.0]
    big_c, big_r = sum(c) / b, sum(r) / b
    ds = lambda x: _sig(x) * (1 - _sig(x))  # noqa: E731
    sa = [ds(beta * (ci - big_r)) for ci in c]
    sb = [ds(beta * (big_c - rj)) for rj in r]
    grad_c = [-beta * sa[i] - beta / b * sum(sb) for i in range(b)]
    grad_r = [beta * sb[j] + beta / b * sum(sa) for j in range(b)]
    _close(pc.grad, grad_c, rtol=1e-5, atol=1e-8)
    _close(pr.grad, grad_r, rtol=1e-5, atol=1e-8)
    detached_c = torch.tensor([-beta * s for s in sa])
    assert (pc.grad - detached_c).abs().min() > 1e-3  # the KL path contributes ~ beta s'(0) = 0.025 per element


def test_kto_pair_clamped_kl_passes_no_gradient():
    """Both batch means negative: C = R = 0 by the clamp, so each element's gradient is only its own term."""
    beta = 0.1
    pc, pr = _t(-10, -20, grad=True), _t(-30, -40, grad=True)
    rc, rr = _t(-9, -19), _t(-28, -41)  # c = [-1, -1], r = [-2, 1] (mean -0.5)
    kto_pair_loss(pc, pr, rc, rr, beta=beta)["losses"].sum().backward()
    ds = lambda x: _sig(x) * (1 - _sig(x))  # noqa: E731
    _close(pc.grad, [-beta * ds(-0.1), -beta * ds(-0.1)], rtol=1e-5, atol=1e-8)
    _close(pr.grad, [beta * ds(0.2), beta * ds(-0.1)], rtol=1e-5, atol=1e-8)


# 5. Extreme log-ratios stay finite


@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_all_losses_finite_for_large_log_ratios(scale):
    g = _gen(4)
    b = 6
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    pc = (torch.randn(b, generator=g) + scale * signs).requires_grad_(True)
    pr = (torch.randn(b, generator=g) - scale * signs).requires_grad_(True)
    ref = torch.zeros(b)
    outs = [
        dpo_loss(pc, pr, ref, ref)["losses"],
        kto_loss(pc, ref, torch.arange(b) % 3 == 0, pr, ref)["losses"],
        kto_pair_loss(pc, pr, ref, ref)["losses"],
    ]
    for losses in outs:
        assert torch.isfinite(losses).all(), losses
        assert (losses >= 0).all()
    sum(o.sum() for o in outs).backward()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    # DPO at logit beta * 2e4 = 2000 in the wrong direction: the loss is the logit itself, not inf
    out = dpo_loss(_t(-1e4), _t(1e4), _t(0), _t(0), beta=0.1)
    _close(out["losses"], [2000.0], rtol=1e-6, atol=0)
