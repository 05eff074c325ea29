"""accelerate launch --config_file pipelines/accelerate/zero2.yaml $(which mod-student) train ...

What the trainer tells the engine accelerate runs (DDP, FSDP2, DeepSpeed ZeRO) and how a loss is scaled
for it, in one place. Configs for each engine are under pipelines/accelerate/ (README, "Engines").
"""

from __future__ import annotations

import os

from accelerate import Accelerator
from accelerate.utils import DistributedType

from .config import TrainConfig


def configure_engine(accelerator: Accelerator, cfg: TrainConfig) -> None:
    """Tells accelerate (and DeepSpeed's config) the resolved batch: micro-batches per step, clipping.
    Refuses a launch whose config asks for an engine accelerate does not run (FSDP or DeepSpeed without CUDA:
    accelerate then silently falls back to plain data parallelism)."""
    for variable, engine in (("ACCELERATE_USE_FSDP", DistributedType.FSDP),
                             ("ACCELERATE_USE_DEEPSPEED", DistributedType.DEEPSPEED)):
        if os.environ.get(variable, "false").lower() == "true" and accelerator.distributed_type != engine:
            raise RuntimeError(f"the accelerate config asks for {engine.value} but accelerate runs "
                               f"{accelerator.distributed_type.value}: {engine.value} needs CUDA GPUs here; launch "
                               f"with --multi_gpu (DDP, gloo on CPU) or pipelines/accelerate/ddp.yaml instead")
    accelerator.gradient_accumulation_steps = cfg.grad_accum  # accumulate() syncs after this many micro-batches
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # DeepSpeed steps, clips and scales by itself
        accelerator.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
            train_batch_size=cfg.global_batch, gradient_clipping=cfg.max_grad_norm)


def backward_scale(accelerator: Accelerator) -> int:
    """What a loss already divided by the step's global counts is multiplied by before `accelerator.backward`:
    the process count (DDP, FSDP and DeepSpeed average gradients over processes) and the accumulation steps
    (accelerate, or DeepSpeed itself, divides each micro-batch's loss by them). The gradient is then that of
    one batch holding every token of the step."""
    return accelerator.num_processes * accelerator.gradient_accumulation_steps


def is_sharded(accelerator: Accelerator) -> bool:
    """FSDP or DeepSpeed: checkpoints hold the engine's own layout, not one model.safetensors."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
