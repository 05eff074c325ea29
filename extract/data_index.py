"""python -c "from modkd.extract.data_index import scan; print(scan('train.jsonl', 8)['sha256'])"

The data file, scanned once per extraction ("hash once, record it").

The scan reads the file once and finds its sha256 (the data's part of the extraction's identity), its
record count, the records whose `id` an earlier record already has, and per shard the byte range,
first record, first line and the sha256 of those bytes. The first worker to arrive (or the Ray driver)
records it as `data_index.json` beside the part's `extract_config.json`. Every worker then reads only
its own shards' bytes and checks each against the recorded hash before extracting it: no worker loads,
parses or hashes the whole file, and a worker whose `--data` is not the file the extraction was started
with stops with a clear error before writing anything.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from pathlib import Path
from typing import Iterator

from modkd.store import PREFERENCE_SUBDIR, SHARDS_SUBDIR, write_json_atomic

from .preference import is_preference_data
from .records import RawRecord, head_records, is_json_array, mark_duplicates, parse_records

INDEX_NAME = "data_index.json"
INDEX_VERSION = 1  # bump when the index's keys change: an older index is then scanned again


def prepare(data: Path, out: Path, shards: int) -> tuple[bool, str, dict]:
    """(preference data?, the part's subdir, the data index): what every worker and the Ray driver start from."""
    preference = is_preference_data(head_records(data))
    subdir = PREFERENCE_SUBDIR if preference else SHARDS_SUBDIR
    return preference, subdir, load_or_scan(data, part_dir(out, subdir), shards)


def part_dir(out: Path, subdir: str) -> Path:
    """Where a part's extract_config.json and data_index.json live: the cache root for distillation records."""
    return Path(out) / ("" if subdir == SHARDS_SUBDIR else subdir)


def load_or_scan(data: Path, folder: Path, shards: int) -> dict:
    """The recorded index when it describes a file of this size split into `shards`, else a new scan (recorded
    when none was; an index of another file or shard count belongs to the extraction already there, which the
    identity check then refuses to mix with this one)."""
    path = folder / INDEX_NAME
    if path.is_file():
        index = json.loads(path.read_text(encoding="utf-8"))
        if (index.get("version"), index.get("size"), len(index.get("shards", []))) == (
                INDEX_VERSION, Path(data).stat().st_size, shards):
            return index
        return scan(data, shards)
    index = scan(data, shards)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, index)
    return index


def scan(data: Path | str, shards: int) -> dict:
    """One pass to parse the file (streaming for JSONL), one to hash each shard's byte range."""
    data = Path(data)
    is_array, size = is_json_array(data), data.stat().st_size
    digest = hashlib.sha256()
    offsets, lines = array("q"), array("q")  # (N,) byte offset and line number of each record
    duplicates: dict[str, str] = {}
    with open(data, "rb") as f:
        if is_array:
            content = f.read()
            digest.update(content)
            pairs = parse_records(content, True, path=data, closes=True)
        else:
            pairs = parse_records(_hashed(f, digest), False, path=data)

        def located() -> Iterator[RawRecord]:
            for raw, offset in pairs:
                offsets.append(offset)
                lines.append(raw.line)
                yield raw

        for raw in mark_duplicates(located()):
            if raw.error_kind == "duplicate_id":
                duplicates[str(raw.index)] = raw.error
    n = len(offsets)
    firsts = [s * n // shards for s in range(shards + 1)]  # shard s = records [firsts[s], firsts[s + 1])
    starts = [0] + [offsets[b] if b < n else size for b in firsts[1:-1]] + [size]  # (S + 1,) byte boundaries
    entries = []
    with open(data, "rb") as f:
        for s in range(shards):
            f.seek(starts[s])
            entries.append({"start": starts[s], "end": starts[s + 1], "first": firsts[s], "count": firsts[s + 1] - firsts[s],
                            "line": 1 if s == 0 or firsts[s] >= n else lines[firsts[s]],
                            "sha256": hashlib.sha256(f.read(starts[s + 1] - starts[s])).hexdigest()})
    return {"version": INDEX_VERSION, "name": data.name, "size": size, "sha256": digest.hexdigest(),
            "json_array": is_array, "records": n, "shards": entries, "duplicates": duplicates}


def _hashed(f, digest) -> Iterator[bytes]:
    for line in f:
        digest.update(line)
        yield line


def read_shard(data: Path, index: dict, shard: int) -> list[RawRecord]:
    """Shard `shard`'s records, read from its byte range only, duplicates marked as the whole-file scan found them."""
    entry = index["shards"][shard]
    with open(data, "rb") as f:
        f.seek(entry["start"])
        content = f.read(entry["end"] - entry["start"])
    if len(content) != entry["end"] - entry["start"] or hashlib.sha256(content).hexdigest() != entry["sha256"]:
        raise ValueError(f"--data {data}: the bytes of shard {shard} differ from the file this extraction was started "
                         f"with (sha256 {index['sha256'][:16]}..., recorded in the cache's {INDEX_NAME}); "
                         "use that file, or a new --out")
    records = [raw for raw, _ in parse_records(content, index["json_array"], entry["first"], entry["line"], data,
                                               opens=entry["start"] == 0)]
    for raw in records:
        if str(raw.index) in index["duplicates"]:
            raw.error, raw.error_kind = index["duplicates"][str(raw.index)], "duplicate_id"
    if len(records) != entry["count"]:  # cannot happen when the hash matched; a bug if it does
        raise RuntimeError(f"shard {shard}: read {len(records)} records, the scan counted {entry['count']}")
    return records
