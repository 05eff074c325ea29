"""mod-student train --stage d2s --cache cache/ --student runs/d2d/final --out runs/d2s

The student trainer: one loop for every stage, on accelerate (launch with `accelerate launch` for
several processes), streaming the cache and never loading the teacher unless `online_teacher` is set.

Each optimizer step draws `grad_accum` micro-batches, counts their distilled and LM tokens, sums the
counts over all processes, and divides each micro-batch's summed losses by those global counts; DDP
averages gradients, so every loss is multiplied by the number of processes. The gradient therefore
equals the one of a single batch holding all tokens, whatever the split (test: 4 x 2 == 1 x 8).

Loss = kd_weight * KL(teacher || student) / #distilled + lm_weight * CE / #response + aux_coef * aux
     + vis_weight * KL at image positions / #image positions + rel_weight * (1 - cos(R_s, R_t)) / #matrices
(the last two are LLaVA-KD's L_vis and L_rel, stages dpt and dft; kd_weight and lm_weight are its alpha and L_reg).
Stage pd streams the cache's preference pairs instead and takes its step from student/pd.py.

The engine (DDP; FSDP and DeepSpeed likewise) wraps `StudentWithLoss`, whose forward runs the student AND
its chunked lm_head and losses: every parameter use, an untied lm_head's included, happens inside the
forward the engine wraps (an lm_head used outside it is marked ready twice under DDP and is sharded away
under FSDP / ZeRO-3).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, LlavaOnevisionForConditionalGeneration, get_cosine_schedule_with_warmup

from modkd.store import Cache

from . import checkpoint
from .checks import check_llava_kd_inputs, check_student_matches_cache
from .config import TrainConfig, for_processes
from .data import Batch, BatchStream, Sequences
from .engine import backward_scale, configure_engine
from .losses import (blocks, embedding_relation, forward_kl, kd_estimator, logit_relation, masked_sum, relation_loss,
                     student_logprobs, target_logprobs)
from .model import freeze_for, is_sparse, load_student, save_pretrained, upcycle
from .pd import accumulate_preference
from .preference import sequence_logprobs
from .routing import RouterTap


class TrainingDiverged(RuntimeError):
    pass


class StudentWithLoss(torch.nn.Module):
    """The student and its losses in one forward (the module the engine wraps; see the module docstring).

    forward(Batch, kd_mask, lm_mask[, teacher_logprobs, vis_mask]) -> summed KL over kd_mask, summed CE over
    lm_mask, the MoE aux loss, summed KL over vis_mask (LLaVA-KD's image positions) and summed RDist
    1 - cos(R_s, R_t) over the batch's relation matrices (0-dim tensors; the last two 0 unless asked for);
    forward(Sequences) -> each row's summed response log-prob (S,) fp32 (stage pd). The lm_head runs on the used
    positions only, in fp32 chunks (student/losses.py); RDist's R_s on the image tokens via the lm_head's Gram,
    once per batch.
    """

    def __init__(self, llava, distil: bool = True, tail: bool = False, tap=None, vocab: int | None = None,
                 relation: str | None = None) -> None:
        super().__init__()
        self.llava, self.tap = llava, tap
        self.relation = relation  # None (no RDist), "logits" (llava-kd Eq. 4) or "embeddings" (its released code)
        self.image_token_id = getattr(llava.config, "image_token_id", None)
        self.vocab = vocab  # the tokenizer's size: lm_head rows beyond it (Qwen's padding) are not tokens
        present = {type(m).__name__ for m in llava.modules()}  # FSDP's auto-wrap units: the layer classes in use
        self._no_split_modules = sorted(set(getattr(llava, "_no_split_modules", None) or ()) & present)
        self.distil = distil  # False (kd_weight 0: init, sft): no top-k gathers, no KL work at all
        self.tail = tail and distil

    def forward(self, b: Batch | Sequences, kd_mask: torch.Tensor | None = None, lm_mask: torch.Tensor | None = None,
                teacher_logprobs: torch.Tensor | None = None, vis_mask: torch.Tensor | None = None):
        if self.tap is not None:
            self.tap.reset()  # router logits of this forward only
        seen: dict = {}  # RDist's embedding form reads the LLM's inputs_embeds (projected image rows at image tokens)
        hook = (self.llava.model.language_model.register_forward_pre_hook(
            lambda module, args, kwargs: seen.update(embeds=kwargs.get("inputs_embeds")), with_kwargs=True)
            if self.relation == "embeddings" and isinstance(b, Batch) else None)
        try:
            out = self.llava.model(**b.model_inputs())  # Batch or Sequences: ids, mask, images (and anyres image sizes)
        finally:
            if hook is not None:
                hook.remove()
        every = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])  # (B * T, H)
        hidden = every[b.flat_positions]  # (N, H) at the predicting positions
        weight = self.llava.get_output_embeddings().weight[: self.vocab]  # (V, H): used inside the wrapped forward
        unused = self._projector_on_nothing(hidden) if b.pixel_values is None else 0.0  # 0-dim 0 or 0.0
        if isinstance(b, Sequences):
            logq = target_logprobs(hidden, weight, b.targets)  # (N,) fp32
            return sequence_logprobs(logq, b.sequence_index, b.ref_logps.shape[0]) + unused  # (S,)
        vis_mask = torch.zeros_like(kd_mask) if vis_mask is None else vis_mask  # (N,) bool
        used = kd_mask | lm_mask | vis_mask  # (N,) positions any weighted loss reads
        hidden = hidden[used]  # (n, H)
        if teacher_logprobs is not None:  # online comparison: the teacher's full distribution at the used positions
            logp = teacher_logprobs  # (n, V) fp32
            ids = torch.arange(logp.shape[1], device=hidden.device).expand_as(logp)  # (n, V)
            p, p_tail = logp.exp(), None  # (n, V): the whole vocabulary, nothing outside it
        elif self.distil:
            ids, p = b.target_ids[used], b.target_probs[used]  # (n, k), (n, k): rows sum to 1
            p_tail = b.tail_mass[used] if self.tail else None  # (n,) the tail bucket takes its share of the mass
            if self.tail:
                p = p * (1.0 - p_tail)[:, None]  # (n, k): the teacher's top-k probabilities, summing to 1 - tail
        else:
            ids = b.targets.new_zeros((hidden.shape[0], 0))  # (n, 0): no cached support, no KL work
            p, p_tail = hidden.new_zeros((hidden.shape[0], 0), dtype=torch.float32), None
        if ids.numel() and int(ids.max()) >= weight.shape[0]:
            raise ValueError(f"cached token id {int(ids.max())} is outside the student's vocabulary "
                             f"({weight.shape[0]} tokens)")
        tail = p_tail is not None
        logq_ids, logq_target, logq_tail = student_logprobs(hidden, weight, ids, b.targets[used], tail=tail)
        kl = forward_kl(logq_ids, p, p_tail, logq_tail if tail else None)  # (n,) fp32
        kd = masked_sum(kl, kd_mask[used])
        vis = masked_sum(kl, vis_mask[used])  # LLaVA-KD's L_vis (Eq. 3): the image positions' KL
        lm = masked_sum(-logq_target, lm_mask[used])
        aux = self.tap.aux_loss(b.attention_mask) if self.tap is not None else torch.zeros((), device=hidden.device)
        rel = self._relation(b, every, seen.get("embeds"), weight) if self.relation else torch.zeros_like(lm)
        return kd, lm, aux.to(hidden.device) + unused, vis, rel

    def _relation(self, b: Batch, every: torch.Tensor, embeds: torch.Tensor | None, weight: torch.Tensor):
        """Summed L_rel = 1 - cos(R_s, R_t) (llava-kd Eq. 5) over the batch's records with a cached R_t; R_s from
        the student's own image tokens in the same form (logits: Eq. 4; embeddings: the released code's), all
        records at once: zero-padded to the batch's largest N_p (losses.blocks), one lm_head Gram per batch."""
        flat = (b.input_ids.reshape(-1) == self.image_token_id).nonzero()[:, 0]  # (M,) image tokens, in record order
        sizes = b.relation_sizes  # (R,) N_p of each record with a matrix
        if int(sizes.sum()) != flat.numel():
            raise ValueError(f"the batch holds {flat.numel()} image tokens but its records' relation matrices cover "
                             f"{int(sizes.sum())}: every image record needs one (extract with --relation {self.relation})")
        if sizes.numel() == 0:
            return every.new_zeros((), dtype=torch.float32)
        rows = every if self.relation == "logits" else embeds.reshape(-1, embeds.shape[-1])  # (B * T, H or D)
        x = blocks(rows[flat], sizes)  # (R, n_max, H or D), zero rows past each record's N_p
        r_s = logit_relation(x, weight) if self.relation == "logits" else embedding_relation(x)  # (R, n_max, n_max)
        r_t = blocks(b.relation_targets, sizes, square=True)  # (R, n_max, n_max) fp32
        return relation_loss(r_s, r_t).sum()  # 0-dim fp32

    def _projector_on_nothing(self, like: torch.Tensor) -> torch.Tensor:
        """0, computed by the projector from an empty input: a text-only batch still uses every projector weight
        (with gradient 0), as LLaVA's own training does, so DDP needs find_unused_parameters for MoE students only
        and ZeRO-3 gathers the projector as it does on image batches."""
        projector = self.llava.model.multi_modal_projector
        first = next(m for m in projector.modules() if isinstance(m, torch.nn.Linear))
        nothing = projector(like.new_zeros(0, first.in_features)).sum()  # 0-dim
        if isinstance(self.llava, LlavaOnevisionForConditionalGeneration):  # its image_newline trains with the projector
            nothing = nothing + self.llava.model.image_newline[:0].sum()
        return nothing


