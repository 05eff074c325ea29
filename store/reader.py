"""`python -c "from modkd.store import Cache; print(Cache.open('cache/').num_records)"`: open and stream a cache.

    cache = Cache.open("cache/")
    for rec in cache.records(rank=r, world_size=w, start=n):   # streaming, split over ranks, resumable
        ...
    for pref in cache.preference_records(rank=r, world_size=w, start=n):   # the same for preference pairs
        ...

A cache holds distillation records (manifest.json, shards/), preference records (preference/), or both;
`cache.manifest` / `cache.preference_manifest` is None for a part it lacks, and reading a missing part
raises a CacheError that says how to extract it.

Splitting: the unit is one (shard, row group), numbered in manifest shard order, or permuted by
`order_seed` (a trainer gives one per epoch, so a cache written from a data file sorted by source
does not train source by source); rank r reads the i-th unit of that order when i % world_size == r.
The union over ranks is every record, each exactly once, and a rank's order is fixed by the seed.
`start` is the number of records this rank already consumed in that order (the `cursor` of the last
record it saw): whole row groups are skipped from their metadata, then rows.

Both shard formats read through this API: Parquet (a unit is a row group, listed from the footers) and
WebDataset tars (a unit is a chunk of row_group_size samples, listed in the manifest with its byte
offset, so reading one is one seek; store/webdataset.py). The same records written with the same
row_group_size give the same units, hence the same records in the same order for every rank and seed.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

from .encoding import Encoding
from .layout import PREFERENCE_SUBDIR, SHARDS_SUBDIR, CacheError, manifest_path, relative_name, shard_paths
from .manifest import has_part, load_manifest, shard_format
from .records import DistillRecord, PreferenceRecord
from .schema import DISTILL_SCHEMA, PREFERENCE_SCHEMA
from .shard_file import batch_rows, iter_row_group, open_shard
from .stats import shard_sums, summarize
from .verify import verify_shards
from .webdataset import IMAGE_DATA, read_unit

PARTS = {SHARDS_SUBDIR: DISTILL_SCHEMA, PREFERENCE_SUBDIR: PREFERENCE_SCHEMA}
DISTRIBUTION_COLUMNS = ("num_ids", "ids", "values", "top_logprobs", "tail_mass")


class Cache:
    def __init__(self, path: Path, manifests: dict[str, dict]) -> None:
        self.path = path
        self.manifests = manifests  # subdir -> manifest of each part present
        self.manifest: dict | None = manifests.get(SHARDS_SUBDIR)  # distillation records
        self.preference_manifest: dict | None = manifests.get(PREFERENCE_SUBDIR)
        # how the distributions are stored (store/encoding.py); load_manifest checked that this modkd decodes it
        self.encoding: Encoding | None = Encoding.from_settings(self.manifest["settings"]) if self.manifest else None
        self.top_k: int | None = self.encoding.k if self.encoding and self.encoding.name == "topk" else None
        self.num_records: int = self.manifest["totals"]["records_written"] if self.manifest else 0
        self.num_preference_records: int = (self.preference_manifest["totals"]["records_written"]
                                            if self.preference_manifest else 0)
        self._units: dict[str, list[tuple[int, int, int]]] = {}  # subdir -> units(), read on first use

    @classmethod
    def open(cls, path: Path | str) -> Cache:
        """Load each part's manifest and check that every shard file exists with its recorded size (no hashing)."""
        path = Path(path)
        present = [subdir for subdir in PARTS if has_part(path, subdir)] or [SHARDS_SUBDIR]  # none: say why
        cache = cls(path, {subdir: load_manifest(path, subdir) for subdir in present})
        for subdir, manifest in cache.manifests.items():
            for index, shard in enumerate(manifest["shards"]):
                parquet, name = cache._shard_file(index, subdir)
                if not parquet.is_file():
                    raise CacheError(f"{name} is listed in {_manifest_name(subdir)} but missing; "
                                     f"{cache._redo_hint(index, subdir)}")
                size = parquet.stat().st_size
                if size != shard["bytes"]:
                    raise CacheError(
                        f"{name} has {size} bytes but {_manifest_name(subdir)} records {shard['bytes']} (truncated or modified); "
                        f"{cache._redo_hint(index, subdir)}"
                    )
        return cache

    def format(self, subdir: str = SHARDS_SUBDIR) -> str:
        """How a part's shards are stored: "parquet" or "webdataset" (manifest settings.format)."""
        return shard_format(self.manifests[subdir])

    def _shard_file(self, index: int, subdir: str = SHARDS_SUBDIR) -> tuple[Path, str]:
        """(path, name for messages) of shard `index`'s file (.parquet or .tar)."""
        manifest = self.manifests[subdir]
        path = shard_paths(self.path, index, manifest["num_shards"], subdir, shard_format(manifest))[0]
        return path, relative_name(self.path, path)

    def _redo_hint(self, index: int, subdir: str = SHARDS_SUBDIR) -> str:
        done = shard_paths(self.path, index, self.manifests[subdir]["num_shards"], subdir)[2]
        return (f"delete {relative_name(self.path, done)} and {_manifest_name(subdir)}, "
                "then rerun mod-extract with the same arguments")

    def records(
        self, rank: int = 0, world_size: int = 1, start: int = 0, columns: list[str] | None = None,
        order_seed: int | str | None = None,
    ) -> Iterator[DistillRecord]:
        """Stream this rank's records from record `start` on; `columns` reads a subset (other fields are None);
        `order_seed` permutes the (shard, row group) units before they are split over ranks."""
        if self.manifest is None:
            raise CacheError(f"{self.path} holds no distillation records, only preference records; run mod-extract "
                             f"on a LLaVA-format data file with --out {self.path} to add them")
        decode = lambda row: DistillRecord.from_row(row, self.encoding)  # noqa: E731
        return self._stream(SHARDS_SUBDIR, decode, rank, world_size, start, _read_columns(columns), order_seed)

    def preference_records(self, rank: int = 0, world_size: int = 1, start: int = 0,
                           order_seed: int | str | None = None) -> Iterator[PreferenceRecord]:
        """Stream this rank's preference pairs from record `start` on (split, ordered and resumed as `records`)."""
        if self.preference_manifest is None:
            raise CacheError(f"{self.path} holds no preference records; run mod-extract on a preference file "
                             f"(records with \"chosen\" and \"rejected\") with --out {self.path} to add them")
        return self._stream(PREFERENCE_SUBDIR, PreferenceRecord.from_row, rank, world_size, start, None, order_seed)

    def shard_records(self, index: int, subdir: str = SHARDS_SUBDIR) -> Iterator:
        """Every record (or preference pair) of shard `index` in file order, unit by unit (mod-store convert)."""
        decode = PreferenceRecord.from_row if subdir == PREFERENCE_SUBDIR else (
            lambda row: DistillRecord.from_row(row, self.encoding))
        for shard, unit, _ in self.units(subdir):
            if shard == index:
                yield from self._read_unit(subdir, index, unit, 0, None, decode)

    def units(self, subdir: str = SHARDS_SUBDIR) -> list[tuple[int, int, int]]:
        """Every (shard index, row group, rows) of a part in manifest order, from the shards' footers (read once);
        for WebDataset shards (shard index, chunk, rows) from the manifest."""
        if subdir not in self._units:
            units = []
            for index, shard in enumerate(self.manifests[subdir]["shards"]):
                path, name = self._shard_file(index, subdir)
                if "units" in shard:  # WebDataset: load_manifest checked that every shard entry lists them
                    if sum(rows for rows, _, _ in shard["units"]) != shard["records"]:
                        raise CacheError(f"{name}: the units in {_manifest_name(subdir)} do not add up to its "
                                         f"{shard['records']} records")
                    units += [(index, chunk, rows) for chunk, (rows, _, _) in enumerate(shard["units"])]
                    continue
                with open_shard(path, name, PARTS[subdir]) as parquet:
                    if parquet.metadata.num_rows != shard["records"]:
                        raise CacheError(f"{name} holds {parquet.metadata.num_rows} records but "
                                         f"{_manifest_name(subdir)} records {shard['records']}")
                    units += [(index, g, parquet.metadata.row_group(g).num_rows)
                              for g in range(parquet.metadata.num_row_groups)]
            self._units[subdir] = units
        return self._units[subdir]

    def _stream(self, subdir: str, decode: Callable, rank: int, world_size: int, start: int,
                read_columns: list[str] | None, order_seed: int | str | None) -> Iterator:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        units = list(self.units(subdir))
        if order_seed is not None:
            random.Random(order_seed).shuffle(units)
        consumed = 0  # records of this rank in the units before the current one
        for index, row_group, rows in units[rank::world_size]:
            if consumed + rows <= start:
                consumed += rows
                continue
            skip = max(start - consumed, 0)  # rows of this unit consumed before
            consumed += skip
            for record in self._read_unit(subdir, index, row_group, skip, read_columns, decode):
                consumed += 1
                record.cursor = consumed
                yield record

    def _read_unit(self, subdir: str, index: int, unit: int, skip: int, read_columns: list[str] | None,
                   decode: Callable) -> Iterator:
        """Decoded records of one unit from its `skip`-th row on, batch by batch."""
        path, name = self._shard_file(index, subdir)
        shard = self.manifests[subdir]["shards"][index]
        if "units" in shard:
            rows = read_unit(path, name, shard["units"][unit], PARTS[subdir], read_columns, skip)
            yield from self._decode(lambda: rows, name, unit, decode)
            return
        with open_shard(path, name, PARTS[subdir]) as parquet:
            for batch in iter_row_group(parquet, name, unit, read_columns):
                dropped = min(skip, batch.num_rows)
                skip -= dropped
                yield from self._decode(lambda: batch_rows(batch.slice(dropped)), name, unit, decode)

    def _decode(self, rows: Callable, name: str, row_group: int, decode: Callable) -> list:
        try:
            return [_with_image_data(decode(row), row) for row in rows()]
        except ValueError as err:
            raise CacheError(f"{name}: row group {row_group} holds a malformed record: {err}") from None

    def verify(self) -> list[str]:
        """Every problem found by hashing and reading all shards of every part; empty when the cache is sound."""
        return [problem for subdir, manifest in self.manifests.items()
                for problem in verify_shards(self.path, manifest, subdir)]

    def stats(self) -> list[dict]:
        """One summary per distillation shard, then one named "total" (see store/stats.py for the fields)."""
        if self.manifest is None:
            return []
        rows, total = [], None
        for index, shard in enumerate(self.manifest["shards"]):
            path, name = self._shard_file(index)
            sums = shard_sums(path, name, self.encoding, shard)
            rows.append(summarize(shard["name"], sums, shard["bytes"], self.encoding))
            total = sums if total is None else total + sums
        rows.append(summarize("total", total, self.manifest["totals"]["bytes"], self.encoding))
        return rows

    def rejects(self, subdir: str = SHARDS_SUBDIR) -> Iterator[dict]:
        """Every rejected input record of a part, shard by shard: {"index", "sample_id", "line", "kind", "reason"}."""
        num_shards = self.manifests[subdir]["num_shards"] if subdir in self.manifests else 0
        for index in range(num_shards):
            path = shard_paths(self.path, index, num_shards, subdir)[1]
            name = relative_name(self.path, path)
            try:
                with open(path, encoding="utf-8") as f:
                    lines = list(enumerate(f, start=1))
            except FileNotFoundError:
                raise CacheError(f"{name} is missing; {self._redo_hint(index, subdir)}") from None
            for line_number, line in lines:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise CacheError(f"{name} line {line_number} is not JSON: {err}") from None


def _with_image_data(record, row: dict):
    """The record, its ImageRef carrying the image bytes a WebDataset shard embeds (student ImageLoader uses them)."""
    data = row.get(IMAGE_DATA)
    if data is not None and record.image is not None:
        record.image = dataclasses.replace(record.image, data=data)
    return record


def _manifest_name(subdir: str) -> str:
    return relative_name(Path("."), manifest_path(".", subdir))


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
    if wanted & set(DISTRIBUTION_COLUMNS):  # decoding the distribution needs all of them and P
        wanted |= {*DISTRIBUTION_COLUMNS, "positions"}
    return [name for name in DISTILL_SCHEMA.names if name in wanted]
