"""python -c "from modkd.extract.relation import logit_relations; help(logit_relations)"

The teacher's LLaVA-KD relation matrices (RDist, llava-kd Eq. 4) for `mod-extract --relation logits|embeddings`
(hf backend only: vLLM returns no hidden states).

`logits` (the paper's Eq. 4): R_t = Y_v Y_v^T, Y_v (N_p, V) the teacher's raw next-token logits at the record's
N_p image-token positions over the tokenizer's V tokens. Computed without a (N_p, V) tensor: with the lm_head
y = W h + b (W the first V rows), Y Y^T = H G H^T + (H u) 1^T + 1 (H u)^T + |b|^2 with G = W^T W (H x H) and
u = W^T b, both accumulated once in fp32 over chunks of vocabulary rows. Exact for a linear lm_head (LLaVA's
Qwen / Llama / CLIP-text LLMs); a model that post-processes logits (soft-capping, logit scale) is not covered.

`embeddings` (the authors' released inference-code form, DESIGN section 6): the cosine self-correlation of the
projected image embeddings, i.e. the rows of the LLM's `inputs_embeds` at the image-token positions,
L2-normalised: R = E E^T. It needs no logits at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GRAM_ROWS = 16384  # vocabulary rows per fp32 chunk of W^T W: 16k x 4k hidden x 4 B = 256 MiB at 7B width


@torch.no_grad()
def lm_head_gram(lm_head: torch.nn.Module, vocab: int, rows: int = GRAM_ROWS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(G (H, H) fp32 = W^T W, u (H,) fp32 = W^T b, |b|^2 0-dim fp32) over the first `vocab` lm_head rows."""
    weight = lm_head.weight[:vocab]  # (V, H)
    bias = getattr(lm_head, "bias", None)
    H = weight.shape[1]
    gram = torch.zeros((H, H), dtype=torch.float32, device=weight.device)  # (H, H)
    u = torch.zeros(H, dtype=torch.float32, device=weight.device)  # (H,)
    b2 = torch.zeros((), dtype=torch.float32, device=weight.device)
    for s in range(0, vocab, rows):
        w = weight[s : s + rows].float()  # (c, H) fp32
        gram += w.T @ w
        if bias is not None:
            b = bias[s : s + rows].float()  # (c,)
            u += w.T @ b
            b2 += b @ b
    return gram, u, b2


def logit_relation(hidden: torch.Tensor, gram: torch.Tensor, u: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """R = Y Y^T (n, n) fp32 for Y = hidden W^T + b, from hidden (n, H) and lm_head_gram's terms."""
    h = hidden.float()  # (n, H)
    hu = h @ u  # (n,)
    return h @ gram @ h.T + hu[:, None] + hu[None, :] + b2  # (n, n) fp32


def embedding_relation(embeds: torch.Tensor) -> torch.Tensor:
    """R = E E^T (n, n) fp32 of the L2-normalised rows of embeds (n, D): cosine self-correlation."""
    e = F.normalize(embeds.float(), dim=-1)  # (n, D)
    return e @ e.T  # (n, n)


@torch.no_grad()
def relations(form: str, input_ids: torch.Tensor, hidden: torch.Tensor, embeds: torch.Tensor | None,
              image_token_id: int, gram_terms: tuple | None) -> list:
    """Per row of a right-padded batch: its relation matrix (n, n) fp32 numpy over its image tokens, or None."""
    out = []
    for b in range(input_ids.shape[0]):
        idx = (input_ids[b] == image_token_id).nonzero()[:, 0]  # (n,) image-token positions in order
        if idx.numel() == 0:
            out.append(None)
        elif form == "logits":
            out.append(logit_relation(hidden[b, idx], *gram_terms).cpu().numpy())
        else:
            out.append(embedding_relation(embeds[b, idx]).cpu().numpy())
    return out
