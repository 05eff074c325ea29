"""`pytest tests/test_store_roundtrip.py -q`: records survive write + read exactly; manifest assembly."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_store_helpers import HEADER, VOCAB, assert_same_record, build_cache, random_record, write_shard

from modkd.store import DISTILL_SCHEMA, Cache, DistillRecord, Encoding, finalize_manifest, shard_paths, shard_progress


def test_round_trip_is_exact(tmp_path):
    written = build_cache(tmp_path, [7, 0, 5, 11], k=4, row_group_size=3)
    cache = Cache.open(tmp_path)
    read = list(cache.records())
    assert cache.num_records == len(written) == len(read)
    assert cache.top_k == 4
    for got, want in zip(read, written):
        assert_same_record(got, want)
    assert [record.cursor for record in read] == list(range(1, len(read) + 1))


def test_shard_is_plain_parquet_with_the_schema(tmp_path):
    written = build_cache(tmp_path, [10], k=3, row_group_size=4)
    parquet = shard_paths(tmp_path, 0, 1)[0]
    table = pq.read_table(parquet)
    assert table.schema.equals(DISTILL_SCHEMA)
    assert table.num_rows == 10
    assert pq.ParquetFile(parquet).metadata.num_row_groups == 3  # 4 + 4 + 2
    assert pq.ParquetFile(parquet).metadata.row_group(0).column(0).compression == "ZSTD"
    row = table.slice(0, 1).to_pylist()[0]
    assert_same_record(DistillRecord.from_row(row, Encoding("topk", VOCAB, k=3)), written[0])


def test_columns_subset_reads_only_those(tmp_path):
    written = build_cache(tmp_path, [5, 4], k=2)
    read = list(Cache.open(tmp_path).records(columns=["input_ids", "image_path"]))
    assert [r.sample_id for r in read] == [r.sample_id for r in written]
    for got, want in zip(read, written):
        assert np.array_equal(got.input_ids, want.input_ids)
        assert got.image == want.image
        assert got.topk_ids is None and got.positions is None and got.num_image_tokens is None
    with pytest.raises(ValueError, match="unknown columns"):
        next(Cache.open(tmp_path).records(columns=["logits"]))


def test_manifest_waits_for_every_shard_and_is_deterministic(tmp_path):
    rng = np.random.default_rng(0)
    records = [random_record(rng, f"r{i}", 2) for i in range(6)]
    header = dict(HEADER, settings={"top_k": 2})
    write_shard(tmp_path, 1, 3, records[:2], [], row_group_size=2)
    assert shard_progress(tmp_path, 3) == (1, [0, 2])
    assert finalize_manifest(tmp_path, 3, header) is None
    assert not (tmp_path / "manifest.json").exists()
    write_shard(tmp_path, 0, 3, records[2:4], [{"index": 9, "sample_id": "x", "line": 10, "reason": "empty_response"}], 2)
    write_shard(tmp_path, 2, 3, records[4:], [], row_group_size=2)
    manifest = finalize_manifest(tmp_path, 3, header)
    first = (tmp_path / "manifest.json").read_bytes()
    assert finalize_manifest(tmp_path, 3, header) == manifest
    assert (tmp_path / "manifest.json").read_bytes() == first
    assert json.loads(first) == manifest
    assert manifest["totals"] == {
        "records_in": 7,
        "records_written": 6,
        "records_rejected": 1,
        "positions": sum(r.positions.shape[0] for r in records),
        "bytes": sum(s["bytes"] for s in manifest["shards"]),
    }
    assert manifest["rejects"] == {"empty_response": 1}
    assert [s["name"] for s in manifest["shards"]] == ["part-00000-of-00003", "part-00001-of-00003", "part-00002-of-00003"]
    assert manifest["tokenizer_sha256"] == HEADER["tokenizer_sha256"]
    with pytest.raises(ValueError, match="store's own keys"):
        finalize_manifest(tmp_path, 3, dict(header, totals={}))


def test_record_checks_shapes_and_dtypes():
    rng = np.random.default_rng(0)
    good = random_record(rng, "a", 3)
    while good.positions.shape[0] < 2:
        good = random_record(rng, "a", 3)
    fields = dict(vars(good))
    with pytest.raises(ValueError, match="positions must be a 1-D int32"):
        DistillRecord(**dict(fields, positions=good.positions.astype(np.int64)))
    with pytest.raises(ValueError, match="number of positions P"):
        DistillRecord(**dict(fields, target_logprobs=good.target_logprobs[:-1]))
    with pytest.raises(ValueError, match=r"\[0, T - 1\)"):
        DistillRecord(**dict(fields, positions=np.full_like(good.positions, good.input_ids.shape[0] - 1))).to_row()
    with pytest.raises(ValueError, match="num_image_tokens"):
        DistillRecord(**dict(fields, image=None, num_image_tokens=5)).to_row()
    with pytest.raises(ValueError, match="without its encoding"):
        DistillRecord(**dict(fields, encoding=None)).to_row()
    with pytest.raises(ValueError, match="without .'tail_mass'"):
        DistillRecord(**dict(fields, tail_mass=None)).to_row()
    row, enc = good.to_row(), Encoding("topk", VOCAB, k=3)
    with pytest.raises(ValueError, match="cannot hold exactly"):
        DistillRecord.from_row(dict(row, ids=row["ids"][:-1]), enc)
    with pytest.raises(ValueError, match="ids stored for"):
        DistillRecord.from_row(dict(row, num_ids=row["num_ids"] - 3), enc)
    with pytest.raises(ValueError, match="one value per position"):
        DistillRecord.from_row(dict(row, tail_mass=row["tail_mass"][:-1]), enc)
