"""pytest tests/test_student_data.py -q   # stream, shuffle, resume and batch cached records

From the cache to training batches, without re-tokenising: the cached `input_ids` are used as they
are, and each image is read from the trainer's image root (or from the record, when a WebDataset
cache embeds it) and checked against the sha256 recorded at extraction.

`RecordStream` reads one rank's (and one DataLoader worker's) part of the cache through
`Cache.records(rank, world_size, order_seed=...)`: every epoch permutes the cache's (shard, row group)
units with a seed of its own before they are split over parts, then a buffer shuffles records on top.
A new epoch starts when the part runs out, so ranks with unequal record counts still take the same
number of steps. Its whole state (seed, epoch, reader cursor, the cursors of the records in the
buffer, RNG) rides along with every batch, so a checkpoint can resume the stream exactly where the
consumed batches left it.
"""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from modkd.store import POSITION_KINDS, POSITION_MODES, Cache, DistillRecord, PreferenceRecord

SHUFFLE_BUFFER = 1024  # records; ~4 row groups, enough to mix shards written from one ordered data file
RESPONSE = POSITION_KINDS["response"]


class RecordStream:
    """Endless shuffled records of part `part` of `parts` (rank x worker); state() resumes it exactly.

    Streams distillation records, or preference pairs with preference=True (Cache.preference_records).
    """

    def __init__(self, cache: Cache, part: int, parts: int, seed: int, buffer_size: int = SHUFFLE_BUFFER,
                 state: dict | None = None, preference: bool = False) -> None:
        self.cache, self.part, self.parts, self.buffer_size = cache, part, parts, buffer_size
        self.read = cache.preference_records if preference else cache.records
        self.seed, self.epoch, self.cursor, self.buffer = seed, 0, 0, []
        self.rng = random.Random(f"{seed}/{part}/{parts}")
        if state is not None:
            self._restore(state)

    def state(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "read": self.cursor, "buffer": [r.cursor for r in self.buffer],
                "rng": self.rng.getstate()}

    def read_part(self, start: int):
        """This part's records of the current epoch from record `start` on: all parts read one unit order."""
        return self.read(self.part, self.parts, start=start, order_seed=f"{self.seed}/epoch{self.epoch}")

    def _restore(self, state: dict) -> None:
        self.seed, self.epoch, self.cursor = state["seed"], state["epoch"], state["read"]
        self.rng.setstate(_as_rng_state(state["rng"]))
        wanted = state["buffer"]
        if wanted:  # re-read the window that holds the buffered records, keep those, in buffer order
            by_cursor = {}
            for rec in self.read_part(start=min(wanted) - 1):
                if rec.cursor > self.cursor:
                    break
                by_cursor[rec.cursor] = rec
            self.buffer = [by_cursor[c] for c in wanted]

    def __iter__(self):
        while True:
            source = self.read_part(start=self.cursor)
            got_any = self.cursor > 0 or bool(self.buffer)
            for rec in source:
                got_any = True
                self.cursor = rec.cursor
                if len(self.buffer) < self.buffer_size:
                    self.buffer.append(rec)
                    continue
                i = self.rng.randrange(len(self.buffer))
                self.buffer[i], rec = rec, self.buffer[i]
                yield rec
            while self.buffer:  # the part is exhausted: drain the buffer in random order
                yield self.buffer.pop(self.rng.randrange(len(self.buffer)))
            if not got_any:
                raise ValueError(f"part {self.part} of {self.parts} of {self.cache.path} holds no records; "
                                 f"use fewer processes/workers than the cache has row groups")
            self.epoch, self.cursor = self.epoch + 1, 0


