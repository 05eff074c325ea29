"""`pytest tests/test_store_sharding.py -q`: ranks split the records disjointly; start= resumes exactly."""

from __future__ import annotations

import pytest
from test_store_helpers import build_cache

from modkd.store import Cache

SHARD_SIZES = [7, 0, 5, 11, 1, 6]  # an empty shard and uneven last row groups


@pytest.fixture(scope="module", params=["parquet", "webdataset"])
def cache(tmp_path_factory, request):
    """The same records in either shard format: splitting and resuming must not depend on it."""
    path = tmp_path_factory.mktemp("cache")
    build_cache(path, SHARD_SIZES, k=2, row_group_size=3, fmt=request.param)
    return Cache.open(path)


def ids(records) -> list[str]:
    return [record.sample_id for record in records]


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_ranks_are_disjoint_and_cover_everything(cache, world_size):
    everything = ids(cache.records())
    per_rank = [ids(cache.records(rank=r, world_size=world_size)) for r in range(world_size)]
    union = [sample_id for rank_ids in per_rank for sample_id in rank_ids]
    assert sorted(union) == sorted(everything)
    assert len(set(union)) == len(union) == sum(SHARD_SIZES)
    assert per_rank == [ids(cache.records(rank=r, world_size=world_size)) for r in range(world_size)]


def test_rank_takes_every_world_size_th_row_group(cache):
    # units (shard, rows): u0 s0[0:3], u1 s0[3:6], u2 s0[6:7], u3 s2[0:3], u4 s2[3:5], u5 s3[0:3],
    # u6 s3[3:6], u7 s3[6:9], u8 s3[9:11], u9 s4[0:1], u10 s5[0:3], u11 s5[3:6]; rank 1 of 2 takes odd units
    expected = [f"s{shard}-r{row}" for shard, rows in [(0, range(3, 6)), (2, range(0, 3)), (3, range(0, 3)),
                                                      (3, range(6, 9)), (4, range(0, 1)), (5, range(3, 6))]
                for row in rows]
    assert ids(cache.records(rank=1, world_size=2)) == expected


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_start_resumes_with_exactly_the_rest(cache, world_size):
    for rank in range(world_size):
        full = list(cache.records(rank=rank, world_size=world_size))
        assert [r.cursor for r in full] == list(range(1, len(full) + 1))
        for start in sorted({0, 1, 2, 3, 4, len(full) // 2, len(full) - 1, len(full), len(full) + 3}):
            rest = list(cache.records(rank=rank, world_size=world_size, start=max(start, 0)))
            assert ids(rest) == ids(full[start:])
            assert [r.cursor for r in rest] == [r.cursor for r in full[start:]]


def test_cursor_of_a_record_resumes_right_after_it(cache):
    records = list(cache.records(rank=0, world_size=2))
    middle = records[len(records) // 2]
    assert ids(cache.records(rank=0, world_size=2, start=middle.cursor)) == ids(records[len(records) // 2 + 1 :])


def test_bad_rank_or_start(cache):
    with pytest.raises(ValueError, match="rank"):
        next(cache.records(rank=2, world_size=2))
    with pytest.raises(ValueError, match="start"):
        next(cache.records(start=-1))
