"""pytest tests/test_student_data.py -q   # RecordStream, resume, collate, ImageLoader, BatchStream

A small cache extracted from the tiny teacher on the 30 mixed records: 3 shards of 10 records in row
groups of 4, so 9 (shard, row group) units to split over parts, and "all" positions so every
position kind occurs. Shuffle buffers are small (5 records) so that filling, replacing, draining and
the epoch boundary all happen within a few dozen records.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from modkd.extract.run import ExtractConfig, run
from modkd.store import POSITION_KINDS, Cache, ImageRef, sha256_file
from modkd.student.data import BatchStream, ImageLoader, RecordStream, collate

BUFFER = 5


@pytest.fixture(scope="module")
def cache(tmp_path_factory, teacher_dir, mixed_data, world) -> Cache:
    out = tmp_path_factory.mktemp("student_data") / "cache"
    summary = run(ExtractConfig(teacher=str(teacher_dir), data=mixed_data, out=out, image_root=world, shards=3,
                                top_k=8, positions="all", row_group_size=4))
    assert summary["manifest"] is not None
    cache = Cache.open(out)
    assert cache.num_records == 30 and len(cache.manifest["shards"]) == 3
    return cache


@pytest.fixture(scope="module")
def image_processor(teacher_dir):
    return AutoProcessor.from_pretrained(teacher_dir).image_processor


def ids(records) -> list[str]:
    return [r.sample_id for r in records]


def take(stream_iter, n: int) -> list:
    return list(itertools.islice(stream_iter, n))


def part_records(cache: Cache, part: int, parts: int, seed: int, epoch: int = 0) -> list:
    """The records of one part in one epoch, in reading order (before the buffer shuffles them)."""
    stream = RecordStream(cache, part, parts, seed)
    stream.epoch = epoch
    return list(stream.read_part(start=0))


def part_size(cache: Cache, part: int, parts: int, seed: int = 0, epoch: int = 0) -> int:
    return len(part_records(cache, part, parts, seed, epoch))


# ---------------------------------------------------------------- RecordStream: partition, epochs, resume


@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_parts_of_one_epoch_are_every_record_exactly_once(cache, parts):
    every = ids(cache.records())
    assert len(set(every)) == len(every) == 30
    seen = []
    for part in range(parts):
        n = part_size(cache, part, parts)
        assert n > 3  # each part fills its buffer, replaces and drains (a part holds >= 2 units of >= 2 records)
        stream = RecordStream(cache, part, parts, seed=0, buffer_size=3)
        it = iter(stream)
        epoch = ids(take(it, n))
        assert stream.epoch == 0
        assert len(set(epoch)) == n  # no repeat within an epoch
        assert not set(epoch) & set(seen)  # parts are disjoint
        seen += epoch
        next(it)
        assert stream.epoch == 1  # the (n+1)-th record opens the next epoch
    assert sorted(seen) == sorted(every)


def test_every_epoch_is_the_whole_part_in_a_new_order(cache):
    part, parts = 1, 3
    it = iter(RecordStream(cache, part, parts, seed=3, buffer_size=3))
    for epoch in range(3):
        read = ids(part_records(cache, part, parts, seed=3, epoch=epoch))  # this epoch's units, in reading order
        got = ids(take(it, len(read)))
        assert sorted(got) == sorted(read)  # the epoch is exactly its part
        assert got != read  # and the buffer shuffled it


def test_each_epoch_permutes_the_units_before_splitting_them(cache):
    """Parts of one epoch are disjoint and cover the cache; the unit order changes between epochs and seeds."""
    every = sorted(ids(cache.records()))
    orders = {}
    for seed, epoch in [(0, 0), (0, 1), (0, 2), (1, 0)]:
        parts = [ids(part_records(cache, part, 3, seed, epoch)) for part in range(3)]
        assert sorted(sum(parts, [])) == every
        orders[seed, epoch] = tuple(parts[0])
    assert len(set(orders.values())) == 4
    assert orders[0, 0] == tuple(ids(part_records(cache, 0, 3, 0, 0)))  # the seed decides: same seed, same order
    assert ids(part_records(cache, 0, 1, 0, 0)) != ids(cache.records())  # not the file's order


def test_seed_changes_the_order(cache):
    a = ids(take(iter(RecordStream(cache, 0, 1, seed=0, buffer_size=BUFFER)), 30))
    b = ids(take(iter(RecordStream(cache, 0, 1, seed=1, buffer_size=BUFFER)), 30))
    again = ids(take(iter(RecordStream(cache, 0, 1, seed=0, buffer_size=BUFFER)), 30))
    assert a == again and a != b and sorted(a) == sorted(b)


# where the stream is when its state is taken, for a part of N records and a buffer of B = 5
RESUME_POINTS = {
    "fresh": lambda N: 0,  # nothing read
    "buffer_just_full": lambda N: 1,  # B + 1 read, one yielded
    "mid_epoch": lambda N: N - BUFFER - 2,  # still reading: every yield replaces a buffered record
    "last_read": lambda N: N - BUFFER,  # the part's last record read, the buffer not yet draining
    "draining": lambda N: N - 2,  # the part is read, the buffer is half-empty (2 records left)
    "epoch_end": lambda N: N,  # the buffer is empty, the epoch not yet advanced
    "epoch2_start": lambda N: N + 1,  # the next epoch: buffer refilled from the start of the part
    "epoch2_mid": lambda N: N + N // 2,
    "epoch3_draining": lambda N: 3 * N - 1,
}


@pytest.mark.parametrize("part,parts", [(0, 1), (1, 3)])
@pytest.mark.parametrize("point", list(RESUME_POINTS))
def test_resume_from_a_json_state_continues_exactly(cache, part, parts, point):
    N = part_size(cache, part, parts, seed=1)  # epoch 0; later epochs' parts may differ in size
    n = RESUME_POINTS[point](N)
    stream = RecordStream(cache, part, parts, seed=1, buffer_size=BUFFER)
    it = iter(stream)
    take(it, n)
    state = json.loads(json.dumps(stream.state()))  # a checkpoint stores it as JSON
    if point == "draining":
        assert len(state["buffer"]) == 2 and state["read"] == N
    if point == "epoch_end":
        assert state["buffer"] == [] and state["epoch"] == 0
    if point.startswith("epoch2"):
        assert state["epoch"] == 1 and state["read"] > 0
    expected = take(it, 40)
    resumed = RecordStream(cache, part, parts, seed=1, buffer_size=BUFFER, state=state)
    got = take(iter(resumed), 40)
    assert ids(got) == ids(expected)
    for a, b in zip(got, expected):  # the records themselves, not only their ids
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)
        np.testing.assert_array_equal(a.tail_mass, b.tail_mass)
    assert resumed.state() == stream.state()


def test_resume_needs_the_same_seed_to_continue(cache):
    """The RNG state travels in the state: it, not the constructor seed, drives the resumed stream."""
    stream = RecordStream(cache, 0, 1, seed=1, buffer_size=BUFFER)
    it = iter(stream)
    take(it, 7)
    state = json.loads(json.dumps(stream.state()))
    expected = ids(take(it, 40))
    assert ids(take(iter(RecordStream(cache, 0, 1, seed=99, buffer_size=BUFFER, state=state)), 40)) == expected


# ---------------------------------------------------------------- collate


def mixed_records(cache: Cache) -> list:
    records = list(cache.records())
    with_image = [r for r in records if r.image is not None][:3]
    text_only = [r for r in records if r.image is None][:2]
    chosen = [with_image[0], text_only[0], with_image[1], with_image[2], text_only[1]]
    assert len({len(r.input_ids) for r in chosen}) > 1  # padding happens
    return chosen


def test_collate_pads_and_flattens_positions(cache, world, image_processor, tokenizer):
    records = mixed_records(cache)
    pad = tokenizer.pad_token_id
    batch = collate(records, pad, ImageLoader(world, image_processor))
    B, T = batch.input_ids.shape
    lengths = [len(r.input_ids) for r in records]
    assert (B, T) == (len(records), max(lengths))
    assert batch.sample_ids == ids(records)
    assert batch.attention_mask.sum(1).tolist() == lengths
    for b, r in enumerate(records):
        assert batch.input_ids[b, : lengths[b]].tolist() == r.input_ids.tolist()
        assert (batch.input_ids[b, lengths[b]:] == pad).all()
        assert batch.attention_mask[b, : lengths[b]].all() and not batch.attention_mask[b, lengths[b]:].any()

    flat_ids = batch.input_ids.reshape(-1)
    assert flat_ids[batch.flat_positions].tolist() == np.concatenate([r.input_ids[r.positions] for r in records]).tolist()
    targets = np.concatenate([r.input_ids[r.positions + 1] for r in records])
    assert batch.targets.tolist() == targets.tolist()
    assert torch.equal(batch.targets, flat_ids[batch.flat_positions + 1])  # t + 1 stays in the record's row
    rows = batch.flat_positions // T
    assert rows.tolist() == sum(([b] * len(r.positions) for b, r in enumerate(records)), [])
    assert batch.attention_mask.reshape(-1)[batch.flat_positions].all()  # never a padding position

    assert batch.kinds.tolist() == np.concatenate([r.position_kinds for r in records]).tolist()
    assert torch.equal(batch.target_ids, torch.from_numpy(np.concatenate([r.topk_ids for r in records])).long())
    assert torch.equal(batch.target_probs, torch.from_numpy(np.concatenate([r.target_probs for r in records])))
    assert torch.equal(batch.tail_mass, torch.from_numpy(np.concatenate([r.tail_mass for r in records])))
    torch.testing.assert_close(batch.target_probs.sum(-1), torch.ones(len(batch.targets)))  # renormalised top-k
    for t in (batch.input_ids, batch.attention_mask, batch.flat_positions, batch.targets, batch.target_ids):
        assert t.dtype == torch.int64

    kinds = batch.kinds
    assert set(kinds.tolist()) == set(POSITION_KINDS.values())  # "all" positions: every kind is present
    response, instruction = POSITION_KINDS["response"], POSITION_KINDS["instruction"]
    assert torch.equal(batch.kind_mask("response"), kinds == response)
    assert torch.equal(batch.kind_mask("response+instruction"), (kinds == response) | (kinds == instruction))
    assert batch.kind_mask("all").all()


def test_collate_pixel_values_one_row_per_image_record(cache, world, image_processor, tokenizer):
    records = mixed_records(cache)
    batch = collate(records, tokenizer.pad_token_id, ImageLoader(world, image_processor))
    with_image = [r for r in records if r.image is not None]
    assert batch.pixel_values.shape == (len(with_image), 3, 48, 48)
    expected = image_processor(images=[Image.open(world / r.image.path).convert("RGB") for r in with_image],
                               return_tensors="pt")["pixel_values"]
    assert torch.equal(batch.pixel_values, expected)  # in record order
    text_only = [r for r in records if r.image is None]
    assert collate(text_only, tokenizer.pad_token_id, ImageLoader(None, image_processor)).pixel_values is None


# ---------------------------------------------------------------- ImageLoader checks


@pytest.fixture()
def world_copy(world, tmp_path) -> Path:
    return Path(shutil.copytree(world, tmp_path / "world"))


def first_image_record(cache: Cache):
    return next(r for r in cache.records() if r.image is not None)


def test_image_loader_accepts_the_extracted_images(cache, world_copy, image_processor):
    rec = first_image_record(cache)
    assert ImageLoader(world_copy, image_processor).pixels([rec]).shape == (1, 3, 48, 48)


def test_image_loader_refuses_a_changed_image(cache, world_copy, image_processor):
    rec = first_image_record(cache)
    path = world_copy / rec.image.path
    image = Image.open(path).convert("RGB")
    image.putpixel((0, 0), (0, 0, 0))  # still a valid PNG, one pixel different
    image.save(path)
    with pytest.raises(ValueError, match="sha256"):
        ImageLoader(world_copy, image_processor).pixels([rec])


def test_image_loader_refuses_a_missing_image(cache, world_copy, image_processor):
    rec = first_image_record(cache)
    (world_copy / rec.image.path).unlink()
    with pytest.raises(ValueError, match="missing"):
        ImageLoader(world_copy, image_processor).pixels([rec])


@pytest.mark.parametrize("bad", ["../x.png", "images/../../x.png", "/etc/hostname"])
def test_image_loader_refuses_a_path_outside_the_root(cache, world_copy, image_processor, bad):
    rec = first_image_record(cache)
    (world_copy.parent / "x.png").write_bytes((world_copy / rec.image.path).read_bytes())  # exists, right sha256
    escaped = dataclasses.replace(rec, image=ImageRef(bad, sha256_file(world_copy.parent / "x.png")))
    with pytest.raises(ValueError, match="outside the image root"):
        ImageLoader(world_copy, image_processor).pixels([escaped])


def test_image_loader_without_root_refuses_image_records(cache, image_processor):
    rec = first_image_record(cache)
    with pytest.raises(ValueError, match="--image-root"):
        ImageLoader(None, image_processor).pixels([rec])


# ---------------------------------------------------------------- BatchStream (no DataLoader workers)


@pytest.mark.parametrize("before", [1, 4, 9])  # 4-record batches: batch 9 lies in the second epoch
def test_batch_stream_resumes_from_a_batch_state(cache, world, image_processor, tokenizer, before):
    def stream(states=None):
        return BatchStream(cache.path, 0, 1, batch_size=4, seed=2, pad_id=tokenizer.pad_token_id, image_root=world,
                           image_processor=image_processor, states=states)

    it = iter(stream())
    drawn = take(it, before)
    last = drawn[-1].stream_state
    assert last["worker"] == 0
    assert drawn[0].stream_state["state"] != last["state"] or before == 1
    following = take(it, 3)
    resumed = take(iter(stream({0: json.loads(json.dumps(last["state"]))})), 3)
    assert [b.sample_ids for b in resumed] == [b.sample_ids for b in following]
    for a, b in zip(resumed, following):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.flat_positions, b.flat_positions)
        assert (a.pixel_values is None) == (b.pixel_values is None)
        assert a.pixel_values is None or torch.equal(a.pixel_values, b.pixel_values)
    ids_seen = [s for b in drawn + following for s in b.sample_ids]
    n = min(len(ids_seen), 30)
    assert len(set(ids_seen[:n])) == n  # the first epoch repeats nothing


def test_batch_stream_splits_ranks(cache, world, image_processor, tokenizer):
    per_rank = []
    for rank in range(2):
        n = part_size(cache, rank, 2)
        bs = BatchStream(cache.path, rank, 2, batch_size=1, seed=0, pad_id=tokenizer.pad_token_id, image_root=world,
                         image_processor=image_processor)
        per_rank.append({s for b in take(iter(bs), n) for s in b.sample_ids})
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == set(ids(cache.records()))


def test_dataloader_workers_resume_without_losing_or_repeating_records(cache, world, image_processor, tokenizer):
    """With 2 DataLoader workers each worker's stream continues exactly after a resume; only the order in
    which the workers' batches interleave may restart (the README says so)."""

    def loader(states=None):
        stream = BatchStream(cache.path, 0, 1, batch_size=2, seed=3, pad_id=tokenizer.pad_token_id, image_root=world,
                             image_processor=image_processor, states=states)
        return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2))

    def per_worker(batches) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {0: [], 1: []}
        for b in batches:
            out[b.stream_state["worker"]] += b.sample_ids
        return out

    straight = per_worker(take(loader(), 14))  # 7 batches per worker: more than either gets below
    first = take(loader(), 3)
    states = {b.stream_state["worker"]: b.stream_state["state"] for b in first}
    states = json.loads(json.dumps(states), object_hook=lambda d: {int(k) if k.isdigit() else k: v for k, v in d.items()})
    resumed = per_worker(first + take(loader(states), 7))
    for worker in (0, 1):
        n = len(resumed[worker])
        assert n > 0 and resumed[worker] == straight[worker][:n]


def test_a_cache_written_source_by_source_trains_mixed_from_the_start(tmp_path):
    """A data file sorted by source (A then B) gives shards of A then shards of B; the first 64 records a
    rank trains on must mix both, with the default shuffle buffer (1024 records, fewer than source A holds)."""
    from test_store_helpers import build_cache

    build_cache(tmp_path, [300] * 8, row_group_size=32)  # shards 0-3: source A, 4-7: source B
    first = ids(take(iter(RecordStream(Cache.open(tmp_path), 0, 1, seed=0)), 64))
    from_b = sum(int(i.split("-")[0][1:]) >= 4 for i in first)
    assert 16 <= from_b <= 48, f"{from_b} of the first 64 records come from source B"
