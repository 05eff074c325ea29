"""python -c "from modkd.extract.records import read_records; print(sum(1 for _ in read_records('train.jsonl')))"

Read a LLaVA-format data file into raw records, keeping line numbers for error reports.

A data file is either a JSON array of records (LLaVA's own `llava_v1_5_mix665k.json` style) or JSON
Lines (one record per line, lines split at "\\n"). A line that is not valid JSON is not an error for the
whole run: it becomes a `RawRecord` with `error` set, so the extractor can reject it with its line number
and go on. So does a record whose `id` an earlier record of the file already has (`duplicate_id`: the
first one is kept, so an id names one record, as KTO's stored `mismatched_from` needs).

`parse_records` reads any byte range of a file that starts at a record (or at the file's start), with
each record's byte offset, so a worker can read just its shards (extract/data_index.py).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

_BETWEEN = re.compile(r"[ \t\n\r]*")  # JSON whitespace
HEAD_BYTES = 1 << 16  # first read when only the file's first record is wanted; grows x4 until one parses


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


def is_json_array(path: str | Path) -> bool:
    """True for a JSON array file, False for JSON Lines (decided by the first non-blank byte)."""
    with open(path, "rb") as f:
        while block := f.read(1 << 12):
            stripped = block.lstrip()
            if stripped:
                return stripped.startswith(b"[")
    return False


def read_records(path: str | Path) -> list[RawRecord]:
    """All records of a JSON or JSONL file, in file order. Blank lines are skipped, not counted."""
    path = Path(path)
    with open(path, "rb") as f:
        if is_json_array(path):
            records = parse_records(f.read(), True, path=path, closes=True)
        else:
            records = parse_records(f, False, path=path)
        return list(mark_duplicates(raw for raw, _ in records))


def head_records(path: str | Path) -> list[RawRecord]:
    """The file's records up to and including its first parsable one, reading only as much as that needs."""
    path = Path(path)
    size, n, array = path.stat().st_size, HEAD_BYTES, is_json_array(path)
    while True:
        with open(path, "rb") as f:
            head = f.read(n)
        whole = len(head) >= size
        if not whole and not array:
            head = head[: head.rfind(b"\n") + 1]  # whole lines only
        records = []
        try:
            for raw, _ in parse_records(head, array, path=path, closes=whole):
                records.append(raw)
                if raw.data is not None:
                    return records
        except ValueError:
            if whole:
                raise
        if whole:
            return records
        n *= 4


def parse_records(data: bytes | Iterable[bytes], array: bool, first_index: int = 0, first_line: int = 1,
                  path: Path | None = None, opens: bool = True, closes: bool = False) -> Iterator[tuple[RawRecord, int]]:
    """(record, byte offset of the record in `data`) for every record of `data`, without duplicate marking.

    JSONL: `data` is bytes or an iterable of lines (a binary file). JSON array: `data` is bytes that start
    with the array's "[" (`opens`) or at an element, and `closes` requires the closing "]" (a whole file)."""
    if not array:
        yield from _jsonl(io.BytesIO(data) if isinstance(data, bytes) else data, first_index, first_line)
    else:
        yield from _array(data, first_index, path, opens, closes)


def _jsonl(lines: Iterable[bytes], index: int, line_no: int) -> Iterator[tuple[RawRecord, int]]:
    offset = 0
    for line in lines:
        if line.strip():
            try:
                yield _raw(index, line_no, json.loads(line)), offset
            except json.JSONDecodeError as e:
                yield RawRecord(index, line_no, None, f"malformed JSON on line {line_no}: {e.msg}"), offset
            except UnicodeDecodeError as e:
                yield RawRecord(index, line_no, None, f"malformed JSON on line {line_no}: not UTF-8 ({e.reason})"), offset
            index += 1
        offset += len(line)
        line_no += 1


def _array(data: bytes, index: int, path: Path | None, opens: bool, closes: bool) -> Iterator[tuple[RawRecord, int]]:
    """Elements of a JSON array (or of a byte range of one), each with its byte offset."""
    text = data.decode("utf-8")
    decoder = json.JSONDecoder()
    pos, byte, counted = _BETWEEN.match(text, 0).end(), 0, 0  # byte = offset of text[counted]
    try:
        if opens:
            if not text.startswith("[", pos):
                raise json.JSONDecodeError("expected '['", text, pos)
            pos = _BETWEEN.match(text, pos + 1).end()
        while pos < len(text) and text[pos] != "]":
            item, end = decoder.raw_decode(text, pos)
            byte += len(text[counted:pos].encode("utf-8"))
            counted = pos
            yield _raw(index, index + 1, item), byte
            index += 1
            pos = _BETWEEN.match(text, end).end()
            if text.startswith(",", pos):
                pos = _BETWEEN.match(text, pos + 1).end()
            elif pos < len(text) and text[pos] != "]":
                raise json.JSONDecodeError("expected ',' or ']'", text, pos)
        if closes and (pos == len(text) or _BETWEEN.match(text, pos + 1).end() != len(text)):
            raise json.JSONDecodeError("expected one closing ']' at the end", text, pos)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); a JSON array must parse as a whole") from e


def duplicate_error(sample_id: str, first_line: int) -> str:
    return f"id {sample_id!r} is already used by the record on line {first_line} (that one is kept)"


def mark_duplicates(records: Iterable[RawRecord]) -> Iterator[RawRecord]:
    """The records, each one whose `id` an earlier one has marked `duplicate_id` (streaming)."""
    first: dict[str, int] = {}
    for raw in records:
        if raw.error is None and "id" in raw.data:
            if raw.sample_id in first:
                raw.error, raw.error_kind = duplicate_error(raw.sample_id, first[raw.sample_id]), "duplicate_id"
            else:
                first[raw.sample_id] = raw.line
        yield raw


def _raw(index: int, line: int, item) -> RawRecord:
    if not isinstance(item, dict):
        return RawRecord(index, line, None, f"record {line} is a {type(item).__name__}, not a JSON object")
    return RawRecord(index, line, item)


def iter_shard(records: list[RawRecord], shard: int, num_shards: int) -> Iterator[RawRecord]:
    """Contiguous block `shard` of `num_shards`: shards concatenated in order give the file's order."""
    n = len(records)
    yield from records[shard * n // num_shards : (shard + 1) * n // num_shards]
