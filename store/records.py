"""`python -c "from modkd.store import DistillRecord, PreferenceRecord"`: decoded cache records and their Arrow row form.

A record holds numpy arrays with fixed dtypes; `to_row()` encodes it into a dict keyed by the
columns of DISTILL_SCHEMA (its distribution as the record's `encoding` says, store/encoding.py) and
`from_row(row, encoding)` decodes it. Both check shapes and dtypes and raise
a ValueError naming the record and the field. Records read with `Cache.records(columns=...)` carry
None in every field whose column was not read. `PreferenceRecord` is the same for PREFERENCE_SCHEMA
(always read whole).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .encoding import Encoding, decode_sampled, decode_topk, encode_sampled, encode_topk
from .relation import decode_relation, encode_relation
from .schema import POSITION_KINDS, PREFERENCE_SCHEMA


@dataclass(frozen=True)
class ImageRef:
    path: str  # posix path relative to the image root
    sha256: str  # hex digest of the image file's bytes
    # the image file's bytes when the cache embeds them (WebDataset --embed-images); not part of equality
    data: bytes | None = field(default=None, compare=False, repr=False)


@dataclass
class DistillRecord:
    """One record's stored positions and the teacher's distribution at each, in the cache's `encoding`:
    topk fills topk_ids / topk_logprobs / tail_mass, sampled fills sampled_ids / sampled_counts (the others
    are None). `target_ids` / `target_probs` give either as the sparse distribution a loss distils toward."""

    sample_id: str
    input_ids: np.ndarray  # (T,) int32, image placeholders expanded
    positions: np.ndarray  # (P,) int32, position t predicts input_ids[t + 1]
    position_kinds: np.ndarray  # (P,) int8, values of POSITION_KINDS
    target_logprobs: np.ndarray  # (P,) float32, teacher log-prob of input_ids[t + 1]
    image: ImageRef | None
    num_image_tokens: int  # 0 for text-only records
    encoding: Encoding | None = None  # how to_row stores the distribution (set by the extractor and by Cache)
    topk_ids: np.ndarray | None = None  # (P, k) int32, rank order
    topk_logprobs: np.ndarray | None = None  # (P, k) float32, normalised over the full vocabulary
    tail_mass: np.ndarray | None = None  # (P,) float32, 1 - sum(top-k)
    sampled_ids: np.ndarray | None = None  # (P, n) int32, each row's distinct drawn ids ascending, zero-padded
    sampled_counts: np.ndarray | None = None  # (P, n) int32, draws of each id (0 on padding); rows sum to N
    relation: np.ndarray | None = None  # (N_p, N_p) float32: LLaVA-KD's R_t over the image tokens (store/relation.py)
    cursor: int = 0  # set by Cache.records: records this rank consumed, this one included

    def __post_init__(self) -> None:
        arrays = {
            "input_ids": (self.input_ids, np.int32, 1),
            "positions": (self.positions, np.int32, 1),
            "position_kinds": (self.position_kinds, np.int8, 1),
            "topk_ids": (self.topk_ids, np.int32, 2),
            "topk_logprobs": (self.topk_logprobs, np.float32, 2),
            "tail_mass": (self.tail_mass, np.float32, 1),
            "sampled_ids": (self.sampled_ids, np.int32, 2),
            "sampled_counts": (self.sampled_counts, np.int32, 2),
            "target_logprobs": (self.target_logprobs, np.float32, 1),
        }
        for name, (value, dtype, ndim) in arrays.items():
            if value is None:
                continue
            if not isinstance(value, np.ndarray) or value.dtype != dtype or value.ndim != ndim:
                got = f"{value.dtype} array of shape {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
                raise ValueError(f"record {self.sample_id!r}: {name} must be a {ndim}-D {np.dtype(dtype)} array, got {got}")
        per_position = {
            name: value.shape[0] for name, (value, _, _) in arrays.items() if name != "input_ids" and value is not None
        }
        if len(set(per_position.values())) > 1:
            raise ValueError(f"record {self.sample_id!r}: fields disagree on the number of positions P: {per_position}")
        for a, b in (("topk_ids", "topk_logprobs"), ("sampled_ids", "sampled_counts")):
            x, y = getattr(self, a), getattr(self, b)
            if x is not None and y is not None and x.shape != y.shape:
                raise ValueError(f"record {self.sample_id!r}: {a} {x.shape} and {b} {y.shape} must have the same shape")
        r = self.relation
        if r is not None and (not isinstance(r, np.ndarray) or r.ndim != 2 or r.shape[0] != r.shape[1]):
            raise ValueError(f"record {self.sample_id!r}: relation must be a square (N_p, N_p) array")

    @property
    def target_ids(self) -> np.ndarray:
        """(P, n) int32: the ids the teacher's distribution is stored at (top-k, or the distinct sampled ids)."""
        return self.topk_ids if self.sampled_ids is None else self.sampled_ids

    @property
    def target_probs(self) -> np.ndarray:
        """(P, n) float32, rows summing to 1: top-k renormalised (topk) or counts / N (sampled); 0 on padding."""
        if self.sampled_counts is not None:
            counts = self.sampled_counts.astype(np.float64)  # (P, n)
            return (counts / counts.sum(axis=1, keepdims=True)).astype(np.float32)
        logprobs = self.topk_logprobs.astype(np.float64)  # (P, k)
        probs = np.exp(logprobs - logprobs.max(axis=1, keepdims=True))  # (P, k)
        return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)

    def to_row(self) -> dict:
        """The record as one row of DISTILL_SCHEMA, its distribution encoded as `self.encoding` says."""
        enc = self.encoding
        if enc is None:
            raise ValueError(f"record {self.sample_id!r}: cannot write a record without its encoding")
        needed = ("topk_ids", "topk_logprobs", "tail_mass") if enc.name == "topk" else ("sampled_ids", "sampled_counts")
        missing = [name for name in ("input_ids", "positions", "position_kinds", "target_logprobs", *needed)
                   if getattr(self, name) is None]
        if missing:
            raise ValueError(f"record {self.sample_id!r}: cannot write a {enc.name} record without {missing}")
        last = self.input_ids.shape[0] - 1  # position t needs a token at t + 1
        if self.positions.size and (self.positions.min() < 0 or self.positions.max() >= last):
            raise ValueError(
                f"record {self.sample_id!r}: positions must lie in [0, T - 1) = [0, {last}), "
                f"got [{self.positions.min()}, {self.positions.max()}]"
            )
        unknown = np.setdiff1d(self.position_kinds, list(POSITION_KINDS.values()))
        if unknown.size:
            raise ValueError(f"record {self.sample_id!r}: position_kinds holds unknown kinds {unknown.tolist()}")
        if self.num_image_tokens < 0 or (self.image is None and self.num_image_tokens != 0):
            raise ValueError(
                f"record {self.sample_id!r}: num_image_tokens is {self.num_image_tokens} "
                f"with image {self.image}; text-only records have 0"
            )
        empty = np.zeros(0, dtype=np.float32)
        try:
            if enc.name == "topk":
                if self.topk_ids.shape[1] != enc.k:
                    raise ValueError(f"topk_ids has k = {self.topk_ids.shape[1]}, the cache stores top-{enc.k}")
                num_ids, ids, values, top = encode_topk(enc, self.topk_ids, self.topk_logprobs)
                tail = self.tail_mass
            else:
                (num_ids, ids, values), top, tail = encode_sampled(enc, self.sampled_ids, self.sampled_counts), empty, empty
        except ValueError as err:
            raise ValueError(f"record {self.sample_id!r}: {err}") from None
        return {
            "sample_id": self.sample_id,
            "input_ids": self.input_ids,  # (T,) int32
            "positions": self.positions,  # (P,) int32
            "position_kinds": self.position_kinds,  # (P,) int8
            "num_ids": num_ids,
            "ids": ids,
            "values": values,
            "top_logprobs": top,  # (P,) float32 (topk) or empty
            "tail_mass": tail,  # (P,) float32 (topk) or empty
            "target_logprobs": self.target_logprobs,  # (P,) float32
            "image_path": None if self.image is None else self.image.path,
            "image_sha256": None if self.image is None else self.image.sha256,
            "num_image_tokens": int(self.num_image_tokens),
            "relation": b"" if self.relation is None else encode_relation(self.relation),  # fp16 upper triangle
        }

    @classmethod
    def from_row(cls, row: dict, encoding: Encoding) -> DistillRecord:
        """Rebuild a record from a row dict; columns absent from `row` become None fields (the distribution
        is decoded when `ids` was read, which needs `positions`, `values`, `top_logprobs` and `tail_mass`)."""
        sample_id = row["sample_id"]

        def array(name: str, dtype: type) -> np.ndarray | None:
            return None if name not in row else np.asarray(row[name], dtype=dtype)

        positions = array("positions", np.int32)  # (P,) int32
        dist: dict[str, np.ndarray] = {}
        if "ids" in row:
            try:
                if encoding.name == "topk":
                    top = array("top_logprobs", np.float32)  # (P,) float32
                    if top.shape != positions.shape or len(row["tail_mass"]) != positions.shape[0]:
                        raise ValueError(f"top_logprobs and tail_mass need one value per position (P = {positions.shape[0]})")
                    ids, logprobs = decode_topk(encoding, row["num_ids"], row["ids"], row["values"], top)
                    dist = {"topk_ids": ids, "topk_logprobs": logprobs, "tail_mass": array("tail_mass", np.float32)}
                else:
                    ids, counts = decode_sampled(encoding, positions.shape[0], row["num_ids"], row["ids"], row["values"])
                    dist = {"sampled_ids": ids, "sampled_counts": counts}
            except ValueError as err:
                raise ValueError(f"record {sample_id!r}: {err}") from None
        try:
            relation = decode_relation(row["relation"]) if row.get("relation") else None  # (N_p, N_p) float32
        except ValueError as err:
            raise ValueError(f"record {sample_id!r}: {err}") from None
        image = None
        if row.get("image_path") is not None:
            image = ImageRef(path=row["image_path"], sha256=row["image_sha256"])
        return cls(
            sample_id=sample_id,
            input_ids=array("input_ids", np.int32),  # (T,) int32
            positions=positions,
            position_kinds=array("position_kinds", np.int8),  # (P,) int8
            target_logprobs=array("target_logprobs", np.float32),  # (P,) float32
            image=image,
            num_image_tokens=None if "num_image_tokens" not in row else int(row["num_image_tokens"]),
            encoding=encoding,
            relation=relation,
            **dist,
        )


