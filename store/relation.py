"""python -c "from modkd.store.relation import encode_relation, decode_relation; help(encode_relation)"

LLaVA-KD's relation matrices (RDist, Eq. 4) in the cache: one symmetric (N_p, N_p) matrix per record,
N_p = the record's image-token positions in input_ids order, stored as its upper triangle (diagonal
included, row-major, N_p (N_p + 1) / 2 values) in float16 after dividing by its Frobenius norm.

Why the division: L_rel = 1 - cos(R_s, R_t) (Eq. 5) is invariant to a positive scale of R_t, and raw
logit Gram entries reach V x logit^2 (~1e7 for a 152k vocabulary), far beyond float16's 65504; unit-norm
entries are at most 1 and keep float16's ~1e-3 relative precision. Size: N_p (N_p + 1) bytes per record
(729 image tokens: 532 kB before zstd; the toy's 9: 90 B). An empty column means no matrix (text-only
record, or a cache extracted without `--relation`; the manifest's settings.relation says which).
"""

from __future__ import annotations

import numpy as np

RELATION_FORMS = ("none", "logits", "embeddings")  # manifest settings.relation; see extract --relation


def triangle_size(n: int) -> int:
    return n * (n + 1) // 2


def triangle_side(values: int) -> int:
    """n of an upper triangle holding `values` = n (n + 1) / 2 entries; ValueError if no n fits."""
    n = int(round((np.sqrt(8 * values + 1) - 1) / 2))
    if triangle_size(n) != values:
        raise ValueError(f"relation column holds {values} values, not a triangle n (n + 1) / 2")
    return n


def encode_relation(matrix: np.ndarray) -> bytes:
    """(n, n) symmetric float matrix -> bytes of its unit-Frobenius-norm upper triangle in float16."""
    m = np.asarray(matrix, dtype=np.float64)  # (n, n)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"a relation matrix must be square, got shape {m.shape}")
    norm = np.linalg.norm(m)
    if not np.isfinite(norm):
        raise ValueError("relation matrix holds non-finite values")
    unit = m / norm if norm > 0 else m
    return unit[np.triu_indices(m.shape[0])].astype("<f2").tobytes()


def decode_relation(data: bytes) -> np.ndarray | None:
    """bytes of encode_relation -> the full symmetric (n, n) float32 matrix; None for empty bytes."""
    if not data:
        return None
    tri = np.frombuffer(data, dtype="<f2").astype(np.float32)  # (n (n + 1) / 2,)
    n = triangle_side(tri.size)
    m = np.zeros((n, n), dtype=np.float32)  # (n, n)
    rows, cols = np.triu_indices(n)
    m[rows, cols] = tri
    m[cols, rows] = tri
    return m
