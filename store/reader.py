"""`python -c "from modkd.store import Cache; print(Cache.open('cache/').num_records)"`: open and stream a cache.

    cache = Cache.open("cache/")
    for rec in cache.records(rank=r, world_size=w, start=n):   # streaming, split over ranks, resumable
        ...

Splitting: the unit is one (shard, row group), numbered in manifest shard order; rank r reads the
units u with u % world_size == r, in order. The union over ranks is every record, each exactly once,
and a rank's order never changes. `start` is the number of records this rank already consumed (the
`cursor` of the last record it saw): whole row groups are skipped from their metadata, then rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .errors import CacheError
from .layout import relative_name, shard_paths
from .manifest import load_manifest
from .records import DistillRecord
from .schema import DISTILL_SCHEMA
from .shard_file import batch_rows, iter_row_group, open_shard
from .stats import shard_sums, summarize
from .verify import verify_shards


class Cache:
    def __init__(self, path: Path, manifest: dict) -> None:
        self.path = path
        self.manifest = manifest
        self.top_k: int = manifest["settings"]["top_k"]
        self.num_records: int = manifest["totals"]["records_written"]

    @classmethod
    def open(cls, path: Path | str) -> Cache:
        """Load the manifest and check that every shard file exists with its recorded size (no hashing)."""
        path = Path(path)
        manifest = load_manifest(path)
        cache = cls(path, manifest)
        for index, shard in enumerate(manifest["shards"]):
            parquet, name = cache._shard_file(index)
            if not parquet.is_file():
                raise CacheError(f"{name} is listed in manifest.json but missing; {cache._redo_hint(index)}")
            size = parquet.stat().st_size
            if size != shard["bytes"]:
                raise CacheError(
                    f"{name} has {size} bytes but manifest.json records {shard['bytes']} (truncated or modified); "
                    f"{cache._redo_hint(index)}"
                )
        return cache

    def _shard_file(self, index: int) -> tuple[Path, str]:
        """(path, name for messages) of shard `index`'s Parquet file."""
        parquet = shard_paths(self.path, index, self.manifest["num_shards"])[0]
        return parquet, relative_name(self.path, parquet)

    def _redo_hint(self, index: int) -> str:
        done = shard_paths(self.path, index, self.manifest["num_shards"])[2]
        return f"delete {relative_name(self.path, done)} and manifest.json, then rerun mod-extract with the same arguments"

    def records(
        self, rank: int = 0, world_size: int = 1, start: int = 0, columns: list[str] | None = None
    ) -> Iterator[DistillRecord]:
        """Stream this rank's records from record `start` on; `columns` reads a subset (other fields are None)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        read_columns = _read_columns(columns)
        unit = 0  # global (shard, row group) counter
        consumed = 0  # records of this rank in the row groups before the current one
        for index, shard in enumerate(self.manifest["shards"]):
            path, name = self._shard_file(index)
            with open_shard(path, name) as parquet:
                if parquet.metadata.num_rows != shard["records"]:
                    raise CacheError(
                        f"{name} holds {parquet.metadata.num_rows} records but manifest.json records {shard['records']}"
                    )
                for row_group in range(parquet.metadata.num_row_groups):
                    mine = unit % world_size == rank
                    unit += 1
                    if not mine:
                        continue
                    rows = parquet.metadata.row_group(row_group).num_rows
                    if consumed + rows <= start:
                        consumed += rows
                        continue
                    skip = max(start - consumed, 0)  # rows of this row group consumed before
                    for batch in iter_row_group(parquet, name, row_group, read_columns):
                        dropped = min(skip, batch.num_rows)
                        skip -= dropped
                        consumed += dropped
                        for record in self._decode(batch.slice(dropped), name, row_group):
                            consumed += 1
                            record.cursor = consumed
                            yield record

    def _decode(self, batch, name: str, row_group: int) -> list[DistillRecord]:
        try:
            return [DistillRecord.from_row(row, self.top_k) for row in batch_rows(batch)]
        except ValueError as err:
            raise CacheError(f"{name}: row group {row_group} holds a malformed record: {err}") from None

    def verify(self) -> list[str]:
        """Every problem found by hashing and reading all shards; empty when the cache is sound."""
        return verify_shards(self.path, self.manifest)

    def stats(self) -> list[dict]:
        """One summary per shard, then one named "total" (see store/stats.py for the fields)."""
        rows, total = [], None
        for index, shard in enumerate(self.manifest["shards"]):
            path, name = self._shard_file(index)
            sums = shard_sums(path, name, self.top_k)
            rows.append(summarize(shard["name"], sums, shard["bytes"]))
            total = sums if total is None else total + sums
        rows.append(summarize("total", total, self.manifest["totals"]["bytes"]))
        return rows

    def rejects(self) -> Iterator[dict]:
        """Every rejected input record, shard by shard: {"index", "sample_id", "line", "reason"}."""
        for index in range(self.manifest["num_shards"]):
            path = shard_paths(self.path, index, self.manifest["num_shards"])[1]
            name = relative_name(self.path, path)
            try:
                with open(path, encoding="utf-8") as f:
                    lines = list(enumerate(f, start=1))
            except FileNotFoundError:
                raise CacheError(f"{name} is missing; {self._redo_hint(index)}") from None
            for line_number, line in lines:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise CacheError(f"{name} line {line_number} is not JSON: {err}") from None


def _read_columns(columns: list[str] | None) -> list[str] | None:
    """Columns to read in schema order: sample_id always, the two image columns together."""
    if columns is None:
        return None
    unknown = sorted(set(columns) - set(DISTILL_SCHEMA.names))
    if unknown:
        raise ValueError(f"unknown columns {unknown}; DISTILL_SCHEMA has {DISTILL_SCHEMA.names}")
    wanted = {"sample_id", *columns}
    if wanted & {"image_path", "image_sha256"}:
        wanted |= {"image_path", "image_sha256"}
    return [name for name in DISTILL_SCHEMA.names if name in wanted]