def build_student(cfg: TrainConfig, log=print):
    """(model, processor) for the stage: d2s upcycles a dense student; parameters frozen per stage."""
    model, processor = load_student(cfg.student)
    if cfg.stage == "d2s" and not is_sparse(model):
        log(f"[student] upcycling {cfg.student}: E{cfg.experts}T{cfg.top_k_experts}, every {cfg.moe_every} layer(s)")
        model = upcycle(model, cfg.experts, cfg.top_k_experts, cfg.moe_every, cfg.normalize_topk, cfg.aux_loss_coef,
                        cfg.seed)
    elif is_sparse(model) and cfg.stage == "d2s":  # a sparse student resumed into d2s must match the options
        text = model.config.text_config
        if (text.num_experts, text.num_experts_per_tok) != (cfg.experts, cfg.top_k_experts):
            raise ValueError(f"{cfg.student} is already E{text.num_experts}T{text.num_experts_per_tok}; "
                             f"--experts/--top-k-experts ask for E{cfg.experts}T{cfg.top_k_experts}")
    trained = freeze_for(model, cfg.stage)
    if cfg.gradient_checkpointing:  # non-reentrant: works with frozen inputs, DDP and the routers' hooks (RNG replayed)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # from_pretrained returns eval mode, where the routing strategies (jitter, rsample) do nothing
    return model, processor, trained


