"""`pytest tests/test_store_helpers.py -q`: synthetic records and caches for the store tests.

Imported by the other tests/test_store_*.py files (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from modkd.store import DistillRecord, Encoding, ImageRef, finalize_manifest, shard_paths, shard_writer, write_done_marker
from modkd.store.encoding import LOGPROB_STEP, tail_mass
from modkd.store import write_text_atomic

VOCAB = 64  # small enough that the full softmax is cheap, larger than every k used


def random_record(rng: np.random.Generator, sample_id: str, k: int) -> DistillRecord:
    """A valid record: random T, P, kinds, and top-k of a real softmax over VOCAB tokens."""
    num_tokens = int(rng.integers(2, 40))
    input_ids = rng.integers(0, VOCAB, size=num_tokens).astype(np.int32)  # (T,) int32
    num_positions = int(rng.integers(0, num_tokens))
    positions = np.sort(rng.choice(num_tokens - 1, size=num_positions, replace=False)).astype(np.int32)  # (P,) int32
    logits = rng.normal(size=(num_positions, VOCAB)) * 3  # (P, V) float64
    logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))  # (P, V) float64
    topk_ids = np.argsort(-logprobs, axis=1)[:, :k].astype(np.int32)  # (P, k) int32
    topk_logprobs = np.take_along_axis(logprobs, topk_ids, axis=1).astype(np.float32)  # (P, k) float32
    targets = input_ids[positions + 1]  # (P,) int32
    target_logprobs = logprobs[np.arange(num_positions), targets].astype(np.float32)  # (P,) float32
    with_image = bool(rng.integers(0, 2))
    return DistillRecord(
        sample_id=sample_id,
        input_ids=input_ids,
        positions=positions,
        position_kinds=rng.integers(0, 3, size=num_positions).astype(np.int8),  # (P,) int8
        encoding=Encoding("topk", VOCAB, k=k),
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
        tail_mass=tail_mass(topk_logprobs),
        target_logprobs=target_logprobs,
        image=ImageRef(path=f"imgs/{sample_id}.png", sha256=f"{int(rng.integers(1 << 62)):064x}") if with_image else None,
        num_image_tokens=int(rng.integers(1, 9)) if with_image else 0,
    )


def write_shard(
    cache_dir: Path, index: int, num_shards: int, records: list[DistillRecord], rejects: list[dict], row_group_size: int,
    fmt: str = "parquet", image_root: Path | None = None,
) -> dict:
    """Write one shard the way the extractor does: shard file (`fmt`), rejects file, then the done marker;
    with `image_root` (webdataset) the images are embedded."""
    parquet, rejects_path, _ = shard_paths(cache_dir, index, num_shards, fmt=fmt)
    with shard_writer(fmt, parquet, row_group_size=row_group_size, image_root=image_root,
                      embed_images=image_root is not None) as writer:
        for record in records:
            writer.write(record)
    write_text_atomic(rejects_path, "".join(json.dumps(entry) + "\n" for entry in rejects))
    by_kind: dict[str, int] = {}
    for entry in rejects:
        kind = entry["reason"].split(":")[0]
        by_kind[kind] = by_kind.get(kind, 0) + 1
    return write_done_marker(cache_dir, index, num_shards, len(records) + len(rejects), by_kind, writer.stats)


HEADER = {
    "teacher": {"id": "toy-teacher", "config_sha256": "c" * 64, "weights_sha256": "w" * 64},
    "tokenizer_sha256": "t" * 64,
    "image_processor_sha256": "i" * 64,
    "image_tokens_per_image": 8,
    "data_sha256": "d" * 64,
}


def build_cache(
    cache_dir: Path, records_per_shard: list[int], k: int = 4, row_group_size: int = 3, seed: int = 0,
    fmt: str = "parquet",
) -> list[DistillRecord]:
    """A finalized cache in format `fmt`; returns its records in shard order. Shard i rejects i % 3 input records."""
    rng = np.random.default_rng(seed)
    num_shards = len(records_per_shard)
    everything = []
    for index, count in enumerate(records_per_shard):
        records = [random_record(rng, f"s{index}-r{j}", k) for j in range(count)]
        rejects = [
            {"index": 1000 * index + j, "sample_id": f"bad{index}-{j}", "line": 1000 * index + j + 1, "reason": "missing_image: x.png"}
            for j in range(index % 3)
        ]
        write_shard(cache_dir, index, num_shards, records, rejects, row_group_size, fmt)
        everything += records
    header = dict(HEADER, settings={**Encoding("topk", VOCAB, k=k).settings(), "positions": "all", "format": fmt})
    assert finalize_manifest(cache_dir, num_shards, header) is not None
    return everything


def assert_same_record(got: DistillRecord, want: DistillRecord) -> None:
    """Equal fields; top-k log-probs within the encoding's documented error when `want` was not itself decoded."""
    assert got.sample_id == want.sample_id
    for name in ("input_ids", "positions", "position_kinds", "topk_ids", "topk_logprobs", "tail_mass", "target_logprobs"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if name == "topk_logprobs":
            assert np.allclose(a, b, rtol=0, atol=LOGPROB_STEP / 2 + 1e-5), name
        else:
            assert np.array_equal(a, b), name
    assert got.image == want.image
    assert got.num_image_tokens == want.num_image_tokens


def test_random_records_are_valid():
    rng = np.random.default_rng(1)
    for i in range(50):
        record = random_record(rng, f"r{i}", k=5)
        assert record.to_row()["num_ids"] == record.positions.shape[0] * 5
        assert np.all(np.exp(record.topk_logprobs.astype(np.float64)).sum(axis=1) <= 1 + 1e-5)