def _as_rng_state(state) -> tuple:
    """random.setstate wants tuples; a state that went through JSON comes back as lists."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


@dataclass
class Batch:
    """A right-padded batch (B rows), or a packed one: every record in one row of B = 1 with no padding,
    `position_ids` restarting at 0 per record (transformers then keeps attention inside each record).
    The distilled positions are flattened over the batch: N = total stored positions."""

    input_ids: torch.Tensor  # (B, T) int64
    attention_mask: torch.Tensor  # (B, T) int64: 1 on tokens, 0 on padding (all 1 when packed)
    pixel_values: torch.Tensor | None  # (n_images, 3, H, W) fp32; anyres (OneVision): (n_images, max tiles + 1, 3, H, W)
    flat_positions: torch.Tensor  # (N,) int64: b * T + t of each stored position t
    kinds: torch.Tensor  # (N,) int8: POSITION_KINDS
    targets: torch.Tensor  # (N,) int64: input_ids[b, t + 1]
    target_ids: torch.Tensor  # (N, n) int64: the cached ids (rec.target_ids), rows zero-padded to the batch's widest
    target_probs: torch.Tensor  # (N, n) fp32: the teacher's probabilities there (rec.target_probs), 0 on padding
    tail_mass: torch.Tensor  # (N,) fp32: mass outside the ids (topk caches; 0 for sampled ones)
    sample_ids: list[str]
    position_ids: torch.Tensor | None = None  # (1, T) int64 when packed: each record's positions from 0
    stream_state: dict | None = None  # the stream's state after this batch was drawn
    image_sizes: torch.Tensor | None = None  # (n_images, 2) int64 (H, W): anyres models (OneVision) unpad tiles by it
    # LLaVA-KD RDist: the teacher's relation matrix of each record that has one, in batch order (store/relation.py)
    relation_sizes: torch.Tensor | None = None  # (R,) int64: N_p of each such record (its image tokens, in order)
    relation_targets: torch.Tensor | None = None  # (sum N_p^2,) fp32: their (N_p, N_p) matrices, flattened

    def model_inputs(self) -> dict:
        """The student's (and an online teacher's) keyword arguments: packed rows pass position ids and no mask."""
        mask = None if self.position_ids is not None else self.attention_mask
        return {"input_ids": self.input_ids, "attention_mask": mask, "position_ids": self.position_ids,
                "pixel_values": self.pixel_values, "use_cache": False, **_sizes(self.image_sizes)}

    def to(self, device) -> Batch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return Batch(**moved)

    def kind_mask(self, mode: str) -> torch.Tensor:
        """(N,) bool: positions whose kind belongs to POSITION_MODES[mode] (e.g. "response")."""
        wanted = torch.tensor([POSITION_KINDS[k] for k in POSITION_MODES[mode]], dtype=self.kinds.dtype)
        return torch.isin(self.kinds, wanted.to(self.kinds.device))

    def kind_is(self, kind: str) -> torch.Tensor:
        """(N,) bool: positions of one POSITION_KINDS kind (e.g. "image": LLaVA-KD's L_vis positions)."""
        return self.kinds == POSITION_KINDS[kind]


class ImageLoader:
    """Opens cached records' images under `image_root`, checking each file's sha256 once."""

    def __init__(self, image_root: Path | None, image_processor) -> None:
        self.root = None if image_root is None else Path(image_root).resolve()
        self.image_processor = image_processor
        self.checked: set[str] = set()

    def pixels(self, records: list[DistillRecord] | list[PreferenceRecord]) -> torch.Tensor | None:
        return self.inputs(records).get("pixel_values")  # (n, 3, H, W); anyres: (n, max tiles + 1, 3, H, W)

    def inputs(self, records: list[DistillRecord] | list[PreferenceRecord]) -> dict[str, torch.Tensor]:
        """The image processor's model inputs for the records' images, in record order ({} if none): pixel_values,
        and image_sizes where the processor gives them (anyres tiling: the model unpads the tiles with them)."""
        images = [self._open(r) for r in records if r.image is not None]
        if not images:
            return {}
        out = self.image_processor(images=images, return_tensors="pt")
        return {k: out[k] for k in ("pixel_values", "image_sizes") if k in out}

    def _open(self, rec: DistillRecord | PreferenceRecord) -> Image.Image:
        if rec.image.data is not None:  # embedded in the cache (mod-extract --embed-images): no image root needed
            digest = hashlib.sha256(rec.image.data).hexdigest()
            if digest != rec.image.sha256:
                raise ValueError(f"record {rec.sample_id!r}: its embedded image {rec.image.path} has sha256 "
                                 f"{digest[:12]}... but the teacher saw {rec.image.sha256[:12]}...")
            return Image.open(io.BytesIO(rec.image.data)).convert("RGB")
        if self.root is None:
            raise ValueError(f"record {rec.sample_id!r} has an image ({rec.image.path}); pass --image-root")
        path = (self.root / rec.image.path).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"record {rec.sample_id!r}: image {rec.image.path} lies outside the image root {self.root}")
        if rec.image.path not in self.checked:
            try:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            except FileNotFoundError:
                raise ValueError(f"record {rec.sample_id!r}: image {path} is missing (is --image-root right?)") from None
            if digest != rec.image.sha256:
                raise ValueError(f"record {rec.sample_id!r}: image {path} has sha256 {digest[:12]}... but the teacher "
                                 f"saw {rec.image.sha256[:12]}...; the image changed since extraction")
            self.checked.add(rec.image.path)
        return Image.open(path).convert("RGB")


