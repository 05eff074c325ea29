"""`pytest tests/test_store_stats.py -q`: stats() numbers on hand-made records."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_store_helpers import HEADER

from modkd.store.encoding import LOGPROB_STEP

from modkd.store import (
    Cache,
    DistillRecord,
    Encoding,
    ImageRef,
    ShardWriter,
    finalize_manifest,
    shard_paths,
    write_done_marker,
    write_text_atomic,
)


ENCODING = Encoding("topk", 10, k=2)


def hand_made_cache(tmp_path):
    log = math.log
    first = DistillRecord(
        sample_id="a",
        input_ids=np.array([5, 6, 7, 8], dtype=np.int32),
        positions=np.array([0, 2], dtype=np.int32),
        position_kinds=np.array([2, 0], dtype=np.int8),  # image, response
        topk_ids=np.array([[1, 2], [3, 4]], dtype=np.int32),
        topk_logprobs=np.log(np.array([[0.5, 0.25], [0.9, 0.05]], dtype=np.float32)),
        tail_mass=np.array([0.25, 0.05], dtype=np.float32),
        encoding=ENCODING,
        target_logprobs=np.log(np.array([0.1, 0.2], dtype=np.float32)),
        image=ImageRef(path="imgs/a.png", sha256="0" * 64),
        num_image_tokens=1,
    )
    second = DistillRecord(  # one instruction position whose second top-k entry has probability 0
        sample_id="b",
        input_ids=np.array([1, 2], dtype=np.int32),
        positions=np.array([0], dtype=np.int32),
        position_kinds=np.array([1], dtype=np.int8),
        topk_ids=np.array([[9, 3]], dtype=np.int32),
        topk_logprobs=np.array([[log(1.0), -np.inf]], dtype=np.float32),
        tail_mass=np.array([0.0], dtype=np.float32),
        encoding=ENCODING,
        target_logprobs=np.array([0.0], dtype=np.float32),
        image=None,
        num_image_tokens=0,
    )
    parquet, rejects, _ = shard_paths(tmp_path, 0, 1)
    with ShardWriter(parquet) as writer:
        writer.write(first)
        writer.write(second)
    write_text_atomic(rejects, '{"index": 2, "sample_id": "c", "line": 3, "reason": "empty_response: no assistant turn"}\n')
    write_done_marker(tmp_path, 0, 1, 3, {"empty_response": 1}, writer.stats)
    finalize_manifest(tmp_path, 1, dict(HEADER, settings=ENCODING.settings()))
    return writer.stats["bytes"]


def test_stats_of_known_log_probs(tmp_path):
    num_bytes = hand_made_cache(tmp_path)
    shard, total = Cache.open(tmp_path).stats()
    assert shard["name"] == "part-00000-of-00001" and total["name"] == "total"
    for row in (shard, total):
        assert row["records"] == 2 and row["positions"] == 3 and row["bytes"] == num_bytes
        assert row["bytes_per_position"] == pytest.approx(num_bytes / 3)
        assert row["mean_topk_mass"] == pytest.approx((0.75 + 0.95 + 1.0) / 3, rel=1e-6)
        entropies = [
            -(0.5 * math.log(0.5) + 0.25 * math.log(0.25)),
            -(0.9 * math.log(0.9) + 0.05 * math.log(0.05)),
            0.0,  # p = 1 and p = 0 (log-prob -inf) contribute nothing
        ]
        # decoded log-probs are within LOGPROB_STEP / 2 of these (store/encoding.py): p log p moves by < 1%
        assert row["mean_topk_entropy"] == pytest.approx(sum(entropies) / 3, rel=LOGPROB_STEP)
        assert row["mean_ids"] == 2
        assert row["positions_by_kind"] == {"response": 1, "instruction": 1, "image": 1}


def test_rejects_are_listed(tmp_path):
    hand_made_cache(tmp_path)
    cache = Cache.open(tmp_path)
    assert list(cache.rejects()) == [
        {"index": 2, "sample_id": "c", "line": 3, "reason": "empty_response: no assistant turn"}
    ]
    assert cache.manifest["rejects"] == {"empty_response": 1}
    assert cache.manifest["totals"]["records_in"] == 3
    assert cache.verify() == []


def test_stats_of_a_cache_without_positions(tmp_path):
    parquet, rejects, _ = shard_paths(tmp_path, 0, 1)
    with ShardWriter(parquet) as writer:
        pass
    write_text_atomic(rejects, "")
    write_done_marker(tmp_path, 0, 1, 0, {}, writer.stats)
    finalize_manifest(tmp_path, 1, dict(HEADER, settings=ENCODING.settings()))
    total = Cache.open(tmp_path).stats()[-1]
    assert total["records"] == 0 and total["positions"] == 0
    assert total["bytes_per_position"] is None and total["mean_topk_mass"] is None
    assert list(Cache.open(tmp_path).records()) == []
