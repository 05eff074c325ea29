"""pytest tests/test_extract_overlap.py -q

Overlap and streaming in mod-extract: encoding in worker processes and writing on a background thread
give a cache bit-identical to the serial path (distillation records with images, and preference pairs);
each worker reads only its own shards' bytes of the data file, which is scanned (parsed and hashed) once
per extraction and recorded; a worker whose data file differs is stopped before it writes anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modkd.extract import data_index, run as run_module
from modkd.extract.data_index import INDEX_NAME, read_shard, scan
from modkd.extract.records import iter_shard, read_records
from modkd.extract.run import ExtractConfig, run
from modkd.store import Cache
from test_extract import assert_same_records


def assert_bit_identical(a: Path, b: Path, part: str = "shards") -> None:
    """Same manifest (shard sha256s included) and byte-identical shard, rejects and done files."""
    names = sorted(p.name for p in (a / part).iterdir())
    assert names == sorted(p.name for p in (b / part).iterdir()) and not [n for n in names if n.startswith(".")]
    for name in names:
        assert (a / part / name).read_bytes() == (b / part / name).read_bytes(), name
    manifest = "manifest.json" if part == "shards" else f"{part}/manifest.json"
    assert json.loads((a / manifest).read_text()) == json.loads((b / manifest).read_text())


def test_overlap_on_equals_overlap_off(tmp_path, teacher_dir, mixed_data, world, monkeypatch):
    monkeypatch.setattr(run_module, "WINDOW_BATCHES", 2)  # windows of 4 records: many windows per shard, several in flight
    caches = {}
    for workers in (0, 2):
        caches[workers] = tmp_path / f"enc{workers}"
        summary = run(ExtractConfig(str(teacher_dir), mixed_data, caches[workers], world, shards=2, batch_size=2,
                                    row_group_size=3, positions="all", encode_workers=workers))
        assert summary["manifest"]["totals"]["records_written"] == 30
    assert_bit_identical(caches[0], caches[2])
    assert_same_records(Cache.open(caches[0]), Cache.open(caches[2]), atol=0)
    assert any(r.image is not None for r in Cache.open(caches[2]).records())  # images were decoded in the workers


def test_overlap_on_equals_overlap_off_for_preference_pairs(tmp_path, teacher_dir, world):
    caches = {}
    for workers in (0, 1):
        caches[workers] = tmp_path / f"pref{workers}"
        run(ExtractConfig(str(teacher_dir), world / "pref.jsonl", caches[workers], world, shards=2, batch_size=2,
                          encode_workers=workers))
    assert_bit_identical(caches[0], caches[1], "preference")
    assert Cache.open(caches[1]).preference_manifest["totals"]["records_written"] == 8


def test_an_error_on_the_writer_thread_stops_the_run_and_completes_no_shard_wrongly(tmp_path, teacher_dir, mixed_data,
                                                                                   world, monkeypatch):
    from modkd.store.writer import ShardWriter

    real = ShardWriter.write

    def fails_in_shard_1(self, record) -> None:  # shard 1's only window: the error comes after finish() was queued
        if self.path.name.startswith("part-00001"):
            raise OSError("disk full")
        real(self, record)

    monkeypatch.setattr(ShardWriter, "write", fails_in_shard_1)
    out = tmp_path / "c"
    with pytest.raises(OSError, match="disk full"):
        run(ExtractConfig(str(teacher_dir), mixed_data, out, world, shards=2, encode_workers=1))
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        "part-00000-of-00002.done.json", "part-00000-of-00002.parquet", "part-00000-of-00002.rejects.jsonl"]


DATA_CASES = {
    "lines.jsonl": '\n{"id": 1, "x": "\u00e9"}\n{"id": "2"}\n  \n{broken\n[1, 2]\n{"id": 1}\r\n{"id": "\u00e9"}\n\n{"id":"\\u00e9"}\n',
    "array.json": '  [ {"id": 1}, [3], {"id": "\u00fc"} ,{"id":1},\n{"z": "\u65e5\u672c"}, {"id": 7} ]\n',
    "empty.json": "[]",
}


@pytest.mark.parametrize("name", sorted(DATA_CASES))
@pytest.mark.parametrize("shards", [1, 2, 3, 8])
def test_each_shard_read_from_its_bytes_equals_the_whole_file_read(tmp_path, name, shards):
    """Blank lines, malformed lines, non-objects, duplicate ids (also across shards), non-ASCII, CRLF, JSON arrays."""
    data = tmp_path / name
    data.write_text(DATA_CASES[name], encoding="utf-8")
    whole = read_records(data)
    index = scan(data, shards)
    assert index["records"] == len(whole) and sum(e["count"] for e in index["shards"]) == len(whole)

    def fields(records):
        return [(r.index, r.line, r.data, r.error, r.error_kind) for r in records]

    for s in range(shards):
        assert fields(read_shard(data, index, s)) == fields(iter_shard(whole, s, shards))
    if name == "lines.jsonl":
        kinds = {r.line: r.error_kind for r in whole if r.error}
        assert kinds == {5: "malformed", 6: "malformed", 7: "duplicate_id", 10: "duplicate_id"}


def test_the_data_is_scanned_once_and_a_changed_file_is_refused(tmp_path, text_teacher_dir, mixed_data, monkeypatch):
    out = tmp_path / "c"
    run(ExtractConfig(str(text_teacher_dir), mixed_data, out, shards=4, num_workers=2, worker_index=0))
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["records"] == 30 and json.loads((out / "extract_config.json").read_text())["data"]["sha256"] == index["sha256"]

    def no_second_scan(*args):
        raise AssertionError("the data file was scanned again")

    changed = tmp_path / "other" / mixed_data.name  # same name and size, one character different: the recorded
    changed.parent.mkdir()                          # index is taken...
    text = mixed_data.read_text()
    last_e = text.rindex("e")  # in the last record, which is in shard 3
    changed.write_text(text[:last_e] + "a" + text[last_e + 1:])
    assert changed.stat().st_size == mixed_data.stat().st_size and changed.read_bytes() != mixed_data.read_bytes()
    monkeypatch.setattr(data_index, "scan", no_second_scan)
    with pytest.raises(ValueError, match="bytes of shard 3 differ from the file this extraction was started with"):
        run(ExtractConfig(str(text_teacher_dir), changed, out, shards=4, num_workers=2, worker_index=1))
    assert not (out / "shards" / "part-00003-of-00004.done.json").exists()  # ...but nothing is written from it
    summary = run(ExtractConfig(str(text_teacher_dir), mixed_data, out, shards=4, num_workers=2, worker_index=1))
    assert summary["shards_done_now"] == 1 and summary["manifest"]["totals"]["records_in"] == 30
