"""`python -c "from modkd.store.encoding import Encoding; help(Encoding)"`: how a cache stores each distribution.

`mod-extract --encoding topk|sampled` picks one per cache (manifest `settings.encoding`); `Cache.open`
decodes either, so a trainer only ever sees `rec.target_ids` / `rec.target_probs`.

topk (`--top-k K`, the default): the teacher's K most likely tokens at each position.
    ids        K per position in rank order, bit-packed at ceil(log2 V) bits (V = the tokenizer's vocabulary:
               16 bits for SmolLM2's 49,152, 18 for Qwen's 151,646)
    log-probs  the top-1's as float32 (`top_logprobs`), the other K - 1 as offsets below it, rounded to
               LOGPROB_STEP = 1/128 nat and stored in LOGPROB_BITS = 12 bits (offsets up to 4095/128 = 32 nats;
               a larger one is clamped, which moves a probability below e^-32 of the top-1's). Decoding error:
               |decoded - true log-prob| <= LOGPROB_STEP / 2 = 1/256 nat (+ float32 rounding), so every decoded
               probability is within 0.4% of the teacher's, relative.
    tail       the mass outside the top-K, 1 - sum(top-K), float32 (`tail_mass`): the tail-bucket estimator's
               extra bucket.
sampled (`--samples N`, Random-Sampling KD, Anshumann et al. ACL 2025): N draws from the teacher's
    full-vocabulary distribution at temperature 1, stored as the unique ids (ascending, bit-packed at
    ceil(log2 V) bits) and their counts (count - 1 in ceil(log2 N) bits; a position's counts sum to N, so
    rows need no lengths). counts / N is an unbiased estimate of the distribution, where renormalised top-k
    is biased toward the head (DESIGN section 3). The draws of position t of record `sample_id` are the
    inverse-CDF images of `sample_uniforms(seed, sample_id, ...)[t]`: fixed by (seed, sample_id, t, N) alone,
    so reruns, shard counts and position modes never change them.

Both keep the teacher's log-prob of the token that actually follows (`target_logprobs`, float32).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

ENCODINGS = ("topk", "sampled")
LOGPROB_BITS = 12  # offsets below the top-1 up to 32 nats: a probability e^-32 of the top-1's is noise to any student
LOGPROB_STEP = 1.0 / 128  # half a step = 1/256 nat: 0.4% relative error per probability, far below top-k's own bias
MAX_LOGPROB_CODE = (1 << LOGPROB_BITS) - 1


@dataclass(frozen=True)
class Encoding:
    """One cache's encoding: name, the vocabulary its ids index, and K (topk) or N and the seed (sampled)."""

    name: str  # "topk" | "sampled"
    vocab: int  # the tokenizer's vocabulary: every stored id is < vocab
    k: int = 0  # topk: ids per position
    samples: int = 0  # sampled: draws per position
    seed: int = 0  # sampled: draws are fixed by (seed, sample_id, position)

    def __post_init__(self) -> None:
        if self.name not in ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {self.name!r}")
        if self.vocab < 1:
            raise ValueError(f"the vocabulary size must be positive, got {self.vocab}")
        if self.name == "topk" and not 1 <= self.k <= self.vocab:
            raise ValueError(f"--top-k {self.k} must be between 1 and the vocabulary size {self.vocab}")
        if self.name == "sampled" and self.samples < 1:
            raise ValueError(f"--samples must be at least 1, got {self.samples}")

    @property
    def id_bits(self) -> int:
        return max(1, (self.vocab - 1).bit_length())  # ceil(log2 V)

    @property
    def count_bits(self) -> int:
        return (self.samples - 1).bit_length()  # count - 1 in [0, N - 1]; 0 bits when N = 1

    def settings(self) -> dict:
        """The manifest's description (settings): enough to decode, and the constants it was written with."""
        if self.name == "topk":
            return {"encoding": "topk", "vocab": self.vocab, "top_k": self.k, "id_bits": self.id_bits,
                    "logprob_bits": LOGPROB_BITS, "logprob_step": LOGPROB_STEP}
        return {"encoding": "sampled", "vocab": self.vocab, "samples": self.samples, "sample_seed": self.seed,
                "id_bits": self.id_bits, "count_bits": self.count_bits}

    @classmethod
    def from_settings(cls, settings: dict) -> Encoding:
        """The encoding a manifest's settings describe; ValueError names what this modkd cannot decode."""
        name, vocab = settings.get("encoding"), settings.get("vocab")
        if not isinstance(vocab, int):
            raise ValueError(f"settings.vocab must be the tokenizer's vocabulary size, got {vocab!r}")
        if name == "topk":
            enc = cls("topk", vocab, k=settings.get("top_k", 0))
        elif name == "sampled":
            enc = cls("sampled", vocab, samples=settings.get("samples", 0), seed=settings.get("sample_seed", 0))
        else:
            raise ValueError(f"settings.encoding {name!r} is not one of {', '.join(ENCODINGS)}")
        expected = enc.settings()
        differ = sorted(key for key in expected if settings.get(key) != expected[key])
        if differ:
            raise ValueError(f"settings {', '.join(f'{k}={settings.get(k)!r}' for k in differ)} differ from this "
                             f"modkd's {', '.join(f'{k}={expected[k]!r}' for k in differ)} for a {name} cache over "
                             f"{vocab} tokens")
        return enc

    def describe(self) -> str:
        return f"top-{self.k}" if self.name == "topk" else f"sampled N={self.samples}"


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Non-negative integers < 2**bits (bits <= 32), little-endian bit order, ceil(n * bits / 8) bytes."""
    values = np.asarray(values, dtype=np.int64).reshape(-1)  # (n,)
    if values.size and (values.min() < 0 or values.max() >> bits):
        raise ValueError(f"values must lie in [0, 2**{bits}), got [{values.min()}, {values.max()}]")
    if bits == 0 or values.size == 0:
        return b""
    shifts = np.arange(bits, dtype=np.int64)  # (bits,)
    bit_matrix = ((values[:, None] >> shifts) & 1).astype(np.uint8)  # (n, bits), least significant bit first
    return np.packbits(bit_matrix.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, n: int) -> np.ndarray:
    """The n values `pack_bits` wrote, as int64; ValueError if `data` is not exactly their size."""
    if len(data) != (n * bits + 7) // 8:
        raise ValueError(f"{len(data)} bytes cannot hold exactly {n} values of {bits} bits")
    if bits == 0 or n == 0:
        return np.zeros(n, dtype=np.int64)
    bit_matrix = np.zeros((n, 32), dtype=np.uint8)  # (n, 32): each value's bits widened to a little-endian uint32
    bits_in = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little", count=n * bits)  # (n * bits,)
    bit_matrix[:, :bits] = bits_in.reshape(n, bits)
    return np.packbits(bit_matrix, axis=1, bitorder="little").view("<u4").reshape(n).astype(np.int64)


def quantise_logprobs(logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(P, K) float32 log-probs in rank order -> top-1's (P,) float32 and codes (P, K - 1) of the others."""
    top = logprobs[:, 0].astype(np.float32)  # (P,)
    offsets = (top[:, None].astype(np.float64) - logprobs[:, 1:]) / LOGPROB_STEP  # (P, K - 1) >= 0 in rank order
    return top, np.clip(np.rint(offsets), 0, MAX_LOGPROB_CODE).astype(np.int64)