PREFERENCE_ARRAYS = {  # field -> dtype; every one is 1-D
    "prompt_ids": np.int32, "chosen_ids": np.int32, "rejected_ids": np.int32, "mismatched_ids": np.int32,
    "chosen_logprobs": np.float32, "rejected_logprobs": np.float32, "mismatched_logprobs": np.float32,
}
RESPONSES = ("chosen", "rejected", "mismatched")


@dataclass
class PreferenceRecord:
    """One preference pair with the teacher's (reference) log-probs; see PREFERENCE_SCHEMA."""

    sample_id: str
    prompt_ids: np.ndarray  # (Tp,) int32, image placeholders expanded
    chosen_ids: np.ndarray  # (Tc,) int32: the teacher saw prompt_ids + chosen_ids
    rejected_ids: np.ndarray  # (Tr,) int32
    mismatched_ids: np.ndarray  # (Tm,) int32: record `mismatched_from`'s chosen response after this prompt
    mismatched_from: str
    chosen_logprobs: np.ndarray  # (Tc,) float32, teacher log-prob of each chosen token
    rejected_logprobs: np.ndarray  # (Tr,) float32
    mismatched_logprobs: np.ndarray  # (Tm,) float32
    chosen_logprob: float  # float64 sums of the per-token values
    rejected_logprob: float
    mismatched_logprob: float
    image: ImageRef | None
    num_image_tokens: int
    cursor: int = 0  # set by Cache.preference_records, as for DistillRecord

    def __post_init__(self) -> None:
        for name, dtype in PREFERENCE_ARRAYS.items():
            value = getattr(self, name)
            if not isinstance(value, np.ndarray) or value.dtype != dtype or value.ndim != 1:
                got = f"{value.dtype} array of shape {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
                raise ValueError(f"record {self.sample_id!r}: {name} must be a 1-D {np.dtype(dtype)} array, got {got}")
        for response in RESPONSES:
            ids, lps = getattr(self, f"{response}_ids"), getattr(self, f"{response}_logprobs")
            if ids.shape != lps.shape or ids.size == 0:
                raise ValueError(f"record {self.sample_id!r}: {response}_ids {ids.shape} and {response}_logprobs "
                                 f"{lps.shape} must have one equal, non-zero length")
        if self.num_image_tokens < 0 or (self.image is None and self.num_image_tokens != 0):
            raise ValueError(f"record {self.sample_id!r}: num_image_tokens is {self.num_image_tokens} "
                             f"with image {self.image}; text-only records have 0")

    def sequence(self, response: str) -> np.ndarray:
        """(Tp + Tx,) int32: exactly the tokens the teacher saw for `response` (chosen, rejected or mismatched)."""
        return np.concatenate([self.prompt_ids, getattr(self, f"{response}_ids")])

    def to_row(self) -> dict:
        row = {name: getattr(self, name) for name in PREFERENCE_ARRAYS}
        row.update({
            "sample_id": self.sample_id, "mismatched_from": self.mismatched_from,
            **{f"{r}_logprob": float(getattr(self, f"{r}_logprob")) for r in RESPONSES},
            "image_path": None if self.image is None else self.image.path,
            "image_sha256": None if self.image is None else self.image.sha256,
            "num_image_tokens": int(self.num_image_tokens),
        })
        return {name: row[name] for name in PREFERENCE_SCHEMA.names}

    @classmethod
    def from_row(cls, row: dict) -> PreferenceRecord:
        image = None if row["image_path"] is None else ImageRef(path=row["image_path"], sha256=row["image_sha256"])
        return cls(**{name: np.asarray(row[name], dtype=dtype) for name, dtype in PREFERENCE_ARRAYS.items()},
                   sample_id=row["sample_id"], mismatched_from=row["mismatched_from"],
                   **{f"{r}_logprob": float(row[f"{r}_logprob"]) for r in RESPONSES},
                   image=image, num_image_tokens=int(row["num_image_tokens"]))
