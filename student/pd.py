"""mod-student train --stage pd --cache cache/ --student runs/d2s/final --out runs/pd [--pref-loss kto|dpo|kto_pair]

One optimizer step of preference distillation (LLaVA-MoD section 3.2, DESIGN section 6), teacher-free:
the reference log-probs are the teacher's, read from the cache's preference records.

`wrapped` is the engine-wrapped StudentWithLoss (student/trainer.py): called on a micro-batch's rows it
returns their summed response log-probs, its lm_head used inside the wrapped forward.

Per step: (1) for kto, the student scores every micro-batch's mismatched pairs under no_grad (the
unwrapped module: no DDP bookkeeping), so z is one detached number over the whole global batch, all
micro-batches and processes; (2) each micro-batch's chosen + rejected rows go through the student with
gradient, and the per-example losses are summed and divided by the global number of examples (x the
process count, since DDP averages): the gradient is that of one batch holding every pair. kto_pair's
KL terms are batch means by definition (LLaVA-MoD's code, per device): they stay per micro-batch.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from .config import TrainConfig
from .data import PreferenceBatch
from .engine import backward_scale
from .preference import dpo_loss, kto_loss, kto_pair_loss

# summed over micro-batches and processes, then divided by the pair count (all but "examples")
PAIR_STATS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy", "logps/chosen",
              "logps/rejected", "mean_r")


def accumulate_preference(cfg: TrainConfig, accelerator: Accelerator, wrapped,
                          micro: list[PreferenceBatch]) -> dict[str, float]:
    """Backward of one optimizer step's micro-batches; returns the step's loss and diagnostics (global means)."""
    reduce = lambda t: accelerator.reduce(t, "sum")  # noqa: E731
    pairs = float(reduce(torch.tensor([float(len(b.sample_ids)) for b in micro], device=accelerator.device).sum()))
    examples = pairs if cfg.pref_loss == "dpo" else 2 * pairs  # dpo: one loss per pair; kto, kto_pair: two
    policy_mismatched = ref_mismatched = None
    if cfg.pref_loss == "kto":
        with torch.no_grad(), accelerator.autocast():
            module = accelerator.unwrap_model(wrapped)
            policy_mismatched = torch.cat([module(b.mismatched) for b in micro])  # (M,) fp32
        ref_mismatched = torch.cat([b.mismatched.ref_logps for b in micro])  # (M,) fp64
    sums = torch.zeros(len(PAIR_STATS) + 2, dtype=torch.float64, device=accelerator.device)  # loss, stats, tokens
    z = None
    for b in micro:
        with accelerator.accumulate(wrapped):  # gradients synchronised (DeepSpeed: stepped) after the last only
            with accelerator.autocast():
                logps = wrapped(b.policy)  # (2B,) fp32: chosen then rejected
            B, ref = len(b.sample_ids), b.policy.ref_logps
            if cfg.pref_loss == "kto":
                desirable = torch.arange(2 * B, device=logps.device) < B  # (2B,) chosen rows are desirable
                out = kto_loss(logps, ref, desirable, policy_mismatched, ref_mismatched, cfg.pref_beta,
                               cfg.desirable_weight, cfg.undesirable_weight, all_reduce=reduce)
                z = out["z"]
            elif cfg.pref_loss == "dpo":
                out = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], cfg.pref_beta)
            else:
                out = kto_pair_loss(logps[:B], logps[B:], ref[:B], ref[B:], cfg.pref_beta)
            accelerator.backward(out["losses"].sum() / examples * backward_scale(accelerator))
        sums += torch.cat([out["losses"].detach().sum()[None], _pair_stats(logps.detach(), ref, B, cfg.pref_beta),
                           b.policy.attention_mask.sum()[None]]).double()
    sums = reduce(sums)
    scalars = {"loss/pd": sums[0].item() / examples, "tokens": sums[-1].item()}
    scalars.update({name: value / pairs for name, value in zip(PAIR_STATS, sums[1:-1].tolist())})
    if z is not None:
        scalars["z"] = float(z)  # KTO's reference point, the same for every micro-batch of the step
    return scalars


def _pair_stats(logps: torch.Tensor, ref: torch.Tensor, B: int, beta: float) -> torch.Tensor:
    """Sums over the B pairs of PAIR_STATS: beta r_chosen, beta r_rejected, margin, r_c > r_r, pi_c, pi_r, mean r."""
    r = logps.double() - ref.double()  # (2B,) r = log pi_S - log pi_T
    r_c, r_r = r[:B], r[B:]
    return torch.stack([beta * r_c.sum(), beta * r_r.sum(), beta * (r_c - r_r).sum(), (r_c > r_r).double().sum(),
                        logps[:B].double().sum(), logps[B:].double().sum(), (r_c + r_r).sum() / 2])
