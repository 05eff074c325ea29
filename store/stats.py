"""`mod-store inspect cache/`: per-shard size and teacher-distribution summaries.

For each shard and in total: records, positions, bytes, bytes per position, positions per kind,
mean top-k mass (mean over positions of sum_i exp(topk_logprobs_i): the share of the teacher's
probability the cache keeps) and mean top-k entropy (mean over positions of -sum_i p_i log p_i over
the stored top-k only). The top-k entropy is a lower bound on the teacher's entropy: it leaves out
the tail's terms, each of which is >= 0. Means are None for a shard without positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import CacheError
from .schema import POSITION_KINDS
from .schema import DISTILL_SCHEMA
from .shard_file import list_column, shard_batches

STATS_COLUMNS = ["position_kinds", "topk_logprobs"]


@dataclass
class Sums:
    records: int = 0
    positions: int = 0
    topk_mass: float = 0.0  # summed over positions
    topk_entropy: float = 0.0  # summed over positions
    kinds: dict[str, int] = field(default_factory=lambda: dict.fromkeys(POSITION_KINDS, 0))

    def __add__(self, other: Sums) -> Sums:
        return Sums(
            records=self.records + other.records,
            positions=self.positions + other.positions,
            topk_mass=self.topk_mass + other.topk_mass,
            topk_entropy=self.topk_entropy + other.topk_entropy,
            kinds={kind: self.kinds[kind] + other.kinds[kind] for kind in POSITION_KINDS},
        )


def shard_sums(path: Path, name: str, k: int, shard: dict) -> Sums:
    """Stream one shard's position kinds and top-k log-probs, unit by unit (`shard`: its manifest entry)."""
    sums = Sums()
    for row_group, batch, _ in shard_batches(path, name, DISTILL_SCHEMA, shard, STATS_COLUMNS):
        try:
            _, kinds = list_column(batch.column("position_kinds"))  # (P,) int8
            _, logprobs = list_column(batch.column("topk_logprobs"))  # (P * k,) float32
        except ValueError as err:
            raise CacheError(f"{name}: row group {row_group}: {err}") from None
        if logprobs.shape[0] != kinds.shape[0] * k:
            raise CacheError(f"{name}: row group {row_group} has {logprobs.shape[0]} top-k values for "
                             f"{kinds.shape[0]} positions and k={k}; run mod-store verify")
        logprobs = logprobs.reshape(-1, k).astype(np.float64)  # (P, k) float64
        probs = np.exp(logprobs)  # (P, k) float64
        plogp = probs * np.where(probs > 0, logprobs, 0.0)  # (P, k) float64; 0 log 0 = 0, not NaN
        sums.records += batch.num_rows
        sums.positions += kinds.shape[0]
        sums.topk_mass += float(probs.sum())
        sums.topk_entropy += float(-plogp.sum())
        for kind, code in POSITION_KINDS.items():
            sums.kinds[kind] += int(np.count_nonzero(kinds == code))
    return sums


def summarize(name: str, sums: Sums, num_bytes: int) -> dict:
    """The reported row: counts, bytes per position and per-position means (None without positions)."""
    def per_position(value: float) -> float | None:
        return value / sums.positions if sums.positions else None

    return {
        "name": name,
        "records": sums.records,
        "positions": sums.positions,
        "bytes": num_bytes,
        "bytes_per_position": per_position(num_bytes),
        "mean_topk_mass": per_position(sums.topk_mass),
        "mean_topk_entropy": per_position(sums.topk_entropy),
        "positions_by_kind": dict(sums.kinds),
    }
