"""mod-extract --teacher toy-teacher --data train.jsonl --image-root world/ --out cache/ --shards 8

Extract a teacher's top-k log-probs over a data file into a sharded cache (this worker's shards).

Shaped like a datatrove step: `run(cfg)` processes shards s with s % num_workers == worker_index, so
any launcher (torchrun, SLURM arrays, Ray) runs disjoint shard sets. Each shard is written under a
temporary name and renamed when complete, then its completion marker is written; a rerun skips
shards that have a marker and redoes the rest. Whoever completes the last shard writes manifest.json.

The teacher runs under transformers (`--backend hf`, anywhere) or vLLM (`--backend vllm`,
extract/vllm_backend.py); `auto` takes vLLM when it imports. Both write the same records.

A data file of preference pairs (records with "chosen" and "rejected", see extract/preference.py) is
recognised as such and written as the cache's preference part (cache/preference/, its own manifest),
so one --out directory can hold a distillation extraction and a preference extraction side by side.
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from modkd.store import (
    PREFERENCE_SCHEMA,
    PREFERENCE_SUBDIR,
    SHARDS_SUBDIR,
    DISTILL_SCHEMA,
    DistillRecord,
    ShardWriter,
    finalize_manifest,
    read_done_marker,
    sha256_file,
    shard_paths,
    write_done_marker,
    write_json_atomic,
    write_text_atomic,
)

from .encode import Encoded, Encoder, Rejected, select_positions
from .hf_backend import HFBackend
from .preference import PreferenceEncoder, is_preference_data, mismatched_partners, score_pairs
from .records import RawRecord, iter_shard, read_records
from .teacher import Teacher, load_teacher
from .vllm_backend import VLLMBackend, VLLMOptions, engine_info

WINDOW_BATCHES = 16  # records are encoded, length-sorted and batched in windows of this many batches: less padding, bounded memory
BACKENDS = ("auto", "hf", "vllm")
INTERNAL_ERROR = "internal_error"  # an unexpected exception on one record: rejected, and the exit status is non-zero


@dataclass
class ExtractConfig:
    teacher: str
    data: Path
    out: Path
    image_root: Path | None = None
    shards: int = 1
    top_k: int = 20  # DESIGN 3: top-20 keeps the lm_head gradient within 2-8 deg of full KD at ~160 B/position
    positions: str = "response"  # the LLaVA-MoD default; extract the widest set any planned run needs
    batch_size: int = 8
    max_length: int = 4096  # longer records are rejected, not truncated: a cut response would be a wrong target
    num_workers: int = 1
    worker_index: int = 0
    row_group_size: int = 256  # Parquet row group: the unit of rank splitting and of streaming reads
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"
    trust_remote_code: bool = False  # never run a checkpoint's own Python unless asked
    backend: str = "auto"  # auto: vllm when it imports (the fast path on GPUs), else hf
    vllm: VLLMOptions | None = None  # engine options for --backend vllm (None: VLLMOptions())


def run(cfg: ExtractConfig, teacher: Teacher | None = None, backend: HFBackend | VLLMBackend | None = None,
        log=print) -> dict:
    """Process this worker's shards; returns a summary (and the manifest once every shard is done).

    `teacher` and `backend` may be passed in to serve several extractions (distillation and preference data,
    benchmarks) with one loaded teacher; a backend passed in is not closed here."""
    if not 0 <= cfg.worker_index < cfg.num_workers:
        raise ValueError(f"--worker-index {cfg.worker_index} must be in [0, --num-workers {cfg.num_workers})")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {cfg.backend!r}")
    records = read_records(cfg.data)
    backend_name = resolve_backend(cfg.backend)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    if backend is not None and (isinstance(backend, HFBackend) != (backend_name == "hf") or backend.top_k != cfg.top_k):
        raise ValueError(f"the backend passed in ({type(backend).__name__}, top-k {backend.top_k}) is not the one "
                         f"configured (--backend {backend_name}, --top-k {cfg.top_k})")
    engine = {"backend": "hf"} if backend_name == "hf" else {"backend": "vllm", "vllm": engine_info()}
    log(f"[extract] backend {backend_name}: " + (
        "transformers" if backend_name == "hf" else f"vLLM {engine['vllm']['version']}, {engine['vllm']['logprobs_mode']}"))
    if teacher is None:
        teacher = load_teacher(cfg.teacher, dtype, device, cfg.trust_remote_code, load_weights=backend_name == "hf")
    preference = is_preference_data(records)
    subdir = PREFERENCE_SUBDIR if preference else SHARDS_SUBDIR
    header = _header(cfg, teacher, preference, engine)
    _claim_out_dir(cfg.out / ("" if subdir == SHARDS_SUBDIR else subdir), header)

    mine = [s for s in range(cfg.shards) if s % cfg.num_workers == cfg.worker_index]
    todo = [s for s in mine if not shard_paths(cfg.out, s, cfg.shards, subdir)[2].exists()]
    if todo:
        own = backend is None  # started here (not before: a rerun with nothing to do never starts an engine)
        if own:
            backend = HFBackend(teacher, cfg.top_k, cfg.batch_size) if backend_name == "hf" else VLLMBackend(
                teacher, cfg.top_k, str(dtype).removeprefix("torch."), cfg.vllm or VLLMOptions(), cfg.trust_remote_code,
                log)
        try:
            _extract_shards(cfg, todo, records, teacher, backend, preference, subdir)
        finally:
            if own:
                backend.close()
    manifest = finalize_manifest(cfg.out, cfg.shards, header, subdir)
    internal = sum(read_done_marker(cfg.out, s, cfg.shards, subdir)["rejects"].get(INTERNAL_ERROR, 0) for s in mine)
    return {"shards_mine": len(mine), "shards_skipped": len(mine) - len(todo), "shards_done_now": len(todo),
            "preference": preference, "backend": backend_name, "internal_errors": internal, "manifest": manifest}


def _extract_shards(cfg: ExtractConfig, todo: list[int], records: list[RawRecord], teacher: Teacher, backend,
                    preference: bool, subdir: str) -> None:
    shard_records = {s: list(iter_shard(records, s, cfg.shards)) for s in todo}
    total = sum(len(raws) for raws in shard_records.values())
    kind = "preference pairs" if preference else "records"
    encoder = (PreferenceEncoder if preference else Encoder)(teacher.tokenizer, teacher.processor, cfg.image_root,
                                                             cfg.max_length)
    with tqdm(total=total, unit="rec", desc=f"extract {kind}, worker {cfg.worker_index}/{cfg.num_workers}") as bar:
        for s, raws in shard_records.items():
            if preference:
                partners = mismatched_partners(raws)  # KTO's pairing: fixed by the shard's records alone
                _extract_shard(cfg, s, raws, lambda raw: encoder.encode_pair(raw, partners[raw.index]),
                               lambda encoded: score_pairs(encoded, backend), bar, subdir)
            else:
                _extract_shard(cfg, s, raws, encoder.encode, lambda encoded: _distil(encoded, backend, cfg), bar,
                               subdir)


def resolve_backend(choice: str) -> str:
    """`auto` is vllm when vLLM is installed (its import is checked without importing it), else hf."""
    if choice != "auto":
        return choice
    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def _extract_shard(cfg, shard: int, raws: list[RawRecord], encode, process, bar, subdir: str) -> None:
    """encode(raw) -> an encoded record or Rejected; process(encoded list) -> a cache record or Rejected for
    each, in order (a backend may refuse a record too: vLLM's prompt differing from the processor's)."""
    parquet, rejects_path, _ = shard_paths(cfg.out, shard, cfg.shards, subdir)
    parquet.parent.mkdir(parents=True, exist_ok=True)
    for stale in parquet.parent.glob(f".{parquet.stem}*"):  # temporaries of a killed run
        stale.unlink()
    rejects: list[dict] = []
    window = cfg.batch_size * WINDOW_BATCHES
    schema = PREFERENCE_SCHEMA if subdir == PREFERENCE_SUBDIR else DISTILL_SCHEMA
    with ShardWriter(parquet, schema=schema, row_group_size=cfg.row_group_size) as writer:
        for start in range(0, len(raws), window):
            chunk = raws[start : start + window]
            encoded, kept = [], []
            for raw in chunk:
                try:
                    encoded.append(encode(raw))
                    kept.append(raw)
                except Rejected as r:
                    rejects.append(_reject(raw, r))
                except Exception as e:  # a bug or a library's surprise on one record: recorded, the run goes on
                    rejects.append(_reject(raw, Rejected(INTERNAL_ERROR, f"{type(e).__name__}: {e}")))
            for raw, rec in zip(kept, process(encoded)):
                if isinstance(rec, Rejected):
                    rejects.append(_reject(raw, rec))
                else:
                    writer.write(rec)
            bar.update(len(chunk))
    write_text_atomic(rejects_path, "".join(json.dumps(r) + "\n" for r in rejects))
    write_done_marker(cfg.out, shard, cfg.shards, len(raws), dict(Counter(r["kind"] for r in rejects)), writer.stats,
                      subdir)


def _reject(raw: RawRecord, r: Rejected) -> dict:
    return {"index": raw.index, "sample_id": raw.sample_id, "line": raw.line, "kind": r.kind, "reason": r.reason}


def _distil(encoded: list[Encoded], backend: HFBackend | VLLMBackend, cfg) -> list[DistillRecord | Rejected]:
    """Teacher outputs for a window of records, batched as the backend wants, returned in input order."""
    selected = [select_positions(e.token_kinds, cfg.positions) for e in encoded]
    out: list[DistillRecord | Rejected | None] = [None] * len(encoded)
    for batch in backend.batches(encoded):
        results = backend.run([encoded[j] for j in batch], [selected[j][0] for j in batch])
        for j, result in zip(batch, results):
            if isinstance(result, Rejected):
                out[j] = result
                continue
            ids, lps, tgt = result
            e = encoded[j]
            out[j] = DistillRecord(
                sample_id=e.sample_id, input_ids=np.asarray(e.input_ids, dtype=np.int32),
                positions=selected[j][0], position_kinds=selected[j][1], topk_ids=ids, topk_logprobs=lps,
                target_logprobs=tgt, image=e.image, num_image_tokens=e.num_image_tokens)
    return out


def _header(cfg: ExtractConfig, teacher: Teacher, preference: bool, engine: dict) -> dict:
    fp = teacher.fingerprint
    settings = {"top_k": cfg.top_k, "encoding": "topk", "positions": cfg.positions, "max_length": cfg.max_length,
                "shards": cfg.shards, **engine}
    if preference:  # top-k and positions do not apply: every response token's log-prob is stored
        settings = {"kind": "preference", "max_length": cfg.max_length, "shards": cfg.shards, **engine,
                    "mismatched_pairing": "nearest earlier record in the shard (cyclic) with a different chosen"}
    return {
        "teacher": {k: fp[k] for k in ("name", "source", "config_sha256", "weights_sha256", "vocab_size", "dtype")},
        "tokenizer_sha256": fp["tokenizer_sha256"],
        "image_processor_sha256": fp["image_processor_sha256"],
        "image_tokens_per_image": _image_tokens(teacher),
        "data": {"name": cfg.data.name, "sha256": sha256_file(cfg.data)},
        "image_root": None if cfg.image_root is None else str(Path(cfg.image_root).resolve()),  # the trainer's default
        "settings": settings,
    }


def _image_tokens(teacher: Teacher) -> int | None:
    """Placeholder tokens one image expands to (for fixed-resolution processors; per record in the shards)."""
    if teacher.processor is None:
        return None
    p = teacher.processor
    size = p.image_processor.size
    side = size.get("shortest_edge") or size.get("height")
    ids = p(images=[Image.new("RGB", (side, side))], text=[p.image_token], add_special_tokens=False)["input_ids"][0]
    return int(sum(1 for t in ids if t == p.image_token_id))


def _identity(header: dict) -> dict:
    """What makes two extractions the same: the header without paths, which differ between machines and
    mounts (the teacher's name or directory, the image root); the teacher is its config + weights hashes."""
    return {**{k: v for k, v in header.items() if k != "image_root"},
            "teacher": {k: v for k, v in header["teacher"].items() if k not in ("name", "source")}}


def _claim_out_dir(out: Path, header: dict) -> None:
    """Refuse to mix shards of two different extractions in one --out directory (paths may differ: a worker
    on another node, with another HF cache or mount point, joins the same extraction)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "extract_config.json"
    if path.exists():
        old, new = _identity(json.loads(path.read_text())), _identity(header)
        if old != new:
            diff = sorted(k for k in new if old.get(k) != new[k])
            raise ValueError(f"{out} holds a cache made with different settings ({', '.join(diff)} differ); "
                             "use a new --out, or delete it to start over")
        return
    write_json_atomic(path, header)


def config_dict(cfg: ExtractConfig) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