def train(cfg: TrainConfig, log=print) -> Path:
    """Trains cfg.stage; writes checkpoints and OUT/final (HF format); returns OUT/final."""
    ddp = DistributedDataParallelKwargs()  # find_unused_parameters is set below, once the student is known
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # several processes on a CPU-only machine: gloo (MULTI_CPU)
        mixed_precision=_precision(cfg.mixed_precision), log_with="tensorboard", project_dir=str(cfg.out),
        step_scheduler_with_optimizer=False,  # one schedule step per optimizer step, whatever the process count
        kwargs_handlers=[ddp])
    given = cfg.grad_accum
    cfg = for_processes(cfg, accelerator.num_processes)  # recorded resolved: a resume derives the same
    configure_engine(accelerator, cfg)
    _claim_out(cfg, accelerator)
    set_seed(cfg.seed)
    cache = Cache.open(cfg.cache)
    preference = cfg.stage == "pd"
    model, processor, trained = build_student(cfg, log if accelerator.is_main_process else _quiet)
    check_student_matches_cache(cache, model, processor, cfg.student, None if preference else cfg.kd_positions)
    if not preference:
        check_llava_kd_inputs(cache, cfg.vis_weight > 0, cfg.relation if cfg.rel_weight else None, cfg.stage)
    estimator = None if preference else kd_estimator(cache.encoding.name, cfg.tail)  # from the manifest, printed below
    tap = RouterTap(model, cfg.routing) if is_sparse(model) else None
    ddp.find_unused_parameters = tap is not None  # unrouted experts get no gradient; a dense student uses every weight
    teacher = _online_teacher(cfg, accelerator) if cfg.online_teacher else None
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * cfg.max_steps), cfg.max_steps)
    wrapped, optimizer, scheduler = accelerator.prepare(
        StudentWithLoss(model, distil=bool(cfg.kd_weight or cfg.vis_weight), tail=cfg.tail, tap=tap,
                        vocab=len(processor.tokenizer), relation=cfg.relation if cfg.rel_weight else None),
        optimizer, scheduler)
    params = [p for p in wrapped.parameters() if p.requires_grad]  # FSDP2 replaces the parameters with sharded ones

    step, streams = 0, {}
    resume = checkpoint.latest(cfg.out)
    if resume is not None:
        step, streams = checkpoint.load(accelerator, wrapped, resume)
        log(f"[train] resuming from {resume} (step {step})")
        if accelerator.is_main_process:
            _drop_metrics_after(cfg.out / "metrics.jsonl", step)
    data = BatchStream(cfg.cache, accelerator.process_index, accelerator.num_processes, cfg.batch_size, cfg.seed,
                       processor.tokenizer.pad_token_id, cfg.image_root, processor.image_processor, streams, preference,
                       cfg.pack)
    loader_rng = torch.Generator().manual_seed(cfg.seed)  # the DataLoader draws a seed: not from the restored global RNG
    batches = iter(torch.utils.data.DataLoader(data, batch_size=None, num_workers=cfg.num_workers, generator=loader_rng))
    if accelerator.is_main_process:
        accelerator.init_trackers("tensorboard", config={**{k: str(v) for k, v in cfg.to_json().items()},
                                                         "kd_estimator": str(estimator)})
        log(f"[train] stage {cfg.stage}: {n_params:,} trained parameters in {len(trained)} tensors; global batch "
            f"{cfg.global_batch} = {accelerator.num_processes} process(es) x batch {cfg.batch_size} x grad_accum "
            f"{cfg.grad_accum} ({'given' if given is not None else 'derived from the global batch'})")
        if cfg.kd_weight and not preference:
            log(f"[train] KL estimator: {estimator} (the cache's encoding is {cache.encoding.describe()})")

    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"{cfg.stage}", unit="step",
               disable=not accelerator.is_main_process)
    while step < cfg.max_steps:
        started = time.perf_counter()
        micro = [next(batches).to(accelerator.device) for _ in range(cfg.grad_accum)]
        data_wait = time.perf_counter() - started  # reading, decoding, images and collation (num_workers=0: all of it)
        for b in micro:
            streams[b.stream_state["worker"]] = b.stream_state["state"]
        if preference:
            losses = accumulate_preference(cfg, accelerator, wrapped, micro)
            shown, mask = {"pd": losses["loss/pd"], "acc": losses["rewards/accuracy"]}, micro[-1].policy.attention_mask
        else:
            losses = _kd_step(cfg, accelerator, wrapped, micro, teacher)
            shown = {"kd": losses["loss/kd"], "lm": losses["loss/lm"],
                     **({"vis": losses["loss/vis"]} if cfg.vis_weight else {}),
                     **({"rel": losses["loss/rel"]} if cfg.rel_weight else {})}
            mask = micro[-1].attention_mask
        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)  # DeepSpeed: clipped (and stepped) already
        grad_norm = float("nan") if grad_norm is None else float(grad_norm)
        if not all(math.isfinite(x) for x in (*losses.values(), grad_norm)):
            raise TrainingDiverged(
                f"non-finite loss at step {step + 1} ({', '.join(f'{k} {v}' for k, v in losses.items())}, grad norm "
                f"{grad_norm}); the weights were not updated. Last good checkpoint: "
                f"{checkpoint.latest(cfg.out) or 'none yet'}. Lower --lr or check the cache (mod-store verify).")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()})
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            tokens, elapsed = losses.pop("tokens"), time.perf_counter() - started
            scalars = {**losses, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                       "tokens_per_s": tokens / elapsed, "data_wait_share": data_wait / elapsed}
            _log_scalars(accelerator, cfg.out, step, scalars, tap, mask)
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            checkpoint.save(accelerator, cfg.out, step, streams)
    bar.close()
    final = cfg.out / "final"
    weights = accelerator.get_state_dict(wrapped)  # every process: FSDP and ZeRO-3 gather the full weights to rank 0
    if accelerator.is_main_process:
        weights = {k.removeprefix("llava."): v for k, v in weights.items()}
        _save_final(accelerator.unwrap_model(wrapped).llava, weights, processor, final, cfg)
        log(f"[train] saved {final}")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # closes the trackers and the process group: last
    if tap is not None:
        tap.remove()
    return final


