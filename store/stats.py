"""`mod-store inspect cache/`: per-shard size and teacher-distribution summaries.

For each shard and in total: records, positions, bytes, bytes per position, positions per kind, mean
ids stored per position (k for topk, the distinct sampled ids for sampled) and, for topk caches, the
mean top-k mass (mean over positions of 1 - tail_mass: the share of the teacher's probability the cache
keeps) and mean top-k entropy (mean over positions of -sum_i p_i log p_i over the stored top-k only). The
top-k entropy is a lower bound on the teacher's entropy: it leaves out the tail's terms, each of which is
>= 0. Means are None for a shard without positions, and the top-k ones for a sampled cache.

LLaVA-KD's relation column (store/relation.py): the records holding a matrix, the smallest and largest N_p
among them, and the column's bytes per such record: as stored (fp16 upper triangle, N_p (N_p + 1) bytes,
before zstd; read from the raw bytes, no matrix is decoded) and on disk (Parquet shards: the column chunks'
compressed sizes from the footers; None for WebDataset shards). None without matrices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .encoding import Encoding
from .layout import CacheError
from .records import DistillRecord
from .relation import triangle_side
from .schema import DISTILL_SCHEMA, POSITION_KINDS
from .shard_file import batch_rows, open_shard, shard_batches

STATS_COLUMNS = ["sample_id", "positions", "position_kinds", "num_ids", "ids", "values", "top_logprobs", "tail_mass",
                 "relation"]


@dataclass
class Sums:
    records: int = 0
    positions: int = 0
    ids: int = 0  # summed over positions
    topk_mass: float = 0.0  # summed over positions
    topk_entropy: float = 0.0  # summed over positions
    kinds: dict[str, int] = field(default_factory=lambda: dict.fromkeys(POSITION_KINDS, 0))
    relations: int = 0  # records with a relation matrix
    relation_bytes: int = 0  # their relation column's bytes, summed
    relation_sizes: tuple[int, int] | None = None  # (smallest, largest) N_p
    relation_disk_bytes: int | None = 0  # the column's compressed bytes in the Parquet files; None: a WebDataset shard

    def __add__(self, other: Sums) -> Sums:
        return Sums(
            records=self.records + other.records,
            positions=self.positions + other.positions,
            ids=self.ids + other.ids,
            topk_mass=self.topk_mass + other.topk_mass,
            topk_entropy=self.topk_entropy + other.topk_entropy,
            kinds={kind: self.kinds[kind] + other.kinds[kind] for kind in POSITION_KINDS},
            relations=self.relations + other.relations,
            relation_bytes=self.relation_bytes + other.relation_bytes,
            relation_sizes=_span(self.relation_sizes, other.relation_sizes),
            relation_disk_bytes=None if None in (self.relation_disk_bytes, other.relation_disk_bytes)
            else self.relation_disk_bytes + other.relation_disk_bytes,
        )


def _span(a: tuple[int, int] | None, b: tuple[int, int] | None) -> tuple[int, int] | None:
    if a is None or b is None:
        return a or b
    return min(a[0], b[0]), max(a[1], b[1])


def shard_sums(path: Path, name: str, encoding: Encoding, shard: dict) -> Sums:
    """Stream one shard's position kinds and decoded distributions, unit by unit (`shard`: its manifest entry)."""
    sums = Sums(relation_disk_bytes=_parquet_column_bytes(path, name, "relation") if "units" not in shard else None)
    for row_group, batch, _ in shard_batches(path, name, DISTILL_SCHEMA, shard, STATS_COLUMNS):
        rows = batch_rows(batch)
        try:
            for row in rows:  # counted from the raw bytes, then dropped: from_row would decode every matrix
                raw = row.pop("relation", b"")
                if raw:
                    n = triangle_side(len(raw) // 2)  # fp16 values of an N_p (N_p + 1) / 2 triangle
                    sums.relations += 1
                    sums.relation_bytes += len(raw)
                    sums.relation_sizes = _span(sums.relation_sizes, (n, n))
            records = [DistillRecord.from_row(row, encoding) for row in rows]
        except ValueError as err:
            raise CacheError(f"{name}: row group {row_group}: {err}; run mod-store verify") from None
        for rec in records:
            sums.records += 1
            sums.positions += rec.positions.shape[0]
            sums.ids += int(np.count_nonzero(rec.target_probs > 0) if rec.sampled_counts is not None else rec.topk_ids.size)
            if rec.topk_logprobs is not None:
                logprobs = rec.topk_logprobs.astype(np.float64)  # (P, k)
                probs = np.exp(logprobs)  # (P, k)
                sums.topk_mass += float((1.0 - rec.tail_mass.astype(np.float64)).sum())
                sums.topk_entropy += float(-(probs * np.where(probs > 0, logprobs, 0.0)).sum())  # 0 log 0 = 0
            for kind, code in POSITION_KINDS.items():
                sums.kinds[kind] += int(np.count_nonzero(rec.position_kinds == code))
    return sums


def _parquet_column_bytes(path: Path, name: str, column: str) -> int:
    """Compressed bytes of one column over a Parquet shard's row groups (its footer only)."""
    with open_shard(path, name, DISTILL_SCHEMA) as parquet:
        meta = parquet.metadata
        index = parquet.schema_arrow.get_field_index(column)
        return sum(meta.row_group(g).column(index).total_compressed_size for g in range(meta.num_row_groups))


def summarize(name: str, sums: Sums, num_bytes: int, encoding: Encoding) -> dict:
    """The reported row: counts, bytes per position and per-position means (None without positions)."""
    def per_position(value: float, applies: bool = True) -> float | None:
        return value / sums.positions if sums.positions and applies else None

    topk = encoding.name == "topk"
    return {
        "name": name,
        "records": sums.records,
        "positions": sums.positions,
        "bytes": num_bytes,
        "bytes_per_position": per_position(num_bytes),
        "mean_ids": per_position(sums.ids),
        "mean_topk_mass": per_position(sums.topk_mass, topk),
        "mean_topk_entropy": per_position(sums.topk_entropy, topk),
        "positions_by_kind": dict(sums.kinds),
        "relation_records": sums.relations,
        "relation_n_p": None if sums.relation_sizes is None else list(sums.relation_sizes),  # [smallest, largest]
        "relation_bytes_per_record": sums.relation_bytes / sums.relations if sums.relations else None,
        "relation_disk_bytes_per_record": (sums.relation_disk_bytes / sums.relations  # zstd Parquet; None for WebDataset
                                           if sums.relations and sums.relation_disk_bytes is not None else None),
    }
