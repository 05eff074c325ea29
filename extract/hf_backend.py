"""python -c "from modkd.extract.hf_backend import HFBackend; help(HFBackend.run)"

The `hf` backend: a teacher-forced transformers forward pass, then chunked top-k (or, for
`--encoding sampled`, chunked draws from the full distribution: only this backend sees it).

Runs anywhere transformers runs (CPU included). Batches are right-padded; the base model gives hidden
states and only the stored positions go through the lm_head (extract/topk.py).
"""

from __future__ import annotations

import numpy as np
import torch

from .encode import Encoded
from .teacher import Teacher
from modkd.store.encoding import sample_uniforms

from .relation import lm_head_gram, relations
from .topk import default_chunk, sampled_ids, topk_logprobs


class HFBackend:
    def __init__(self, teacher: Teacher, top_k: int, batch_size: int = 8, chunk: int | None = None):
        self.model = teacher.model
        self.lm_head = teacher.model.get_output_embeddings()
        self.vocab = vocab = teacher.fingerprint["tokenizer_vocab_size"]  # lm_head rows beyond it are padding
        if not 1 <= top_k <= vocab:
            raise ValueError(f"--top-k {top_k} must be between 1 and the vocabulary size {vocab}")
        self.top_k = top_k
        self.batch_size = batch_size
        self.chunk = chunk or default_chunk(vocab)
        self.pad_id = teacher.tokenizer.pad_token_id if teacher.tokenizer.pad_token_id is not None else 0
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        # Qwen2-VL / Qwen2.5-VL place image tokens in M-RoPE's 3-D positions by the per-token modality ids their
        # processor returns (the model refuses image_grid_thw without them); rebuilt per padded batch.
        self.processor = teacher.processor
        self.mm_token_types = "mm_token_type_ids" in getattr(teacher.processor, "model_input_names", ())
        self.image_token_id = getattr(teacher.processor, "image_token_id", None)
        self._last = None  # (batch, input_ids, hidden, inputs_embeds) of the last forward: relations() reuse it
        self._gram = None  # lm_head_gram, computed on the first logits relation (the teacher's weights are fixed)

    def close(self) -> None:
        pass

    def batches(self, encoded: list[Encoded]):
        return batches(encoded, self.batch_size)

    def inputs(self, batch: list[Encoded]) -> dict[str, torch.Tensor]:
        """Right-padded model inputs; the records' image tensors concatenate along dim 0 (see shape_key)."""
        T = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), T), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(batch), T), dtype=torch.long)  # (B, T)
        for b, e in enumerate(batch):
            ids[b, : len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[b, : len(e.input_ids)] = 1
        out = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if self.mm_token_types:  # 1 at image tokens, 0 elsewhere (padding included), as the processor marks them
            types = self.processor.create_mm_token_type_ids(ids.tolist())
            out["mm_token_type_ids"] = torch.tensor(types).to(self.device)  # (B, T)
        for key in batch[0].model_inputs:
            t = torch.cat([e.model_inputs[key] for e in batch])  # images of the batch, in record order
            out[key] = t.to(self.device, self.dtype if t.is_floating_point() else t.dtype)
        return out

    @torch.no_grad()
    def run(self, batch: list[Encoded], positions: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per record: top-k ids (P, k) int32, top-k log-probs (P, k) fp32, target log-probs (P,) fp32."""
        hidden, targets, bounds = self._hidden(batch, positions)
        ids, lps, tgt = topk_logprobs(hidden, self.lm_head, targets, self.top_k, self.chunk, self.vocab)
        ids, lps, tgt = (np.split(t.cpu().numpy(), bounds) for t in (ids, lps, tgt))
        return list(zip(ids, lps, tgt))

    @torch.no_grad()
    def run_sampled(self, batch: list[Encoded], positions: list[np.ndarray], samples: int,
                    seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per record: `samples` draws (P, samples) int64 from the teacher's distribution at each position, fixed
        by (seed, sample_id, position) (store.encoding.sample_uniforms), and the target log-probs (P,) fp32."""
        hidden, targets, bounds = self._hidden(batch, positions)
        u = np.concatenate([sample_uniforms(seed, e.sample_id, p, samples) for e, p in zip(batch, positions)])  # (N, S)
        draws, tgt = sampled_ids(hidden, self.lm_head, targets, torch.from_numpy(u), self.chunk, self.vocab)
        draws, tgt = (np.split(t.cpu().numpy(), bounds) for t in (draws, tgt))
        return list(zip(draws, tgt))

    @torch.no_grad()
    def target_logprobs(self, batch: list[Encoded], positions: list[np.ndarray]) -> list[np.ndarray]:
        """Per record: the log-prob (P,) fp32 of the token each position predicts, over the full vocabulary."""
        hidden, targets, bounds = self._hidden(batch, positions)
        tgt = topk_logprobs(hidden, self.lm_head, targets, 1, self.chunk, self.vocab)[2]  # (N,) fp32
        return np.split(tgt.cpu().numpy(), bounds)

    @torch.no_grad()
    def relations(self, batch: list[Encoded], form: str) -> list[np.ndarray | None]:
        """Per record of the batch last passed to run / run_sampled: LLaVA-KD's relation matrix (N_p, N_p) fp32
        over its image tokens (extract/relation.py; `form` logits or embeddings), None for a text-only record."""
        if self.image_token_id is None:
            raise ValueError("--relation needs a multimodal (LLaVA-style) teacher: this one has no image token")
        if self._last is None or self._last[0] is not batch:
            raise RuntimeError("relations() reads the last forward: call run() on the same batch first")
        _, ids, hidden, embeds = self._last
        if form == "logits" and self._gram is None:
            self._gram = lm_head_gram(self.lm_head, self.vocab)
        return relations(form, ids, hidden, embeds, self.image_token_id, self._gram)

    def _hidden(self, batch: list[Encoded], positions: list[np.ndarray]):
        """Hidden states (N, H) at the positions of every record, the tokens they predict (N,), split points."""
        inputs = self.inputs(batch)
        seen = {}  # the LLM's inputs_embeds: the projected image embeddings sit at the image tokens
        llm = getattr(self.model.model, "language_model", None)  # None: a text-only teacher, no image embeddings
        hook = None if llm is None else llm.register_forward_pre_hook(
            lambda module, args, kwargs: seen.update(embeds=kwargs.get("inputs_embeds")), with_kwargs=True)
        try:
            hidden = self.model.model(**inputs, use_cache=False).last_hidden_state  # (B, T, H); no KV cache: one pass
        finally:
            if hook is not None:
                hook.remove()
        self._last = (batch, inputs["input_ids"], hidden, seen.get("embeds"))
        B, T, H = hidden.shape
        flat = torch.cat([torch.as_tensor(p, dtype=torch.long) + b * T for b, p in enumerate(positions)]).to(self.device)  # (N,)
        targets = inputs["input_ids"].reshape(-1)[flat + 1]  # (N,) the token each position predicts
        return hidden.reshape(B * T, H)[flat], targets, np.cumsum([len(p) for p in positions])[:-1]


def batches(encoded: list[Encoded], batch_size: int):
    """Index lists of at most batch_size records with equal image tensor shapes, longest first: little padding."""
    order = sorted(range(len(encoded)), key=lambda i: (shape_key(encoded[i]), -len(encoded[i].input_ids)))
    batch: list[int] = []
    for n, i in enumerate(order):
        batch.append(i)
        last = n + 1 == len(order)
        if len(batch) == batch_size or last or shape_key(encoded[order[n + 1]]) != shape_key(encoded[i]):
            yield batch
            batch = []


def shape_key(e: Encoded) -> tuple:
    """Records batch together when their image tensors agree beyond dim 0, along which they concatenate: LLaVA's
    pixel_values (1, C, H, W) -> (B, C, H, W); Qwen2-VL's flattened patches (N_i, C*T*P*P) -> (sum N_i, C*T*P*P)
    with image_grid_thw (1, 3) -> (B, 3), so its images of any size share a batch."""
    return tuple((k, tuple(v.shape[1:])) for k, v in sorted(e.model_inputs.items()))