def _log_scalars(accelerator: Accelerator, out: Path, step: int, scalars: dict, tap, attention_mask) -> None:
    """TensorBoard, plus the same points as JSON lines in OUT/metrics.jsonl (for plots and tests)."""
    if tap is not None:
        for layer, load in enumerate(tap.expert_load(attention_mask)):
            scalars.update({f"expert_load/router{layer}/e{e}": v for e, v in enumerate(load.tolist())})
    accelerator.log(scalars, step=step)
    if accelerator.is_main_process:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")


def _drop_metrics_after(path: Path, step: int) -> None:
    """A resumed run redoes the steps after its checkpoint: forget the points the killed run logged for them."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def _kd_step(cfg: TrainConfig, accelerator: Accelerator, wrapped, micro: list[Batch], teacher) -> dict:
    """The step's mean KL per distilled token, CE per response token, aux loss, and tokens (all processes)."""
    sums, n_kd, n_lm = accumulate_gradients(cfg, accelerator, wrapped, micro, teacher)
    losses = {"loss/kd": sums[0].item() / n_kd, "loss/lm": sums[1].item() / n_lm,
              "loss/aux": sums[2].item() / accelerator.num_processes, "tokens": sums[3].item()}
    if cfg.vis_weight:
        losses["loss/vis"] = sums[4].item()  # already per image position
    if cfg.rel_weight:
        losses["loss/rel"] = sums[5].item()  # already per relation matrix
    return losses