def dequantise_logprobs(top: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Inverse of `quantise_logprobs` to within LOGPROB_STEP / 2: (P, K) float32."""
    rest = top[:, None].astype(np.float64) - codes * LOGPROB_STEP  # (P, K - 1)
    return np.concatenate([top[:, None], rest], axis=1).astype(np.float32)


def tail_mass(logprobs: np.ndarray) -> np.ndarray:
    """1 - sum(top-k) (P,) float32 from exact (not decoded) log-probs, summed in float64, never below 0."""
    return np.clip(1.0 - np.exp(logprobs.astype(np.float64)).sum(axis=1), 0.0, 1.0).astype(np.float32)


def sample_uniforms(seed: int, sample_id: str, positions: np.ndarray, n: int) -> np.ndarray:
    """(P, n) float64 in [0, 1): the uniforms behind position t's n draws, fixed by (seed, sample_id, t, n).

    Row t of a (max t + 1, n) Philox stream keyed by a hash of (seed, sample_id): any subset of positions,
    in any batch or shard, sees the same numbers."""
    positions = np.asarray(positions, dtype=np.int64)  # (P,)
    if positions.size == 0:
        return np.zeros((0, n))
    key = int.from_bytes(hashlib.sha256(f"{seed}\0{sample_id}".encode()).digest()[:16], "little")
    stream = np.random.Generator(np.random.Philox(key=key)).random((int(positions.max()) + 1, n))  # (T', n)
    return stream[positions]


def draws_to_counts(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(P, N) drawn ids -> unique ids (P, n) int32 ascending and their counts (P, n) int32, zero-padded to the
    largest number n of distinct ids in a row (padding: id 0 with count 0)."""
    P, N = draws.shape
    keys = np.arange(P, dtype=np.int64)[:, None] * (int(draws.max(initial=0)) + 1) + draws  # (P, N) row-major order
    unique, counts = np.unique(keys, return_counts=True)  # (m,) sorted: by row, then by id
    width = int(draws.max(initial=0)) + 1
    rows, ids = unique // width, unique % width  # (m,)
    return _pad_rows(rows, ids, counts, P)


def _pad_rows(rows: np.ndarray, ids: np.ndarray, counts: np.ndarray, P: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat (row, id, count) triples, rows ascending -> zero-padded (P, n) id and count arrays."""
    per_row = np.bincount(rows, minlength=P)  # (P,)
    n = int(per_row.max(initial=0))
    col = np.arange(rows.size) - np.repeat(np.cumsum(per_row) - per_row, per_row)  # (m,) index within its row
    out_ids, out_counts = np.zeros((P, n), np.int32), np.zeros((P, n), np.int32)
    out_ids[rows, col], out_counts[rows, col] = ids, counts
    return out_ids, out_counts


def encode_topk(enc: Encoding, ids: np.ndarray, logprobs: np.ndarray) -> tuple[int, bytes, bytes, np.ndarray]:
    """(P, K) ids and log-probs -> (number of ids, packed ids, packed log-prob codes, top-1 log-probs (P,))."""
    top, codes = quantise_logprobs(logprobs)
    return ids.size, pack_bits(ids, enc.id_bits), pack_bits(codes, LOGPROB_BITS), top


def decode_topk(enc: Encoding, num_ids: int, ids: bytes, codes: bytes,
                top: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `encode_topk`: (P, K) int32 ids and (P, K) float32 log-probs."""
    P, K = top.shape[0], enc.k
    if num_ids != P * K:
        raise ValueError(f"{num_ids} ids stored for {P} positions of top-{K}")
    id_array = unpack_bits(ids, enc.id_bits, P * K).reshape(P, K)
    code_array = unpack_bits(codes, LOGPROB_BITS, P * (K - 1)).reshape(P, K - 1)
    if id_array.size and id_array.max() >= enc.vocab:
        raise ValueError(f"an id {id_array.max()} is >= the vocabulary size {enc.vocab}")
    return id_array.astype(np.int32), dequantise_logprobs(top, code_array)


def encode_sampled(enc: Encoding, ids: np.ndarray, counts: np.ndarray) -> tuple[int, bytes, bytes]:
    """Zero-padded (P, n) unique ids and counts -> (number of ids, packed ids, packed counts - 1)."""
    real = counts > 0  # (P, n)
    if (counts.sum(axis=1) != enc.samples).any():
        raise ValueError(f"every position's counts must sum to N = {enc.samples}")
    return int(real.sum()), pack_bits(ids[real], enc.id_bits), pack_bits(counts[real] - 1, enc.count_bits)


def decode_sampled(enc: Encoding, P: int, num_ids: int, ids: bytes, counts: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `encode_sampled`: zero-padded (P, n) int32 ids and counts."""
    id_flat = unpack_bits(ids, enc.id_bits, num_ids)  # (m,)
    count_flat = unpack_bits(counts, enc.count_bits, num_ids) + 1  # (m,)
    ends = np.cumsum(count_flat)  # (m,) a row ends where the running total reaches a multiple of N
    row_ends = np.flatnonzero(ends % enc.samples == 0)  # (P,) when well-formed
    if row_ends.size != P or (ends[row_ends] != enc.samples * np.arange(1, P + 1)).any() or (
            P and row_ends[-1] != num_ids - 1):
        raise ValueError(f"the stored counts do not split into {P} positions of N = {enc.samples} draws each")
    if id_flat.size and id_flat.max() >= enc.vocab:
        raise ValueError(f"an id {id_flat.max()} is >= the vocabulary size {enc.vocab}")
    rows = np.searchsorted(row_ends, np.arange(num_ids))  # (m,) the row of each stored id
    return _pad_rows(rows, id_flat, count_flat, P)
