"""pytest tests/test_student_model.py -q -k routing   # routing strategies, aux loss, expert load

Training-time routing for an upcycled (Qwen2-MoE) student, attached with forward hooks so the saved
model stays a plain transformers model that routes by top-k at inference:

* `topk`    the router as transformers runs it (default);
* `jitter`  the router input is multiplied by U(1 - 0.01, 1 + 0.01) elementwise, in training only;
* `rsample` each token's experts are drawn without replacement from softmax(logits) with the Gumbel
            top-k trick, in training only (DeepSpeed's RSample). Its point is exploration for top-1;
            for k >= 2 the weights are still the softmax values of the drawn experts.

`RouterTap` also records every router's logits during a forward pass, for the load-balancing aux
loss (Switch/Mixtral form, added once by the trainer) and the per-layer expert load that is logged.
"""

from __future__ import annotations

import torch
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter, load_balancing_loss_func

ROUTINGS = ("topk", "jitter", "rsample")
JITTER_EPS = 0.01  # Switch Transformer's and DeepSpeed's multiplicative jitter


class RouterTap:
    """Hooks on every router of `model`: applies `routing` in training and records router logits."""

    def __init__(self, model: torch.nn.Module, routing: str = "topk") -> None:
        if routing not in ROUTINGS:
            raise ValueError(f"unknown routing {routing!r}; choose one of {', '.join(ROUTINGS)}")
        self.routers = [m for m in model.modules() if isinstance(m, Qwen2MoeTopKRouter)]
        self.routing = routing
        self.logits: list[torch.Tensor] = []  # one (tokens, E) per router, in layer order, for the last forward
        self.handles = []
        for router in self.routers:
            if routing == "jitter":
                self.handles.append(router.register_forward_pre_hook(_jitter))
            self.handles.append(router.register_forward_hook(self._after))

    def _after(self, router: Qwen2MoeTopKRouter, inputs, output):
        logits, weights, indices = output  # (n, E), (n, k), (n, k)
        self.logits.append(logits)
        if self.routing == "rsample" and router.training:
            probs = torch.softmax(logits, dim=-1, dtype=torch.float)  # (n, E) fp32
            gumbel = -torch.log(-torch.log(torch.rand_like(probs).clamp(1e-20, 1.0)))  # (n, E)
            indices = torch.topk(probs.log() + gumbel, router.top_k, dim=-1).indices  # (n, k) sampled experts
            weights = probs.gather(1, indices)  # (n, k)
            if router.norm_topk_prob:
                weights = weights / weights.sum(-1, keepdim=True)
            return logits, weights.to(logits.dtype), indices
        return None

    def reset(self) -> None:
        self.logits = []

    def aux_loss(self, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Switch/Mixtral load-balancing loss over all routers of the last forward (0 for a dense model)."""
        if not self.logits:
            return torch.zeros(())
        router = self.routers[0]
        return load_balancing_loss_func(tuple(self.logits), router.num_experts, router.top_k, attention_mask)

    @torch.no_grad()
    def expert_load(self, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
        """Per router: the share of (real) tokens routed to each expert by top-k, (E,) summing to 1."""
        keep = None if attention_mask is None else attention_mask.reshape(-1).bool()
        out = []
        for router, logits in zip(self.routers, self.logits):
            chosen = logits.topk(router.top_k, dim=-1).indices  # (n, k)
            if keep is not None:
                chosen = chosen[keep]
            counts = torch.bincount(chosen.reshape(-1), minlength=router.num_experts).float()  # (E,)
            out.append(counts / counts.sum().clamp(min=1))
        return out

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _jitter(router: Qwen2MoeTopKRouter, inputs):
    if not router.training:
        return None
    (hidden,) = inputs
    noise = torch.empty_like(hidden).uniform_(1.0 - JITTER_EPS, 1.0 + JITTER_EPS)  # (n, H)
    return (hidden * noise,)
