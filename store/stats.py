"""`mod-store inspect cache/`: per-shard size and teacher-distribution summaries.

For each shard and in total: records, positions, bytes, bytes per position, positions per kind, mean
ids stored per position (k for topk, the distinct sampled ids for sampled) and, for topk caches, the
mean top-k mass (mean over positions of 1 - tail_mass: the share of the teacher's probability the cache
keeps) and mean top-k entropy (mean over positions of -sum_i p_i log p_i over the stored top-k only). The
top-k entropy is a lower bound on the teacher's entropy: it leaves out the tail's terms, each of which is
>= 0. Means are None for a shard without positions, and the top-k ones for a sampled cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .encoding import Encoding
from .layout import CacheError
from .records import DistillRecord
from .schema import DISTILL_SCHEMA, POSITION_KINDS
from .shard_file import batch_rows, shard_batches

STATS_COLUMNS = ["sample_id", "positions", "position_kinds", "num_ids", "ids", "values", "top_logprobs", "tail_mass"]


@dataclass
class Sums:
    records: int = 0
    positions: int = 0
    ids: int = 0  # summed over positions
    topk_mass: float = 0.0  # summed over positions
    topk_entropy: float = 0.0  # summed over positions
    kinds: dict[str, int] = field(default_factory=lambda: dict.fromkeys(POSITION_KINDS, 0))

    def __add__(self, other: Sums) -> Sums:
        return Sums(
            records=self.records + other.records,
            positions=self.positions + other.positions,
            ids=self.ids + other.ids,
            topk_mass=self.topk_mass + other.topk_mass,
            topk_entropy=self.topk_entropy + other.topk_entropy,
            kinds={kind: self.kinds[kind] + other.kinds[kind] for kind in POSITION_KINDS},
        )


def shard_sums(path: Path, name: str, encoding: Encoding, shard: dict) -> Sums:
    """Stream one shard's position kinds and decoded distributions, unit by unit (`shard`: its manifest entry)."""
    sums = Sums()
    for row_group, batch, _ in shard_batches(path, name, DISTILL_SCHEMA, shard, STATS_COLUMNS):
        try:
            records = [DistillRecord.from_row(row, encoding) for row in batch_rows(batch)]
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
    }
