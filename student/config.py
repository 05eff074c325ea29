"""python -c "from modkd.student.config import TrainConfig; print(TrainConfig.__doc__)"   # every training option

One dataclass holds every option of a training run. A stage's recipe (pipelines/recipes/STAGE.yaml,
LLaVA-MoD Table 10) fills it, `--config FILE` and `--set key=value` override it, and the trainer
writes it whole to OUT/train_config.json, where a rerun into the same OUT must find the same values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from modkd.store import POSITION_MODES

STAGES = ("init", "sft", "d2d", "d2s", "pd", "dpt", "dft")  # DESIGN section 5; each has a recipe in pipelines/recipes/
RELATIONS = ("logits", "embeddings")  # RDist's matrix: llava-kd Eq. 4 (logits) or its released code's embedding form
PREFERENCE_LOSSES = ("kto", "dpo", "kto_pair")  # pd: KTO (LLaVA-MoD's method), DPO, LLaVA-MoD code's kto_pair


@dataclass
class TrainConfig:
    """A student training run. Paths are filled by the CLI; the rest comes from the stage's recipe."""

    stage: str
    cache: Path
    student: str  # local HF directory or hub id of a LLaVA model
    out: Path
    image_root: Path | None = None  # where the cached records' images live (checked by sha256)
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 8  # records per micro-batch per process
    global_batch: int | None = None  # records per optimizer step over all processes (the recipes' Table 10 batch)
    grad_accum: int | None = None  # micro-batches per step; None: global_batch / (batch_size x processes), else 1
    lr: float = 2e-5  # LLaVA-MoD Table 10, mimic distillation
    warmup_ratio: float = 0.03  # Table 10
    beta1: float = 0.9  # Table 10
    beta2: float = 0.98  # Table 10
    weight_decay: float = 0.0  # Table 10
    max_grad_norm: float = 1.0  # LLaVA/MoE-LLaVA's DeepSpeed default
    seed: int = 0
    kd_weight: float = 1.0  # 0 disables the KL term (init, sft)
    lm_weight: float = 0.0  # CE on response tokens (init, sft, d2s)
    kd_positions: str = "response"  # which cached positions are distilled: a key of store.POSITION_MODES
    vis_weight: float = 0.0  # LLaVA-KD beta: KL at the image positions (MDist's L_vis); dpt/dft recipes: 1.0
    rel_weight: float = 0.0  # LLaVA-KD gamma: RDist 1 - cos(R_s, R_t); dpt/dft recipes: 0.5 (llava-kd Sec. 4.1)
    relation: str = "logits"  # RDist's matrix when rel_weight > 0: logits (Eq. 4) | embeddings; must match the cache
    tail: bool = False  # topk caches: add the tail bucket 1 - sum(top-k) to the KL (otherwise renormalised); sampled: refused
    experts: int = 4  # d2s upcycling: E4T2 is LLaVA-MoD's default
    top_k_experts: int = 2
    moe_every: int = 1  # experts in every layer (1) or every other layer (2, as LLaVA-MoD's code)
    normalize_topk: bool | None = None  # None: DeepSpeed-MoE's rule (renormalise for k >= 2); see student/model.py
    routing: str = "topk"  # topk | jitter | rsample (training only)
    aux_loss_coef: float = 0.01  # MoE-LLaVA / LLaVA-MoD; added once
    save_every: int = 500  # optimizer steps between checkpoints (and at the end)
    log_every: int = 10  # optimizer steps between TensorBoard points
    num_workers: int = 0  # DataLoader workers; resume is bit-exact with 0 (see README)
    pack: bool = False  # one padding-free row per micro-batch (not pd); see README for when it is faster
    mixed_precision: str = "auto"  # auto: bf16 on a GPU that supports it, else fp32
    gradient_checkpointing: bool = False  # recompute the LLM's activations in the backward: less memory, ~1.3x time
    online_teacher: str | None = None  # comparison mode: compute the teacher's full distribution each step
    pref_loss: str = "kto"  # pd only: kto | dpo | kto_pair (student/preference.py)
    pref_beta: float = 0.1  # pd: KTO / DPO temperature (DESIGN section 6)
    desirable_weight: float = 1.0  # pd, kto: weight of the chosen (desirable) examples' losses
    undesirable_weight: float = 1.0  # pd, kto: weight of the rejected (undesirable) examples' losses

    def __post_init__(self) -> None:
        self.cache, self.out = Path(self.cache), Path(self.out)
        for f in fields(self):  # YAML and --set read "0" as an int; transformers' strict configs want float fields
            value = getattr(self, f.name)
            if f.type == "float" and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
            if f.type == "str" and not isinstance(value, str):
                raise ValueError(f"{f.name} must be a string, got {value!r} (YAML reads no/yes/on/off as booleans: "
                                 f"quote the value, e.g. {f.name}: 'no')")
        self.image_root = None if self.image_root is None else Path(self.image_root)
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; stages: {', '.join(STAGES)}")
        if self.kd_positions not in POSITION_MODES:
            raise ValueError(f"kd_positions must be one of {', '.join(POSITION_MODES)}, got {self.kd_positions!r}")
        for name in ("max_steps", "batch_size", "grad_accum", "global_batch", "save_every", "log_every", "experts",
                     "top_k_experts"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.relation not in RELATIONS:
            raise ValueError(f"relation must be one of {', '.join(RELATIONS)}, got {self.relation!r}")
        if self.pref_loss not in PREFERENCE_LOSSES:
            raise ValueError(f"pref_loss must be one of {', '.join(PREFERENCE_LOSSES)}, got {self.pref_loss!r}")
        if self.stage == "pd" and self.pack:
            raise ValueError("pack applies to distillation batches; stage pd pads its preference pairs (set pack=false)")
        if self.stage != "pd" and not (self.kd_weight or self.lm_weight or self.vis_weight or self.rel_weight):
            raise ValueError("kd_weight, lm_weight, vis_weight and rel_weight are all 0: nothing to train")

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    @classmethod
    def keys(cls) -> set[str]:
        return {f.name for f in fields(cls)}


def for_processes(cfg: TrainConfig, processes: int) -> TrainConfig:
    """The config with grad_accum resolved for `processes` processes: an explicit grad_accum wins (global_batch
    is then what it gives); else global_batch / (batch_size x processes), which must divide exactly."""
    if cfg.grad_accum is None and cfg.global_batch is None:
        return replace(cfg, grad_accum=1, global_batch=cfg.batch_size * processes)
    if cfg.grad_accum is not None:
        return replace(cfg, global_batch=cfg.batch_size * cfg.grad_accum * processes)
    per_step = cfg.batch_size * processes
    if cfg.global_batch % per_step:
        raise ValueError(f"global batch {cfg.global_batch} is not a multiple of batch_size {cfg.batch_size} x "
                         f"{processes} process(es) = {per_step}; change --batch-size or --global-batch, or give "
                         f"--grad-accum explicitly")
    return replace(cfg, grad_accum=cfg.global_batch // per_step)
