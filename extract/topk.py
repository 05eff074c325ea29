"""python -c "from modkd.extract.topk import topk_logprobs, sampled_ids; help(topk_logprobs)"

Top-k teacher log-probs, or draws from the teacher's distribution, from hidden states, a chunk of
positions at a time.

The lm_head runs on at most `chunk` positions at once, so the largest float32 tensor is (chunk, V):
a (B, T, V) logits tensor never exists (V=152k, T=2048 would be 1.2 GB per sequence).

Distributions are over the tokenizer's vocabulary, the first `vocab` lm_head rows: Qwen's 7B models carry
152,064 rows for a 151,646-token tokenizer (their students 151,936). The padding rows' logits are dropped
before the log-softmax and top-k, so no stored id is >= len(tokenizer) and no mass sits on them.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 1 << 28  # 256 MiB of float32 logits per chunk: small next to a 7B teacher, big enough to keep the GPU busy


def default_chunk(vocab_size: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab_size))


@torch.no_grad()
def topk_logprobs(
    hidden: torch.Tensor,  # (N, H) teacher hidden states at the stored positions, model dtype
    lm_head: torch.nn.Module,  # the teacher's output embedding, H -> V
    targets: torch.Tensor,  # (N,) int64: the token each position predicts (input_ids[t+1])
    k: int,
    chunk: int,
    vocab: int | None = None,  # the tokenizer's size; None: every lm_head row is a token
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns top-k ids (N, k) int32, their log-probs (N, k) fp32 and the target's log-prob (N,) fp32,
    all normalised over the vocabulary's `vocab` tokens (the lm_head's padding rows excluded)."""
    ids, lps, tgt = [], [], []
    for start in range(0, hidden.shape[0], chunk):
        logits = lm_head(hidden[start : start + chunk])[:, :vocab].float()  # (C, V) fp32, padding rows dropped
        logp = torch.log_softmax(logits, dim=-1)  # (C, V) fp32
        top_lp, top_id = logp.topk(k, dim=-1, sorted=True)  # (C, k)
        ids.append(top_id.to(torch.int32))
        lps.append(top_lp)
        tgt.append(logp.gather(-1, targets[start : start + chunk, None]).squeeze(-1))  # (C,)
        del logits, logp
    if not ids:
        empty = hidden.new_zeros((0, k), dtype=torch.float32)
        return empty.to(torch.int32), empty, hidden.new_zeros((0,), dtype=torch.float32)
    return torch.cat(ids), torch.cat(lps), torch.cat(tgt)


@torch.no_grad()
def sampled_ids(
    hidden: torch.Tensor,  # (N, H) teacher hidden states at the stored positions, model dtype
    lm_head: torch.nn.Module,
    targets: torch.Tensor,  # (N,) int64
    uniforms: torch.Tensor,  # (N, S) float64 in [0, 1): store.encoding.sample_uniforms of each position
    chunk: int,
    vocab: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns S draws per position (N, S) int64 from the teacher's distribution at temperature 1 over the
    `vocab` tokens, by inverse CDF: draw j is the first token whose float64 cumulative probability exceeds
    uniforms[:, j] (a token of probability 0 is never drawn); and the target's log-prob (N,) fp32."""
    draws, tgt = [], []
    for start in range(0, hidden.shape[0], chunk):
        logits = lm_head(hidden[start : start + chunk])[:, :vocab].float()  # (C, V) fp32, padding rows dropped
        logp = torch.log_softmax(logits, dim=-1)  # (C, V) fp32
        cdf = logp.double().exp_().cumsum_(dim=-1)  # (C, V) float64 in place (2x the chunk): fp32 would lose the tail
        u = uniforms[start : start + chunk].to(cdf.device) * cdf[:, -1:]  # (C, S): scaled to the float64 total
        draws.append(torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[1] - 1))  # (C, S)
        tgt.append(logp.gather(-1, targets[start : start + chunk, None]).squeeze(-1))  # (C,)
        del logits, logp, cdf
    if not draws:
        return hidden.new_zeros((0, uniforms.shape[1]), dtype=torch.int64), hidden.new_zeros((0,), dtype=torch.float32)
    return torch.cat(draws), torch.cat(tgt)
