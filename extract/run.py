"""mod-extract --teacher toy-teacher --data train.jsonl --image-root world/ --out cache/ --shards 8

Extract a teacher's top-k log-probs (or, `--encoding sampled`, draws from its distribution: store/encoding.py)
over a data file into a sharded cache (this worker's shards).

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
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from modkd.store.encoding import draws_to_counts, tail_mass
from modkd.store.relation import RELATION_FORMS
from modkd.store import (
    PREFERENCE_SCHEMA,
    PREFERENCE_SUBDIR,
    SHARDS_SUBDIR,
    DISTILL_SCHEMA,
    DistillRecord,
    ENCODINGS,
    FORMATS,
    Encoding,
    finalize_manifest,
    read_done_marker,
    shard_paths,
    shard_writer,
    write_done_marker,
    write_json_atomic,
    write_text_atomic,
)

from .data_index import prepare, read_shard
from .encode import INTERNAL_ERROR, Encoded, Encoder, Rejected, select_positions
from .hf_backend import HFBackend
from .preference import PreferenceEncoder, mismatched_partners, score_pairs
from .overlap import Overlap
from .records import RawRecord
from .teacher import Teacher, load_teacher
from .vllm_backend import VLLMBackend, VLLMOptions, engine_info

WINDOW_BATCHES = 16  # records are encoded, length-sorted and batched in windows of this many batches: less padding, bounded memory
BACKENDS = ("auto", "hf", "vllm")


@dataclass
class ExtractConfig:
    teacher: str
    data: Path
    out: Path
    image_root: Path | None = None
    shards: int = 1
    top_k: int = 20  # DESIGN 3: top-20 keeps the lm_head gradient within 2-8 deg of full KD at ~160 B/position
    encoding: str = "topk"  # topk | sampled (store/encoding.py); sampled needs --backend hf
    samples: int = 32  # sampled: draws per position N
    sample_seed: int = 0  # sampled: another seed draws another, independent cache
    positions: str = "response"  # the LLaVA-MoD default; extract the widest set any planned run needs
    batch_size: int = 8
    max_length: int = 4096  # longer records are rejected, not truncated: a cut response would be a wrong target
    num_workers: int = 1
    worker_index: int = 0
    row_group_size: int = 256  # Parquet row group / WebDataset chunk: the unit of rank splitting and of streaming reads
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"
    trust_remote_code: bool = False  # never run a checkpoint's own Python unless asked
    backend: str = "auto"  # auto: vllm when it imports (the fast path on GPUs), else hf
    vllm: VLLMOptions | None = None  # engine options for --backend vllm (None: VLLMOptions())
    encode_workers: int | None = None  # processes encoding ahead of the teacher (0: serial); None: default_encode_workers
    format: str = "parquet"  # shard format: parquet | webdataset (store/webdataset.py); Parquet is smaller
    embed_images: bool = False  # webdataset: carry each image's bytes, so training needs no image root
    relation: str = "none"  # LLaVA-KD RDist targets: none | logits (Eq. 4) | embeddings (store/relation.py); hf only


def run(cfg: ExtractConfig, teacher: Teacher | None = None, backend: HFBackend | VLLMBackend | None = None,
        log=print) -> dict:
    """Process this worker's shards; returns a summary (and the manifest once every shard is done).

    `teacher` and `backend` may be passed in to serve several extractions (distillation and preference data,
    benchmarks) with one loaded teacher; a backend passed in is not closed here."""
    if not 0 <= cfg.worker_index < cfg.num_workers:
        raise ValueError(f"--worker-index {cfg.worker_index} must be in [0, --num-workers {cfg.num_workers})")
    if cfg.format not in FORMATS or (cfg.embed_images and (cfg.format != "webdataset" or cfg.image_root is None)):
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {cfg.format!r}; --embed-images needs "
                         "--format webdataset and --image-root")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {cfg.backend!r}")
    if cfg.encoding not in ENCODINGS:
        raise ValueError(f"--encoding must be one of {', '.join(ENCODINGS)}, got {cfg.encoding!r}")
    backend_name = resolve_backend(cfg.backend if cfg.encoding == "topk" or cfg.backend != "auto" else "hf")
    if cfg.encoding == "sampled" and backend_name == "vllm":
        raise ValueError("--encoding sampled needs the teacher's full distribution at every position, and vLLM returns "
                         "only its top-K log-probs (K <= max_logprobs); use --backend hf, or --encoding topk with vLLM")
    if cfg.relation not in RELATION_FORMS:
        raise ValueError(f"--relation must be one of {', '.join(RELATION_FORMS)}, got {cfg.relation!r}")
    if cfg.relation != "none" and backend_name == "vllm":
        raise ValueError(f"--relation {cfg.relation} needs the teacher's hidden states at the image tokens, which vLLM "
                         "does not return; use --backend hf (or extract without --relation)")
    preference, subdir, index = prepare(cfg.data, cfg.out, cfg.shards)  # the data is scanned once per extraction
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
    header = _header(cfg, teacher, preference, engine, index["sha256"])
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
            _extract_shards(cfg, todo, index, teacher, backend, preference, subdir, device)
        finally:
            if own:
                backend.close()
    manifest = finalize_manifest(cfg.out, cfg.shards, header, subdir)
    internal = sum(read_done_marker(cfg.out, s, cfg.shards, subdir)["rejects"].get(INTERNAL_ERROR, 0) for s in mine)
    return {"shards_mine": len(mine), "shards_skipped": len(mine) - len(todo), "shards_done_now": len(todo),
            "preference": preference, "backend": backend_name, "internal_errors": internal, "manifest": manifest}


def _extract_shards(cfg: ExtractConfig, todo: list[int], index: dict, teacher: Teacher, backend, preference: bool,
                    subdir: str, device: str) -> None:
    """Windows of records flow read -> encode (worker processes) -> teacher (here) -> write (a thread), in order."""
    kind = "preference pairs" if preference else "records"
    encoder = (PreferenceEncoder if preference else Encoder)(teacher.tokenizer, teacher.processor, cfg.image_root,
                                                             cfg.max_length)
    process = (lambda encoded: score_pairs(encoded, backend)) if preference else (lambda encoded: _distil(encoded, backend, cfg))
    workers = default_encode_workers(device) if cfg.encode_workers is None else cfg.encode_workers
    total = sum(index["shards"][s]["count"] for s in todo)
    sink = None
    with Overlap(encoder, workers) as overlap, tqdm(total=total, unit="rec",
                                                    desc=f"extract {kind}, worker {cfg.worker_index}/{cfg.num_workers}") as bar:
        try:
            for (shard, items, last), encoded in overlap.encoded(_windows(cfg, todo, index, preference)):
                if sink is None:
                    sink = _ShardSink(cfg, shard, subdir)
                    overlap.write(sink.open)
                rejects = [_reject(raw, e) for (raw, _), e in zip(items, encoded) if isinstance(e, Rejected)]
                kept = [(raw, e) for (raw, _), e in zip(items, encoded) if not isinstance(e, Rejected)]
                records = []
                if items:
                    for (raw, _), rec in zip(kept, process([e for _, e in kept])):
                        if isinstance(rec, Rejected):
                            rejects.append(_reject(raw, rec))
                        else:
                            records.append(rec)
                overlap.write(sink.write, len(items), records, rejects)
                if last:
                    overlap.write(sink.finish)
                    sink = None
                bar.update(len(items))
        except BaseException:
            if sink is not None:
                overlap.write(sink.abort)  # after the jobs before it: removes the shard's temporary file
            raise


def default_encode_workers(device: str) -> int:
    """0 on CPU: the teacher's forward already uses every core, and on 2 cores encoding in processes measured
    0.91x the serial throughput (benchmarks/extract_throughput.py). 2 on a GPU, where the forward is far faster
    than encoding on one thread (a guess sized for a few CPU cores per GPU: not yet measured on a GPU)."""
    return 2 if device.startswith("cuda") else 0


def _windows(cfg: ExtractConfig, todo: list[int], index: dict, preference: bool):
    """(shard, [(raw record, KTO partner or None)], last window of the shard?) for the shards in `todo`, each
    read from its own byte range of the data file; an empty shard is one empty window."""
    size = cfg.batch_size * WINDOW_BATCHES
    for shard in todo:
        raws = read_shard(cfg.data, index, shard)
        partners = mismatched_partners(raws) if preference else {}  # KTO's pairing: fixed by the shard's records alone
        items = [(raw, partners.get(raw.index)) for raw in raws]
        for start in range(0, len(items), size) or [0]:
            yield shard, items[start : start + size], start + size >= len(items)


def resolve_backend(choice: str) -> str:
    """`auto` is vllm when vLLM is installed (its import is checked without importing it), else hf."""
    if choice != "auto":
        return choice
    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


class _ShardSink:
    """One shard's output, written on the writer thread: records in order, then its rejects and done marker."""

    def __init__(self, cfg: ExtractConfig, shard: int, subdir: str):
        self.cfg, self.shard, self.subdir = cfg, shard, subdir
        self.records_in, self.written, self.rejects = 0, 0, []
        self.ok = False  # every step so far succeeded: only then may finish() complete the shard

    def open(self) -> None:
        cfg = self.cfg
        parquet, self.rejects_path, _ = shard_paths(cfg.out, self.shard, cfg.shards, self.subdir, cfg.format)
        parquet.parent.mkdir(parents=True, exist_ok=True)
        for stale in parquet.parent.glob(f".{parquet.stem}*"):  # temporaries of a killed run
            stale.unlink()
        schema = PREFERENCE_SCHEMA if self.subdir == PREFERENCE_SUBDIR else DISTILL_SCHEMA
        self.writer = shard_writer(cfg.format, parquet, schema, cfg.row_group_size, cfg.image_root, cfg.embed_images)
        self.writer.__enter__()
        self.exit_after = _test_exit_hook()  # read once per shard, not per record
        self.ok = True

    def write(self, records_in: int, records: list, rejects: list[dict]) -> None:
        if not self.ok:
            return
        self.ok = False
        for rec in records:
            self.writer.write(rec)
            self.written += 1
            if self.exit_after is not None and self.written == self.exit_after[0]:
                _test_exit(self.exit_after[1])
        self.records_in += records_in
        self.rejects += rejects
        self.ok = True

    def finish(self) -> None:
        if not self.ok:  # a step failed (its error is raised in the teacher's thread): never mark this shard complete
            return self.abort()
        self.writer.__exit__(None, None, None)
        write_text_atomic(self.rejects_path, "".join(json.dumps(r) + "\n" for r in self.rejects))
        write_done_marker(self.cfg.out, self.shard, self.cfg.shards, self.records_in,
                          dict(Counter(r["kind"] for r in self.rejects)), self.writer.stats, self.subdir)

    def abort(self) -> None:
        if hasattr(self, "writer"):
            self.writer.__exit__(RuntimeError, None, None)  # closes and removes the temporary file


