"""pytest tests/test_preference.py -q   # the properties every loss here must satisfy

Preference losses on summed sequence log-probs (DESIGN section 6): DPO, KTO and TRL's removed
`kto_pair`. Pure functions of (B,) fp32 tensors; no model, no trainer, no process group.

Every function returns *per-example* losses (no mean): the trainer sums them and divides by the
global number of examples, so gradient accumulation and data parallelism do not change the gradient.
Rewards, margins, `mean_r` and accuracies are detached diagnostics for logging.

Inputs are the summed log-probs of the response tokens (`sequence_logprobs`), policy = the student,
reference = the frozen model the rewards are measured against (with KD, the teacher). sigmoid(-x) is
used for 1 - sigmoid(x): identical in exact arithmetic, without the cancellation near x >> 0.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def sequence_logprobs(token_logprobs: torch.Tensor, sequence_index: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Sum per-token log-probs into sequences; (S,) fp32.

    token_logprobs (N,) any float dtype, the log-prob of each response token (prompt, image and padding
    positions are simply not passed); sequence_index (N,) int64 in [0, S), the sequence each token
    belongs to; num_sequences S. Accumulates in fp32 (DESIGN section 6); a sequence with no tokens sums
    to 0. Differentiable: d out[s] / d token_logprobs[n] = 1 if sequence_index[n] == s else 0.
    """
    if token_logprobs.dim() != 1 or sequence_index.shape != token_logprobs.shape:
        raise ValueError(f"token_logprobs {tuple(token_logprobs.shape)} and sequence_index "
                         f"{tuple(sequence_index.shape)} must both be (N,)")
    out = torch.zeros(num_sequences, dtype=torch.float32, device=token_logprobs.device)  # (S,) fp32
    return out.index_add(0, sequence_index.long(), token_logprobs.float())  # out-of-place: autograd flows


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> dict[str, torch.Tensor]:
    """DPO (Rafailov et al. 2023, eq. 7; TRL DPOTrainer loss_type="sigmoid" without label smoothing).

    losses_i = -log sigmoid(beta [(pi_c - ref_c) - (pi_r - ref_r)])   (B,) fp32, one per pair
    chosen_rewards = beta (pi_c - ref_c), rejected_rewards = beta (pi_r - ref_r), margins = their
    difference (all (B,), detached); accuracy = share of pairs with chosen reward > rejected reward
    (ties count as wrong), a detached scalar.
    """
    chosen_logratios = policy_chosen.float() - ref_chosen.float()  # (B,) fp32
    rejected_logratios = policy_rejected.float() - ref_rejected.float()  # (B,) fp32
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))  # (B,) stable for any |logit|
    return {"losses": losses, **_pair_rewards(chosen_logratios, rejected_logratios, beta)}


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             policy_mismatched: torch.Tensor, ref_mismatched: torch.Tensor, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, eq. 8; TRL KTOTrainer loss_type="kto"), with a global, detached z.

    r = policy_logps - ref_logps                                           (B,) fp32
    z = clamp(mean_global(policy_mismatched - ref_mismatched), min=0)      scalar, detached
    desirable:   losses_i = desirable_weight   * (1 - sigmoid(beta (r_i - z)))
    undesirable: losses_i = undesirable_weight * (1 - sigmoid(beta (z - r_i)))

    desirable (B,) bool; the mismatched log-probs (M,) are those of responses paired with another
    example's prompt (the KL estimate), M need not equal B. The mean is over the *global* batch: the
    local (sum, count) is packed into one (2,) fp32 tensor and, if `all_reduce` is given (a callable
    that sums a tensor over processes and returns the sum), reduced before dividing, so z does not
    depend on how the batch is split, even unequally. (TRL instead averages per-process means, which
    differs when the splits are unequal.) The mean is taken before the clamp; no mismatched examples
    anywhere gives z = 0.

    Returns losses (B,), z, rewards = beta r (B,, detached), mean_r = mean of r (detached; with a
    teacher reference it does not start at 0, so log it), accuracy = share of examples on the right
    side of z (r > z for desirable, r < z for undesirable; ties count as wrong), a detached scalar.
    """
    r = policy_logps.float() - ref_logps.float()  # (B,) fp32
    mismatched = (policy_mismatched.float() - ref_mismatched.float()).detach()  # (M,) fp32
    stats = torch.stack([mismatched.sum(), torch.tensor(float(mismatched.numel()), device=mismatched.device)])  # (2,)
    if all_reduce is not None:
        stats = all_reduce(stats)
    z = (stats[0] / stats[1].clamp(min=1.0)).clamp(min=0.0).detach()  # scalar fp32
    desirable = desirable.bool()
    losses = torch.where(desirable,
                         desirable_weight * torch.sigmoid(-beta * (r - z)),  # 1 - sigmoid(beta (r - z))
                         undesirable_weight * torch.sigmoid(-beta * (z - r)))  # 1 - sigmoid(beta (z - r))
    r_d = r.detach()
    return {
        "losses": losses,
        "z": z,
        "rewards": beta * r_d,
        "mean_r": r_d.mean(),
        "accuracy": torch.where(desirable, r_d > z, r_d < z).float().mean(),
    }


def kto_pair_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                  ref_rejected: torch.Tensor, beta: float = 0.1) -> dict[str, torch.Tensor]:
    """TRL's removed `kto_pair` (DPOTrainer loss_type="kto_pair", TRL ~0.7-0.8), as LLaVA-MoD uses it.

    chosen_KL   = clamp(mean_batch(pi_c - ref_c), min=0)     NOT detached, local batch only
    rejected_KL = clamp(mean_batch(pi_r - ref_r), min=0)     NOT detached, local batch only
    losses = cat(1 - sigmoid(beta ((pi_c - ref_c) - rejected_KL)),
                 1 - sigmoid(beta (chosen_KL - (pi_r - ref_r))))             (2B,): chosen then rejected

    Unlike `kto_loss`, the KL estimates come from the pairs themselves (the chosen one in the rejected
    losses and vice versa), gradients flow through them, and they depend on the per-device batch: kept
    as in TRL so runs can be compared with LLaVA-MoD's. chosen_rewards, rejected_rewards, margins (B,)
    and accuracy (chosen reward > rejected reward) as in `dpo_loss`, detached.
    """
    chosen_logratios = policy_chosen.float() - ref_chosen.float()  # (B,) fp32
    rejected_logratios = policy_rejected.float() - ref_rejected.float()  # (B,) fp32
    chosen_kl = chosen_logratios.mean().clamp(min=0)  # scalar, keeps its gradient
    rejected_kl = rejected_logratios.mean().clamp(min=0)
    losses = torch.cat((torch.sigmoid(-beta * (chosen_logratios - rejected_kl)),  # 1 - sigmoid(beta (c - R))
                        torch.sigmoid(-beta * (chosen_kl - rejected_logratios))), 0)  # 1 - sigmoid(beta (C - r))
    return {"losses": losses, **_pair_rewards(chosen_logratios, rejected_logratios, beta)}


def _pair_rewards(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> dict:
    """Detached implicit rewards of a pair (B,) each, their margins and the share with chosen > rejected."""
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return {
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "margins": chosen_rewards - rejected_rewards,
        "accuracy": (chosen_rewards > rejected_rewards).float().mean(),
    }