def collate(records: list[DistillRecord], pad_id: int, images: ImageLoader, pack: bool = False) -> Batch:
    """Right-padded batch of records (or, with pack, one row of them all), stored positions flattened over it."""
    lengths = [len(r.input_ids) for r in records]
    rows, T = (1, sum(lengths)) if pack else (len(records), max(lengths))
    ids = torch.full((rows, T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((rows, T), dtype=torch.long)  # (B, T)
    flat, kinds, targets = [], [], []
    width = max(r.target_ids.shape[1] for r in records)  # sampled rows differ in distinct ids; top-k rows are k wide
    cached_ids, cached_probs, tails = [], [], []
    rel_sizes, rel_targets = [], []
    for b, r in enumerate(records):
        n = lengths[b]
        start = sum(lengths[:b]) if pack else b * T  # flat index of the record's first token
        ids.view(-1)[start : start + n] = torch.from_numpy(r.input_ids.astype(np.int64))
        mask.view(-1)[start : start + n] = 1
        pos = r.positions.astype(np.int64)  # (P,)
        flat.append(start + pos)
        kinds.append(r.position_kinds)
        targets.append(r.input_ids[pos + 1].astype(np.int64))  # position t predicts token t + 1
        pad = ((0, 0), (0, width - r.target_ids.shape[1]))
        cached_ids.append(np.pad(r.target_ids.astype(np.int64), pad))  # (P, n) padding: id 0 ...
        cached_probs.append(np.pad(r.target_probs, pad))  # (P, n) ... with probability 0
        tails.append(r.tail_mass if r.tail_mass is not None else np.zeros(len(pos), np.float32))
        if r.relation is not None:
            rel_sizes.append(r.relation.shape[0])
            rel_targets.append(r.relation.reshape(-1))  # (N_p * N_p,) fp32
    image = images.inputs(records)
    return Batch(
        input_ids=ids, attention_mask=mask, pixel_values=image.get("pixel_values"), image_sizes=image.get("image_sizes"),
        flat_positions=torch.from_numpy(np.concatenate(flat)),
        kinds=torch.from_numpy(np.concatenate(kinds)),
        targets=torch.from_numpy(np.concatenate(targets)),
        target_ids=torch.from_numpy(np.concatenate(cached_ids)),
        target_probs=torch.from_numpy(np.concatenate(cached_probs)),
        tail_mass=torch.from_numpy(np.concatenate(tails)),
        sample_ids=[r.sample_id for r in records],
        position_ids=torch.cat([torch.arange(n) for n in lengths])[None] if pack else None,  # (1, T)
        relation_sizes=torch.tensor(rel_sizes, dtype=torch.long),  # (R,)
        relation_targets=torch.from_numpy(np.concatenate(rel_targets)) if rel_targets else torch.zeros(0),
    )


@dataclass
class Sequences:
    """Padded prompt + response sequences; N = response tokens over all S rows."""

    input_ids: torch.Tensor  # (S, T) int64
    attention_mask: torch.Tensor  # (S, T) int64
    pixel_values: torch.Tensor | None  # (n_images, 3, H, W) fp32, in row order
    flat_positions: torch.Tensor  # (N,) int64: s * T + t of each position predicting a response token
    targets: torch.Tensor  # (N,) int64: the response token at t + 1
    sequence_index: torch.Tensor  # (N,) int64: the row s each position belongs to
    ref_logps: torch.Tensor  # (S,) float64: the teacher's summed log-prob of each row's response
    image_sizes: torch.Tensor | None = None  # (n_images, 2) int64, in row order: anyres models (OneVision) only

    def model_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "pixel_values": self.pixel_values,
                "use_cache": False, **_sizes(self.image_sizes)}

    def to(self, device) -> Sequences:
        return Sequences(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()})


