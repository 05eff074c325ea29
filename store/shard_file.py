"""`python -c "from modkd.store.shard_file import open_shard"`: open one shard's file and decode its rows.

Everything pyarrow can raise on a corrupt or foreign file becomes a CacheError naming the shard.
Rows are decoded column-wise: each list column becomes one writable numpy buffer per batch and every
row gets a view of its slice, so decoding costs one copy per batch, not one conversion per value.
`shard_writer` and `shard_batches` are the two places that choose between the Parquet format and the
WebDataset one (store/webdataset.py); verify and stats read either through `shard_batches`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .layout import CacheError
from .schema import DISTILL_SCHEMA
from .webdataset import WebDatasetWriter, embedded_image_ok, read_unit
from .writer import ShardWriter, _rows_to_table

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


def shard_writer(fmt: str, path: Path, schema: pa.Schema = DISTILL_SCHEMA, row_group_size: int = 256,
                 image_root: Path | None = None, embed_images: bool = False) -> ShardWriter | WebDatasetWriter:
    """The atomic writer of one shard in format `fmt` ("parquet" or "webdataset"; only the latter embeds images)."""
    if fmt == "webdataset":
        return WebDatasetWriter(path, schema, row_group_size, image_root, embed_images)
    if fmt != "parquet" or embed_images:
        raise ValueError(f"format {fmt!r}{' with embedded images' if embed_images else ''} is not writable; "
                         "formats: parquet, webdataset (embedded images: webdataset only)")
    return ShardWriter(path, schema, row_group_size)


def shard_batches(path: Path, name: str, schema: pa.Schema, shard: dict, columns: list[str] | None = None,
                  ) -> Iterator[tuple[int, pa.RecordBatch, dict[str, np.ndarray]]]:
    """(unit, batch, extra checks) for every unit of a shard in order, in either format; `shard` is its
    manifest entry (a WebDataset one lists its units). Extra checks are (R,) bool masks, True = bad."""
    if "units" not in shard:
        with open_shard(path, name, schema) as parquet:
            for row_group in range(parquet.metadata.num_row_groups):
                for batch in iter_row_group(parquet, name, row_group, columns):
                    yield row_group, batch, {}
        return
    fields = pa.schema([f for f in schema if columns is None or f.name in columns])
    for index, unit in enumerate(shard["units"]):
        rows = read_unit(path, name, unit, schema, fields.names)
        bad_image = np.array([not embedded_image_ok(row) for row in rows])  # (R,) bool
        batch = _rows_to_table(rows, fields).combine_chunks().to_batches()[0]
        yield index, batch, {"embedded image bytes differ from image_sha256": bad_image}