def accumulate_gradients(cfg: TrainConfig, accelerator: Accelerator, wrapped, micro: list[Batch],
                         teacher=None) -> tuple[torch.Tensor, float, float]:
    """Backward of one optimizer step's micro-batches, each loss divided by the step's global token counts.
    `wrapped` is the engine-wrapped StudentWithLoss.

    Returns (summed [kd, lm, aux, tokens, vis / #image positions, rel / #relation matrices] over all processes,
    global #distilled, global #response tokens).
    """
    kd_masks = [b.kind_mask(cfg.kd_positions) & bool(cfg.kd_weight) for b in micro]  # a 0-weighted loss reads nothing
    lm_masks = [b.kind_mask("response") & bool(cfg.lm_weight) for b in micro]
    vis_masks = [b.kind_is("image") & bool(cfg.vis_weight) for b in micro]  # LLaVA-KD's L_vis positions
    n_rels = [b.relation_sizes.numel() if cfg.rel_weight and b.relation_sizes is not None else 0 for b in micro]
    local = torch.stack([sum(m.sum() for m in kd_masks), sum(m.sum() for m in lm_masks),
                         sum(m.sum() for m in vis_masks), torch.tensor(sum(n_rels), device=kd_masks[0].device)]).double()
    n_kd, n_lm, n_vis, n_rel = accelerator.reduce(local, "sum").clamp(min=1).tolist()  # clamp: all-masked -> 0, not NaN
    sums = torch.zeros(6, dtype=torch.float64, device=accelerator.device)  # kd, lm, aux, tokens, vis mean, rel mean
    for b, kd_mask, lm_mask, vis_mask in zip(micro, kd_masks, lm_masks, vis_masks):
        with accelerator.accumulate(wrapped):  # gradients synchronised (DeepSpeed: stepped) after the last only
            with accelerator.autocast():  # the online teacher under the same autocast as the student
                teacher_logprobs = (None if teacher is None else  # over the student's (= the cache's) vocabulary
                                    _teacher_logprobs(teacher, b, kd_mask | lm_mask | vis_mask, accelerator.unwrap_model(wrapped).vocab))
                kd, lm, aux, vis, rel = wrapped(b, kd_mask, lm_mask, teacher_logprobs, vis_mask)
            loss = (cfg.kd_weight * kd / n_kd + cfg.lm_weight * lm / n_lm + cfg.vis_weight * vis / n_vis
                    + cfg.rel_weight * rel / n_rel) * backward_scale(accelerator)
            loss = loss + cfg.aux_loss_coef * aux / len(micro) * accelerator.gradient_accumulation_steps
            accelerator.backward(loss)
        sums += torch.stack([kd.detach(), lm.detach(), aux.detach() / len(micro), b.attention_mask.sum(),
                             vis.detach() / n_vis, rel.detach() / n_rel]).double()
    return accelerator.reduce(sums, "sum"), n_kd, n_lm


