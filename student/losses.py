"""pytest tests/test_losses.py -q   # the properties every loss here must satisfy

Distillation and LM losses from cached teacher distributions (DESIGN section 6).

Every loss is a *sum* over the positions it is given; the trainer divides by the global number of
distilled tokens, so gradient accumulation and data parallelism do not change the gradient.

Position t's distribution predicts token t + 1: callers pass the hidden states of the predicting
positions (the cache's `positions`) and the token that follows each one as its target.

The student's log-softmax is taken over the full vocabulary in fp32, on chunks of positions, so a
(positions, V) fp32 tensor never exists whole; with more than one chunk each chunk is recomputed in
the backward pass (activation checkpointing) instead of being kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK_POSITIONS = 1024  # 1024 x 152k fp32 logits = 600 MB per chunk for Qwen's vocabulary


def _terms(hidden: torch.Tensor, weight: torch.Tensor, topk_ids: torch.Tensor, targets: torch.Tensor, tail: bool):
    with torch.autocast(hidden.device.type, enabled=False):  # fp32 matmul: bf16 logits would be rounded before the softmax
        logits = F.linear(hidden.float(), weight.float())  # (n, V) fp32
    log_z = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
    logq_topk = logits.gather(1, topk_ids) - log_z  # (n, k) fp32
    logq_target = logits.gather(1, targets[:, None])[:, 0] - log_z[:, 0]  # (n,) fp32
    if not tail:
        return logq_topk, logq_target, torch.full_like(logq_target, float("nan"))
    outside = logits.scatter(1, topk_ids, float("-inf"))  # (n, V): the support removed
    logq_tail = torch.logsumexp(outside, dim=-1) - log_z[:, 0]  # (n,) fp32, -inf if k = V
    return logq_topk, logq_target, logq_tail


def student_logprobs(hidden: torch.Tensor, weight: torch.Tensor, topk_ids: torch.Tensor, targets: torch.Tensor,
                     chunk: int = CHUNK_POSITIONS, tail: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The student's log q at the cached ids, at the target token, and of the tail outside the ids.

    hidden (N, H) at the predicting positions; weight (V, H) the lm_head; topk_ids (N, k) int64 (unique per
    row where the tail is wanted; sampled rows repeat their padding id 0); targets (N,) int64. Returns
    (N, k), (N,), (N,) fp32. The tail is computed as a logsumexp over the tokens outside the ids, so it
    never suffers 1 - sum(q) cancellation; with tail=False it is skipped (NaN), saving a (chunk, V) copy.
    """
    n = hidden.shape[0]
    if n <= chunk:
        return _terms(hidden, weight, topk_ids, targets, tail)
    parts = [checkpoint(_terms, hidden[s : s + chunk], weight, topk_ids[s : s + chunk], targets[s : s + chunk], tail,
                        use_reentrant=False) for s in range(0, n, chunk)]
    return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]


def target_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    chunk: int = CHUNK_POSITIONS) -> torch.Tensor:
    """log q(target) (N,) fp32 under the student's full-vocabulary log-softmax, chunked as `student_logprobs`
    (preference losses need only this, not the cached top-k)."""
    no_ids = targets.new_zeros((targets.shape[0], 0))  # (N, 0): no cached support
    return student_logprobs(hidden, weight, no_ids, targets, chunk, tail=False)[1]


def forward_kl(logq: torch.Tensor, p: torch.Tensor, p_tail: torch.Tensor | None = None,
               logq_tail: torch.Tensor | None = None) -> torch.Tensor:
    """Per-position forward KL(p || q) over a cached sparse distribution; (N,) fp32.

    logq (N, n): the student's full-vocabulary log-softmax at the cached ids; p (N, n): the teacher's
    probabilities there (`rec.target_probs`: top-k renormalised, or sampled counts / N), 0 on padding
    entries, which add nothing. The sum is sum_i p_i (log p_i - log q_i); its gradient in the student's
    logits is q - p on the support, so it is unbiased exactly when E[p] is the teacher's distribution
    (sampled targets; renormalised top-k is biased toward the head).

    With the tail bucket, p sums to 1 - p_tail and p_tail (N,) is the mass outside the ids, against
    logq_tail = log(1 - sum_i q_i): the exact KL between the two (n + 1)-bucket distributions. With the
    whole vocabulary cached every form equals full-vocabulary KL.
    """
    p = p.float()  # (N, n)
    head = torch.where(p > 0, p * (torch.log(p.clamp(min=1e-30)) - logq), torch.zeros_like(logq)).sum(-1)  # (N,)
    if p_tail is None:
        return head
    # q_tail = 0 (logq_tail = -inf) only when the ids cover the whole vocabulary: then p_tail is rounding, not mass
    has_tail = (p_tail > 0) & (logq_tail > float("-inf"))
    safe_tail = torch.where(has_tail, logq_tail, torch.zeros_like(logq_tail))  # 0 * -inf would be NaN
    tail = torch.where(has_tail, p_tail * (torch.log(p_tail.clamp(min=1e-30)) - safe_tail), torch.zeros_like(p_tail))
    return head + tail


