"""`pytest tests/test_store_errors.py -q`: incomplete or corrupt caches give a CacheError naming the shard."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_store_helpers import build_cache, random_record, write_shard

from modkd.store import DISTILL_SCHEMA, Cache, CacheError, ShardWriter, sha256_file, shard_paths, verify_cache

SHARD_1 = "shards/part-00001-of-00003.parquet"


def test_open_without_manifest_reports_progress(tmp_path):
    rng = np.random.default_rng(0)
    for index in (0, 2, 5):
        write_shard(tmp_path, index, 7, [random_record(rng, f"r{index}", 2)], [], row_group_size=4)
    with pytest.raises(CacheError) as err:
        Cache.open(tmp_path)
    message = str(err.value)
    assert "3 of 7 shards complete" in message
    assert "missing part-00001-of-00007, part-00003-of-00007, part-00004-of-00007, part-00006-of-00007" in message
    assert "rerun mod-extract with the same arguments" in message


def test_open_empty_dir(tmp_path):
    with pytest.raises(CacheError, match="no manifest.json and no completed shards"):
        Cache.open(tmp_path)


def test_open_with_missing_shard(tmp_path):
    build_cache(tmp_path, [3, 4, 2])
    (tmp_path / SHARD_1).unlink()
    with pytest.raises(CacheError, match=f"{SHARD_1} is listed in manifest.json but missing"):
        Cache.open(tmp_path)
    assert any(problem.startswith(f"{SHARD_1}: missing") for problem in verify_cache(tmp_path))


def test_open_with_truncated_shard(tmp_path):
    build_cache(tmp_path, [3, 4, 2])
    data = (tmp_path / SHARD_1).read_bytes()
    (tmp_path / SHARD_1).write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match=f"{SHARD_1} has {len(data) // 2} bytes but manifest.json records {len(data)}"):
        Cache.open(tmp_path)


def test_open_with_wrong_schema_version(tmp_path):
    build_cache(tmp_path, [2])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(dict(manifest, schema_version=99)))
    with pytest.raises(CacheError, match="schema_version 99"):
        Cache.open(tmp_path)


def test_verify_catches_a_flipped_byte(tmp_path):
    build_cache(tmp_path, [3, 4, 2])
    assert Cache.open(tmp_path).verify() == []
    data = bytearray((tmp_path / SHARD_1).read_bytes())
    data[len(data) // 3] ^= 0xFF
    (tmp_path / SHARD_1).write_bytes(bytes(data))
    problems = Cache.open(tmp_path).verify()  # same size: open's cheap check passes
    assert f"{SHARD_1}: sha256 differs from manifest.json (file modified or corrupted)" in problems
    assert all(problem.startswith(SHARD_1) for problem in problems)


def test_reading_corrupt_pages_or_footer_names_the_shard(tmp_path):
    build_cache(tmp_path, [3, 40, 2], row_group_size=40)
    path = tmp_path / SHARD_1
    data = bytearray(path.read_bytes())
    data[4 : len(data) // 2] = bytes(len(data) // 2 - 4)  # zero the first half of the pages, keep the size
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=SHARD_1):
        list(Cache.open(tmp_path).records())
    footer = int.from_bytes(data[-8:-4], "little")
    data[-8 - footer : -8] = bytes(footer)  # and the footer
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=f"{SHARD_1} is not a readable Parquet file"):
        list(Cache.open(tmp_path).records())
    assert any(SHARD_1 in problem and "not a readable Parquet file" in problem for problem in verify_cache(tmp_path))


def _replace_shard(cache_dir, index, num_shards, table):
    """Overwrite a shard with `table` and make the manifest agree on its size and hash."""
    parquet = shard_paths(cache_dir, index, num_shards)[0]
    pq.write_table(table, parquet, compression="zstd")
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    manifest["shards"][index].update(bytes=parquet.stat().st_size, sha256=sha256_file(parquet))
    manifest["totals"]["bytes"] = sum(shard["bytes"] for shard in manifest["shards"])
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))


def test_verify_catches_inconsistent_rows(tmp_path):
    build_cache(tmp_path, [3, 4, 2], k=4)
    table = pq.read_table(tmp_path / SHARD_1)
    rows = table.to_pylist()
    rows[2]["tail_mass"] = rows[2]["tail_mass"] + [0.5]
    assert rows[3]["positions"] and rows[0]["positions"] and rows[1]["positions"], "the seed must give rows positions"
    rows[3]["position_kinds"] = [7] * len(rows[3]["position_kinds"])
    rows[0]["ids"] = rows[0]["ids"][:-1]  # the packed ids cut short
    rows[1]["top_logprobs"] = [x - 1.0 for x in rows[1]["top_logprobs"]]  # decoded mass no longer 1 - tail_mass
    _replace_shard(tmp_path, 1, 3, pa.Table.from_pylist(rows, schema=DISTILL_SCHEMA))
    problems = verify_cache(tmp_path)
    assert f"{SHARD_1}: 1 rows with len(tail_mass) != P (first: row 2)" in problems
    assert f"{SHARD_1}: 1 rows with a distribution that does not decode (first: row 0)" in problems
    assert f"{SHARD_1}: 1 rows with top-k mass disagrees with 1 - tail_mass (first: row 1)" in problems
    assert f"{SHARD_1}: 1 rows with unknown position kinds (first: row 3)" in problems
    with pytest.raises(CacheError, match=f"{SHARD_1}: row group 0 holds a malformed record"):
        list(Cache.open(tmp_path).records())


def test_verify_catches_count_mismatch_and_duplicates(tmp_path):
    build_cache(tmp_path, [3, 4, 2])
    table = pq.read_table(tmp_path / SHARD_1)
    _replace_shard(tmp_path, 1, 3, pa.concat_tables([table, table.slice(0, 1)]))
    problems = verify_cache(tmp_path)
    assert f"{SHARD_1}: 5 records, manifest.json records 4" in problems
    assert any(problem.startswith(f"{SHARD_1}: 1 rows with sample_id 's1-r0' appears twice") for problem in problems)
    with pytest.raises(CacheError, match=f"{SHARD_1} holds 5 records but manifest.json records 4"):
        list(Cache.open(tmp_path).records())


def test_verify_catches_missing_reject_lines(tmp_path):
    build_cache(tmp_path, [3, 4, 2])
    (tmp_path / "shards/part-00002-of-00003.rejects.jsonl").write_text("")
    assert verify_cache(tmp_path) == ["shards/part-00002-of-00003.rejects.jsonl: 0 lines, manifest.json records 2 rejected records"]


def test_shard_writer_leaves_nothing_after_an_exception(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "shards" / "part-00000-of-00001.parquet"
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(path, row_group_size=2) as writer:
            for i in range(5):
                writer.write(random_record(rng, f"r{i}", 3))
            raise RuntimeError("boom")
    assert list(path.parent.iterdir()) == []
    assert writer.stats is None


def test_shard_writer_rejects_a_bad_record_without_leaving_a_file(tmp_path):
    rng = np.random.default_rng(0)
    record = random_record(rng, "r", 3)
    record.num_image_tokens = -1
    path = tmp_path / "part.parquet"
    with pytest.raises(ValueError, match="num_image_tokens"):
        with ShardWriter(path) as writer:
            writer.write(record)
    assert list(tmp_path.iterdir()) == []