@torch.no_grad()
def _teacher_logprobs(teacher, b: Batch, used: torch.Tensor, vocab: int | None = None) -> torch.Tensor:
    out = teacher.model(**b.model_inputs()).last_hidden_state  # (B, T, H_t)
    hidden = out.reshape(-1, out.shape[-1])[b.flat_positions][used]  # (n, H_t)
    logits = teacher.get_output_embeddings()(hidden)[:, :vocab]  # (n, V): the tokenizer's rows, as the cache
    return torch.log_softmax(logits.float(), dim=-1)  # (n, V) fp32


def _online_teacher(cfg: TrainConfig, accelerator: Accelerator):
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32  # as the student computes
    teacher = AutoModelForImageTextToText.from_pretrained(cfg.online_teacher, dtype=dtype)
    teacher.requires_grad_(False)
    return teacher.to(accelerator.device).eval()


def _save_final(model, weights: dict, processor, final: Path, cfg: TrainConfig) -> None:
    tmp = final.with_name(final.name + ".tmp")
    save_pretrained(model, tmp, weights)  # the Hub's layout: vLLM and lmms-eval load it as saved
    processor.save_pretrained(tmp)
    (tmp / "modkd_train_config.json").write_text(json.dumps(cfg.to_json(), indent=1))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def _claim_out(cfg: TrainConfig, accelerator: Accelerator) -> None:
    """OUT/train_config.json records the run; a rerun resumes only with the same options."""
    path = cfg.out / "train_config.json"
    ours = {**cfg.to_json(), "processes": accelerator.num_processes}
    if path.exists():
        theirs = json.loads(path.read_text())
        if theirs.get("processes", ours["processes"]) != ours["processes"]:
            raise ValueError(f"{cfg.out} was trained by {theirs['processes']} process(es), this launch has "
                             f"{ours['processes']}: resume it with {theirs['processes']} (each process's place in "
                             f"the data stream is its own; another count would repeat or skip records of the epoch)")
        diff = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k) and k != "save_every")
        if diff:
            raise ValueError(f"{cfg.out} holds a run with other options ({', '.join(diff)} differ); "
                             f"use another --out or the same options to resume it")
    elif accelerator.is_main_process:
        cfg.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(ours, indent=1))
    accelerator.wait_for_everyone()


def _precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _quiet(*args, **kwargs) -> None:
    pass