TEST_EXIT_HOOK = "MODKD_TEST_EXIT_MIDSHARD"  # tests only: "N:FLAG" exits the process after N records of a shard, once


def _test_exit_hook() -> tuple[int, Path] | None:
    """How tests kill a worker in the middle of a shard, once: (N, FLAG) from the environment, or None."""
    hook = os.environ.get(TEST_EXIT_HOOK)
    if not hook:
        return None
    after, flag = hook.split(":", 1)
    return int(after), Path(flag)


def _test_exit(flag: Path) -> None:
    """When FLAG does not exist yet, create it and exit (tests/test_ray.py: Ray retries the task, which redoes
    the shard)."""
    if not flag.exists():
        flag.touch()
        os._exit(17)


def _reject(raw: RawRecord, r: Rejected) -> dict:
    return {"index": raw.index, "sample_id": raw.sample_id, "line": raw.line, "kind": r.kind, "reason": r.reason}


def _distil(encoded: list[Encoded], backend: HFBackend | VLLMBackend, cfg) -> list[DistillRecord | Rejected]:
    """Teacher outputs for a window of records, batched as the backend wants, returned in input order."""
    enc = encoding_of(cfg, backend.vocab)
    selected = [select_positions(e.token_kinds, cfg.positions) for e in encoded]
    out: list[DistillRecord | Rejected | None] = [None] * len(encoded)
    for batch in backend.batches(encoded):
        records, positions = [encoded[j] for j in batch], [selected[j][0] for j in batch]
        results = (backend.run(records, positions) if enc.name == "topk" else
                   backend.run_sampled(records, positions, enc.samples, enc.seed))
        rels = backend.relations(records, cfg.relation) if cfg.relation != "none" else [None] * len(batch)
        for j, result, relation in zip(batch, results, rels):
            if isinstance(result, Rejected):
                out[j] = result
                continue
            if enc.name == "topk":
                ids, lps, tgt = result  # (P, k) int32, (P, k) fp32, (P,) fp32
                dist = {"topk_ids": ids, "topk_logprobs": lps, "tail_mass": tail_mass(lps)}
            else:
                draws, tgt = result  # (P, N) int64, (P,) fp32
                ids, counts = draws_to_counts(draws)  # (P, n) distinct ids ascending, their counts
                dist = {"sampled_ids": ids, "sampled_counts": counts}
            e = encoded[j]
            out[j] = DistillRecord(
                sample_id=e.sample_id, input_ids=np.asarray(e.input_ids, dtype=np.int32),
                positions=selected[j][0], position_kinds=selected[j][1], target_logprobs=tgt, image=e.image,
                num_image_tokens=e.num_image_tokens, encoding=enc, relation=relation, **dist)
    return out


