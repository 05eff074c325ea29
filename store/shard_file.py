"""`python -c "from modkd.store.shard_file import open_shard"`: open one shard's Parquet file and decode its rows.

Everything pyarrow can raise on a corrupt or foreign file becomes a CacheError naming the shard.
Rows are decoded column-wise: each list column becomes one writable numpy buffer per batch and every
row gets a view of its slice, so decoding costs one copy per batch, not one conversion per value.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import CacheError
from .schema import DISTILL_SCHEMA

READ_ERRORS = (pa.ArrowException, OSError)


def open_shard(path: Path, name: str, schema: pa.Schema = DISTILL_SCHEMA) -> pq.ParquetFile:
    """The shard's ParquetFile (only its footer is read); CacheError if unreadable or not `schema`."""
    try:
        parquet = pq.ParquetFile(path)
    except READ_ERRORS as err:
        raise CacheError(f"{name} is not a readable Parquet file ({err}); the shard must be re-extracted") from None
    if not parquet.schema_arrow.equals(schema):
        parquet.close()
        expected = "DISTILL_SCHEMA" if schema.equals(DISTILL_SCHEMA) else "PREFERENCE_SCHEMA"
        raise CacheError(f"{name} does not have {expected}; it holds:\n{parquet.schema_arrow}")
    return parquet


def iter_row_group(
    parquet: pq.ParquetFile, name: str, row_group: int, columns: list[str] | None
) -> Iterator[pa.RecordBatch]:
    """The batches of one row group (one batch per row group in practice); CacheError if it cannot be decoded."""
    rows = parquet.metadata.row_group(row_group).num_rows
    batches = parquet.iter_batches(batch_size=max(rows, 1), row_groups=[row_group], columns=columns)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except READ_ERRORS as err:
            raise CacheError(f"{name}: row group {row_group} is unreadable ({err}); the shard must be re-extracted") from None
        yield batch


def list_column(column: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets (R + 1,) int32, values (N,) writable numpy) of a list column; ValueError on null values."""
    if column.null_count or column.values.null_count:
        raise ValueError(f"list column of type {column.type} holds nulls")
    offsets = column.offsets.to_numpy()  # (R + 1,) int32, absolute into column.values
    values = np.array(column.values.to_numpy(zero_copy_only=False))  # (N,) writable copy
    return offsets, values


def batch_rows(batch: pa.RecordBatch) -> list[dict]:
    """Row dicts of a batch: list columns as numpy views, other columns as Python values."""
    columns = {}
    for name, column in zip(batch.schema.names, batch.columns):
        if pa.types.is_list(column.type):
            offsets, values = list_column(column)
            columns[name] = [values[offsets[i] : offsets[i + 1]] for i in range(batch.num_rows)]
        else:
            columns[name] = column.to_pylist()
    return [{name: values[i] for name, values in columns.items()} for i in range(batch.num_rows)]
