"""`with ShardWriter(Path("cache/shards/part-00000-of-00001.parquet")) as w: w.write(record)`: atomic file writing.

A shard is written under a hidden temporary name in its final directory and renamed into place only
when it closed cleanly, so a file at the final path is always complete; a crash or an exception
inside the with-block leaves nothing there. JSON and text files get the same treatment.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .schema import DISTILL_SCHEMA


class RowRecord(Protocol):
    def to_row(self) -> dict: ...


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path | str, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def write_json_atomic(path: Path | str, obj: object) -> None:
    """Sorted keys and a trailing newline: the same object always gives the same bytes."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _rows_to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Column-wise build: list columns become one concatenated numpy buffer plus offsets."""
    columns = []
    for field in schema:
        values = [row[field.name] for row in rows]
        if pa.types.is_list(field.type):
            dtype = field.type.value_type.to_pandas_dtype()
            lengths = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))  # (R,) int64
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)  # (R + 1,) int32
            flat = np.concatenate([np.asarray(v, dtype=dtype) for v in values])  # (sum lengths,) value dtype
            columns.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat), type=field.type))
        else:
            columns.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(columns, schema=schema)


class ShardWriter:
    """Writes records to one zstd Parquet file, row group by row group, and renames it into place on success.

    After a clean exit `.stats` is dict(records, positions, bytes, sha256); `positions` is the total
    length of the schema's `positions` column (0 for a schema without one).
    """

    def __init__(
        self,
        path: Path,
        schema: pa.Schema = DISTILL_SCHEMA,
        # 256 rows: a few MB per row group at typical P and k; the unit a reader streams and splits over ranks
        row_group_size: int = 256,
    ) -> None:
        self.path = Path(path)
        self.schema = schema
        self.row_group_size = row_group_size
        self.tmp_path = _tmp_path(self.path)
        self.stats: dict | None = None
        self._rows: list[dict] = []
        self._records = 0
        self._positions = 0
        self._parquet: pq.ParquetWriter | None = None

    def __enter__(self) -> ShardWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        dictionary, split = _encodings(self.schema)
        self._parquet = pq.ParquetWriter(self.tmp_path, self.schema, compression="zstd", use_dictionary=dictionary,
                                         column_encoding=split)
        return self

    def write(self, record: RowRecord) -> None:
        row = record.to_row()
        if list(row) != self.schema.names:
            raise ValueError(f"{self.path.name}: row has columns {list(row)}, schema has {self.schema.names}")
        self._rows.append(row)
        self._records += 1
        if "positions" in row:
            self._positions += len(row["positions"])
        if len(self._rows) >= self.row_group_size:
            self._flush()

    def _flush(self) -> None:
        table = _rows_to_table(self._rows, self.schema)
        self._parquet.write_table(table, row_group_size=len(self._rows))
        self._rows = []

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._finish()
        finally:
            if self._parquet.is_open:
                self._parquet.close()
            self.tmp_path.unlink(missing_ok=True)

    def _finish(self) -> None:
        if self._rows:
            self._flush()
        self._parquet.close()
        _fsync_file(self.tmp_path)
        self.stats = {
            "records": self._records,
            "positions": self._positions,
            "bytes": self.tmp_path.stat().st_size,
            "sha256": sha256_file(self.tmp_path),
        }
        os.replace(self.tmp_path, self.path)
        _fsync_dir(self.path.parent)


def _encodings(schema: pa.Schema) -> tuple[list[str], dict[str, str]]:
    """Per-column Parquet encodings: dictionary for integer columns (ids repeat), BYTE_STREAM_SPLIT for
    floats (dictionary encoding inflates float32 log-probs; byte-split lets zstd find their shared
    exponents): 153 -> 104 bytes per position at k=20 on smollm2-135m (benchmarks/cache_size.py)."""
    dictionary, split = [], {}
    for field in schema:
        is_list = pa.types.is_list(field.type)
        leaf = field.type.value_type if is_list else field.type
        path = f"{field.name}.list.element" if is_list else field.name
        if pa.types.is_floating(leaf):
            split[path] = "BYTE_STREAM_SPLIT"
        elif pa.types.is_integer(leaf):
            dictionary.append(path)
    return dictionary, split