def encoding_of(cfg: ExtractConfig, vocab: int) -> Encoding:
    """The cache's encoding over the tokenizer's `vocab` tokens (manifest settings, store/encoding.py)."""
    return Encoding(cfg.encoding, vocab, k=cfg.top_k if cfg.encoding == "topk" else 0,
                    samples=cfg.samples if cfg.encoding == "sampled" else 0,
                    seed=cfg.sample_seed if cfg.encoding == "sampled" else 0)


def _header(cfg: ExtractConfig, teacher: Teacher, preference: bool, engine: dict, data_sha256: str) -> dict:
    fp = teacher.fingerprint
    settings = {**encoding_of(cfg, fp["tokenizer_vocab_size"]).settings(), "positions": cfg.positions,
                "relation": cfg.relation, "max_length": cfg.max_length, "shards": cfg.shards, **engine}
    if preference:  # top-k and positions do not apply: every response token's log-prob is stored
        settings = {"kind": "preference", "max_length": cfg.max_length, "shards": cfg.shards, **engine,
                    "mismatched_pairing": "nearest earlier record in the shard (cyclic) with a different chosen"}
    settings.update(format=cfg.format, **({"embed_images": True} if cfg.embed_images else {}))  # how shards are stored
    return {
        "teacher": {k: fp[k] for k in ("name", "source", "config_sha256", "weights_sha256", "vocab_size",
                                        "tokenizer_vocab_size", "dtype")},  # distributions are over the latter
        "tokenizer_sha256": fp["tokenizer_sha256"],
        "image_processor_sha256": fp["image_processor_sha256"],
        "image_tokens_per_image": _image_tokens(teacher),
        "data": {"name": cfg.data.name, "sha256": data_sha256},  # from the scan (extract/data_index.py)
        "image_root": None if cfg.image_root is None else str(Path(cfg.image_root).resolve()),  # the trainer's default
        "settings": settings,
    }


def _image_tokens(teacher: Teacher) -> int | None:
    """Placeholder tokens one image expands to (for fixed-resolution processors; per record in the shards)."""
    if teacher.processor is None:
        return None
    p = teacher.processor
    if "image_grid_thw" in p.image_processor.model_input_names:  # Qwen2-VL's dynamic resolution: it varies per image
        return None
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