@dataclass
class PreferenceBatch:
    """B preference pairs: `policy` rows are the B chosen then the B rejected responses; `mismatched` rows are
    each prompt with its stored KTO partner's response (scored by the student without gradient)."""

    policy: Sequences  # 2B rows
    mismatched: Sequences  # B rows
    sample_ids: list[str]
    stream_state: dict | None = None

    def to(self, device) -> PreferenceBatch:
        return PreferenceBatch(self.policy.to(device), self.mismatched.to(device), self.sample_ids, self.stream_state)


def collate_preference(records: list[PreferenceRecord], pad_id: int, images: ImageLoader) -> PreferenceBatch:
    image = images.inputs(records)  # pixel_values (n_images, 3, H, W) [and image_sizes (n_images, 2)], or {}
    twice = {k: torch.cat([v, v]) for k, v in image.items()}  # the chosen rows, then the rejected rows
    policy = _sequences([(r, "chosen") for r in records] + [(r, "rejected") for r in records], pad_id,
                        twice.get("pixel_values"), twice.get("image_sizes"))
    mismatched = _sequences([(r, "mismatched") for r in records], pad_id, image.get("pixel_values"),
                            image.get("image_sizes"))
    return PreferenceBatch(policy, mismatched, [r.sample_id for r in records])


def _sequences(rows: list[tuple[PreferenceRecord, str]], pad_id: int, pixel_values: torch.Tensor | None,
               image_sizes: torch.Tensor | None = None) -> Sequences:
    tokens = [r.sequence(response) for r, response in rows]  # each (Tp + Tx,) int32, as the teacher saw it
    T = max(len(t) for t in tokens)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (S, T)
    mask = torch.zeros((len(rows), T), dtype=torch.long)  # (S, T)
    flat, targets, index = [], [], []
    for s, ((r, response), seq) in enumerate(zip(rows, tokens)):
        ids[s, : len(seq)] = torch.from_numpy(seq.astype(np.int64))
        mask[s, : len(seq)] = 1
        start = len(r.prompt_ids) - 1  # position start + i predicts response token i
        n = len(seq) - len(r.prompt_ids)
        flat.append(s * T + start + np.arange(n))
        targets.append(seq[start + 1 :].astype(np.int64))
        index.append(np.full(n, s))
    return Sequences(
        input_ids=ids, attention_mask=mask, pixel_values=pixel_values,
        flat_positions=torch.from_numpy(np.concatenate(flat)), targets=torch.from_numpy(np.concatenate(targets)),
        sequence_index=torch.from_numpy(np.concatenate(index)),
        ref_logps=torch.tensor([getattr(r, f"{response}_logprob") for r, response in rows], dtype=torch.float64),
        image_sizes=image_sizes)


def _sizes(image_sizes: torch.Tensor | None) -> dict:
    """{"image_sizes": ...} for anyres students, {} otherwise: a LLaVA student is called exactly as before."""
    return {} if image_sizes is None else {"image_sizes": image_sizes}


class BatchStream(torch.utils.data.IterableDataset):
    """Batches for one process; each DataLoader worker streams its own part of the rank's share.
    Batch of distillation records, or PreferenceBatch of preference pairs with preference=True."""

    def __init__(self, cache_path: Path, rank: int, world_size: int, batch_size: int, seed: int, pad_id: int,
                 image_root: Path | None, image_processor, states: dict | None = None, preference: bool = False,
                 pack: bool = False) -> None:
        self.cache_path, self.rank, self.world_size = cache_path, rank, world_size
        self.pack = pack  # distillation batches only: one row per micro-batch, no padding
        self.batch_size, self.seed, self.pad_id = batch_size, seed, pad_id
        self.image_root, self.image_processor = image_root, image_processor
        self.states = states or {}  # worker id -> RecordStream state
        self.preference = preference

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        part, parts = self.rank * workers + worker, self.world_size * workers
        stream = RecordStream(Cache.open(self.cache_path), part, parts, self.seed, state=self.states.get(worker),
                              preference=self.preference)
        images = ImageLoader(self.image_root, self.image_processor)
        records = iter(stream)
        while True:
            drawn = [next(records) for _ in range(self.batch_size)]
            if self.preference:
                batch = collate_preference(drawn, self.pad_id, images)
            else:
                batch = collate(drawn, self.pad_id, images, self.pack)
            batch.stream_state = {"worker": worker, "state": stream.state()}
            yield batch