def kd_estimator(encoding: str, tail: bool) -> str:
    """What the KL term estimates from, fixed by the cache's encoding (its manifest), never by a second flag:
    "renormalised" top-k, top-k plus the "tail bucket" (`tail=true`), or "sampled" counts / N (unbiased)."""
    if encoding == "sampled":
        if tail:
            raise ValueError("tail=true needs a topk cache: a sampled cache stores no tail mass, and its counts / N "
                             "already estimate the whole distribution without bias; drop --set tail=true")
        return "sampled"
    return "tail bucket" if tail else "renormalised"


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of `values` (N,) where `mask` (N,) is true; 0 (not NaN) when nothing is selected."""
    return torch.where(mask, values, torch.zeros_like(values)).sum()


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32 at least: bf16 / fp16 are upcast, fp64 (the tests' reference precision) is kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def blocks(values: torch.Tensor, sizes: torch.Tensor, square: bool = False) -> torch.Tensor:
    """Consecutive per-record blocks, zero-padded into one batch tensor (no Python loop over records).

    sizes (R,) int64: each block's n. Rows (square=False): values (sum n, D) -> (R, n_max, D). Matrices
    (square=True): values (sum n^2,), each block an (n, n) matrix flattened row-major -> (R, n_max, n_max).
    The padding is 0 and carries no gradient, so a zero-padded relation matrix has the same cosine as the
    unpadded one (zeros add nothing to the dot product or the norms).
    """
    r = torch.arange(sizes.numel(), device=values.device)  # (R,)
    sizes = sizes.to(values.device)
    n_max = int(sizes.max()) if sizes.numel() else 0
    per = sizes * sizes if square else sizes  # (R,) entries per block
    owner = torch.repeat_interleave(r, per)  # (E,) the block of each entry
    within = torch.arange(owner.numel(), device=values.device) - (torch.cumsum(per, 0) - per)[owner]  # (E,)
    if square:
        n = sizes[owner]  # (E,)
        out = values.new_zeros((sizes.numel(), n_max, n_max))  # (R, n_max, n_max)
        return out.index_put((owner, within // n, within % n), values)
    out = values.new_zeros((sizes.numel(), n_max, values.shape[-1]))  # (R, n_max, D)
    return out.index_put((owner, within), values)


def logit_relation(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """LLaVA-KD's relation matrix R = Y_v Y_v^T (Eq. 4), Y_v = hidden W^T the raw logits at the image tokens.

    hidden (..., n, H) at the n = N_p image-token positions (a batch of zero-padded records: (R, n_max, H));
    weight (V, H) the (bias-free) lm_head. Returns (..., n, n) fp32, computed as hidden (W^T W) hidden^T: the
    (H, H) Gram once per call, whatever the batch (V H^2, against M V H for the M = R N_p image tokens' explicit
    logits: cheaper once M > H, as in any batch of images), and no (M, V) logits tensor. Exact algebra; its
    gradient reaches both the hidden states and the lm_head.
    """
    with torch.autocast(hidden.device.type, enabled=False):  # fp32: bf16 would round the Gram's large sums
        w = _fp32(weight)  # (V, H)
        h = _fp32(hidden)  # (..., n, H)
        return (h @ (w.T @ w)) @ h.transpose(-1, -2)  # (..., n, n) fp32


def embedding_relation(embeds: torch.Tensor) -> torch.Tensor:
    """The authors' released-code form of RDist's matrix: cosine self-correlation of the projected image
    embeddings embeds (..., n, D) (the LLM's input rows at the image tokens). Returns (..., n, n) fp32, entries in
    [-1, 1]; a zero (padding) row gives a zero row and column."""
    with torch.autocast(embeds.device.type, enabled=False):
        e = F.normalize(_fp32(embeds), dim=-1)  # (..., n, D)
        return e @ e.transpose(-1, -2)  # (..., n, n)


def relation_loss(r_s: torch.Tensor, r_t: torch.Tensor) -> torch.Tensor:
    """L_rel = 1 - cos(R_s, R_t) (llava-kd Eq. 5): the cosine of the two (n, n) matrices as vectors; fp32, one
    value per matrix: 0-dim for (n, n) inputs, (R,) for a batch (R, n, n).

    0 for identical matrices and invariant to a positive scale of either (so of the logits: R scales by c^2).
    A zero matrix has no direction: its cosine is taken as 0 (loss 1), never NaN.
    """
    s, t = _fp32(r_s).flatten(-2), _fp32(r_t).flatten(-2)  # (..., n * n)
    return 1.0 - (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1)).clamp(min=1e-30)
