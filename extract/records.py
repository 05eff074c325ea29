"""python -c "from modkd.extract.records import read_records; print(sum(1 for _ in read_records('train.jsonl')))"

Read a LLaVA-format data file into raw records, keeping line numbers for error reports.

A data file is either a JSON array of records (LLaVA's own `llava_v1_5_mix665k.json` style) or JSON
Lines (one record per line). A line that is not valid JSON is not an error for the whole run: it becomes
a `RawRecord` with `error` set, so the extractor can reject it with its line number and go on. So does a
record whose `id` an earlier record of the file already has (`duplicate_id`: the first one is kept, so
an id names one record, as KTO's stored `mismatched_from` needs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


@dataclass
class RawRecord:
    index: int  # 0-based position among the file's records; decides the shard
    line: int  # 1-based line number (JSONL) or element number (JSON array), for error messages
    data: dict | None  # the parsed record, or None when it could not be parsed
    error: str | None = None  # why it cannot be used
    error_kind: str = "malformed"  # the reject kind of `error`

    @property
    def sample_id(self) -> str:
        if self.data is not None and isinstance(self.data.get("id"), (str, int)):
            return str(self.data["id"])
        return f"line:{self.line}"


def read_records(path: str | Path) -> list[RawRecord]:
    """All records of a JSON or JSONL file, in file order. Blank lines are skipped, not counted."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); a JSON array must parse as a whole") from e
        return _mark_duplicates([_raw(i, i + 1, item) for i, item in enumerate(items)])
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            records.append(RawRecord(len(records), line_no, None, f"malformed JSON on line {line_no}: {e.msg}"))
            continue
        records.append(_raw(len(records), line_no, item))
    return _mark_duplicates(records)


def _mark_duplicates(records: list[RawRecord]) -> list[RawRecord]:
    first: dict[str, int] = {}
    for raw in records:
        if raw.error is not None or "id" not in raw.data:
            continue
        if raw.sample_id in first:
            raw.error = f"id {raw.sample_id!r} is already used by the record on line {first[raw.sample_id]} (that one is kept)"
            raw.error_kind = "duplicate_id"
        else:
            first[raw.sample_id] = raw.line
    return records


def _raw(index: int, line: int, item) -> RawRecord:
    if not isinstance(item, dict):
        return RawRecord(index, line, None, f"record {line} is a {type(item).__name__}, not a JSON object")
    return RawRecord(index, line, item)


def iter_shard(records: list[RawRecord], shard: int, num_shards: int) -> Iterator[RawRecord]:
    """Contiguous block `shard` of `num_shards`: shards concatenated in order give the file's order."""
    n = len(records)
    yield from records[shard * n // num_shards : (shard + 1) * n // num_shards]
