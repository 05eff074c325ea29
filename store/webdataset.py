"""`python -c "import webdataset as wds; print(next(iter(wds.WebDataset('cache/shards/part-00000-of-00001.tar', shardshuffle=False))).keys())"`

The WebDataset shard format: one plain tar per shard, one sample per record in shard order, its
members named `<key>.<field>` (WebDataset groups consecutive members by the name before the first dot):

    <key>.json                   the schema's scalar columns: sample_id (the real id), num_ids, image_path,
                                 image_sha256, num_image_tokens (preference: also mismatched_from and
                                 the three float64 sums)
    <key>.<column>.npy.zst       each list column as a zstd-compressed 1-D .npy: input_ids (T,) int32,
                                 positions (P,) int32, position_kinds (P,) int8, top_logprobs, tail_mass and
                                 target_logprobs float32 (preference: ids and per-token log-probs)
    <key>.<column>.bin           each binary column's bytes as they are: the bit-packed `ids` and `values`
                                 (store/encoding.py; already dense, so not compressed again)
    <key>.image<suffix>          the image file's bytes (e.g. `.image.png`), only when images are embedded

`key` is the sample id with every byte outside [A-Za-z0-9_-] written as %XX: no dots, no slashes, and
distinct ids give distinct keys. A shard's units (what Cache.records splits over ranks) are chunks of
`row_group_size` consecutive samples; the writer records each chunk's [rows, byte offset, byte length]
(done marker, manifest), so a reader lists units without scanning and reads one chunk with one seek.
Members have mtime 0 and no owner, so the same records give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import zstandard

from .layout import CacheError
from .schema import DISTILL_SCHEMA
from .writer import RowRecord, _fsync_dir, _fsync_file, _tmp_path, sha256_file

ZSTD_LEVEL = 3  # zstandard's default: ~300 MB/s per core, within a few % of level 9's size on top-k arrays
IMAGE_FIELD = "image"  # member `<key>.image<suffix>`: embedded image bytes
IMAGE_DATA = "image_data"  # row key under which readers return embedded image bytes (not a schema column)
_UNSAFE = re.compile(rb"[^A-Za-z0-9_-]")
_NPY_HEADER = re.compile(r"'descr': '([^']+)', 'fortran_order': (True|False), 'shape': \(([^)]*)\)")
READ_ERRORS = (tarfile.TarError, zstandard.ZstdError, OSError, EOFError, ValueError, json.JSONDecodeError)


def sample_key(sample_id: str) -> str:
    """'line:12' -> 'line%3A12': a WebDataset __key__ (no dots or slashes), one-to-one with the id."""
    if not sample_id:
        raise ValueError("a WebDataset sample needs a non-empty sample_id")
    return _UNSAFE.sub(lambda m: b"%%%02X" % m.group()[0], sample_id.encode("utf-8")).decode("ascii")


def list_columns(schema: pa.Schema) -> dict[str, np.dtype]:
    """Array members of a schema: column -> numpy dtype of its values."""
    return {f.name: np.dtype(f.type.value_type.to_pandas_dtype()) for f in schema if pa.types.is_list(f.type)}


def binary_columns(schema: pa.Schema) -> list[str]:
    """Columns stored as raw `.bin` members."""
    return [f.name for f in schema if pa.types.is_binary(f.type)]


def scalar_columns(schema: pa.Schema) -> list[str]:
    """Columns stored in the sample's .json member."""
    return [f.name for f in schema if not pa.types.is_list(f.type) and not pa.types.is_binary(f.type)]


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644  # mtime 0: the same records give the same bytes
    return info


class WebDatasetWriter:
    """ShardWriter's twin for tar shards: same interface, same atomic rename, same `.stats` plus
    `format` and `units` ([rows, offset, length] per chunk of `row_group_size` samples).

    `image_root`: embed each record's image, read from image_root / image.path and checked against its
    sha256 (a record read from an embedded cache carries its bytes already); None stores references only.
    """

    def __init__(self, path: Path, schema: pa.Schema = DISTILL_SCHEMA,
                 # 256 samples: the same unit as a Parquet row group, so both formats split and resume alike
                 row_group_size: int = 256, image_root: Path | None = None, embed_images: bool = False) -> None:
        self.path, self.schema, self.row_group_size = Path(path), schema, row_group_size
        self.image_root, self.embed_images = image_root, embed_images
        self.tmp_path = _tmp_path(self.path)
        self.stats: dict | None = None
        self._arrays, self._scalars, self._binary = list_columns(schema), scalar_columns(schema), binary_columns(schema)
        self._zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        self._tar: tarfile.TarFile | None = None
        self._units: list[list[int]] = []
        self._in_unit = self._unit_start = self._records = self._positions = 0

    def __enter__(self) -> WebDatasetWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tar = tarfile.open(self.tmp_path, "w", format=tarfile.PAX_FORMAT)
        return self

    def write(self, record: RowRecord) -> None:
        row = record.to_row()  # checks the record as the Parquet writer does
        if list(row) != self.schema.names:
            raise ValueError(f"{self.path.name}: row has columns {list(row)}, schema has {self.schema.names}")
        key = sample_key(row["sample_id"])
        members = [(f"{key}.json", json.dumps({c: row[c] for c in self._scalars}).encode())]
        for column, dtype in self._arrays.items():
            buf = io.BytesIO()
            np.save(buf, np.asarray(row[column], dtype=dtype), allow_pickle=False)  # 1-D, as Parquet's list column
            members.append((f"{key}.{column}.npy.zst", self._zstd.compress(buf.getvalue())))
        members += [(f"{key}.{column}.bin", row[column]) for column in self._binary]
        if self.embed_images and row["image_path"] is not None:
            suffix = Path(row["image_path"]).suffix.lower()
            members.append((f"{key}.{IMAGE_FIELD}{suffix}", self._image_bytes(record, row)))
        if self._in_unit == 0:
            self._unit_start = self._tar.offset
        for name, data in members:
            self._tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
        self._records += 1
        self._positions += len(row.get("positions", ()))
        self._in_unit += 1
        if self._in_unit >= self.row_group_size:
            self._close_unit()

    def _image_bytes(self, record, row: dict) -> bytes:
        data = getattr(record.image, "data", None)
        if data is None:
            if self.image_root is None:
                raise ValueError(f"{self.path.name}: record {row['sample_id']!r}: embedding images needs the image root")
            data = (Path(self.image_root) / row["image_path"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != row["image_sha256"]:
            raise ValueError(f"{self.path.name}: record {row['sample_id']!r}: image {row['image_path']} does not have "
                             f"the sha256 the teacher saw; it changed since it was encoded")
        return data

    def _close_unit(self) -> None:
        if self._in_unit:
            self._units.append([self._in_unit, self._unit_start, self._tar.offset - self._unit_start])
        self._in_unit = 0

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._finish()
        finally:
            if not self._tar.closed:
                self._tar.close()
            self.tmp_path.unlink(missing_ok=True)

    def _finish(self) -> None:
        self._close_unit()
        self._tar.close()
        _fsync_file(self.tmp_path)
        self.stats = {"records": self._records, "positions": self._positions, "bytes": self.tmp_path.stat().st_size,
                      "sha256": sha256_file(self.tmp_path), "format": "webdataset", "units": self._units}
        os.replace(self.tmp_path, self.path)
        _fsync_dir(self.path.parent)


def read_unit(path: Path, name: str, unit: list[int], schema: pa.Schema = DISTILL_SCHEMA,
              columns: list[str] | None = None, skip: int = 0) -> list[dict]:
    """Rows (Parquet's row form: lists flat, scalars, plus IMAGE_DATA when embedded) of one chunk
    [rows, offset, length], from its `skip`-th sample on; `columns` limits what is decompressed.
    CacheError naming the shard when the chunk is not what the manifest says."""
    rows, offset, length = unit
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        if len(data) != length:
            raise EOFError(f"{length} bytes expected at offset {offset}, the file ends after {len(data)}")
        try:
            samples = _group(_plain_members(data))
        except _NotPlain:  # a member that needs tarfile (a PAX header for a long key): the general path
            samples = _group(_tar_members(data))
        if len(samples) != rows:
            raise ValueError(f"{len(samples)} samples where the manifest records {rows}")
        layout = _Layout(schema, columns)
        return [layout.decode(key, members) for key, members in samples[skip:]]
    except READ_ERRORS as err:
        raise CacheError(f"{name}: the chunk at byte {offset} is unreadable ({type(err).__name__}: {err}); "
                         "the shard must be re-extracted") from None


class _NotPlain(Exception):
    """A chunk holds a header other than a plain ustar file header."""


def _tar_members(data: bytes):
    """(name, bytes) of each member of a chunk, through tarfile (any tar header kind)."""
    tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
    for member in tar:
        if not member.isfile():
            raise ValueError(f"member {member.name!r} is not a regular file")
        yield member.name, tar.extractfile(member).read()


def _plain_members(data: bytes):
    """(name, bytes) of each member of a chunk of plain ustar file headers (what WebDatasetWriter writes for
    keys under ~80 characters), parsed directly: tarfile costs ~4x more per member. Checksums are checked."""
    pos = 0
    while pos < len(data):
        header = data[pos : pos + 512]
        if len(header) < 512:
            raise EOFError(f"a tar header at chunk byte {pos} is cut short")
        if header[156:157] not in (b"0", b"\0") or header[345:346] != b"\0":
            raise _NotPlain
        stored = int(header[148:156].rstrip(b"\0 ") or b"0", 8)
        if sum(header) - sum(header[148:156]) + 8 * 32 != stored:
            raise ValueError(f"the tar header at chunk byte {pos} fails its checksum")
        size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
        start = pos + 512
        if start + size > len(data):
            raise EOFError(f"member {header[:100].rstrip(bytes(1)).decode()!r} is cut short")
        yield header[:100].rstrip(b"\0").decode("utf-8"), data[start : start + size]
        pos = start + -(-size // 512) * 512  # data padded to whole 512-byte blocks


def _group(members) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {field: bytes}) of each sample, members grouped by consecutive key as WebDataset does."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    for name, data in members:
        key, dot, field = name.partition(".")
        if not dot:
            raise ValueError(f"member {name!r} is not <key>.<field>")
        if not samples or samples[-1][0] != key:
            samples.append((key, {}))
        samples[-1][1][field] = data
    return samples


def _load_npy(raw: bytes) -> np.ndarray:
    """A .npy file's array (a writable copy): the header is parsed by a regex, np.load's literal_eval costs more
    than the data; anything but the simple headers np.save writes goes through np.load."""
    if raw[:8] == b"\x93NUMPY\x01\x00":
        end = 10 + int.from_bytes(raw[8:10], "little")
        match = _NPY_HEADER.match(raw[10:end].decode("latin1"), 1)
        if match and match.group(2) == "False":
            shape = tuple(int(n) for n in match.group(3).split(",") if n.strip())
            return np.frombuffer(raw, dtype=np.dtype(match.group(1)), offset=end).reshape(shape).copy()
    return np.load(io.BytesIO(raw), allow_pickle=False)


class _Layout:
    """What to decode from each sample of a chunk: the schema's members, limited to `columns`."""

    def __init__(self, schema: pa.Schema, columns: list[str] | None) -> None:
        wanted = set(schema.names if columns is None else columns)
        self.scalars = [c for c in scalar_columns(schema) if c in wanted]
        self.arrays = {c: dtype for c, dtype in list_columns(schema).items() if c in wanted}
        self.binary = [c for c in binary_columns(schema) if c in wanted]
        self.images = "image_path" in wanted
        self.zstd = zstandard.ZstdDecompressor()  # one per chunk: making one costs more than a small member

    def decode(self, key: str, members: dict[str, bytes]) -> dict:
        if "json" not in members:
            raise ValueError(f"sample {key!r} has no .json member")
        meta = json.loads(members["json"])
        if sample_key(meta["sample_id"]) != key:
            raise ValueError(f"sample {key!r} holds sample_id {meta['sample_id']!r}, whose key differs")
        row = {c: meta[c] for c in self.scalars}
        for column, dtype in self.arrays.items():
            blob = members.get(f"{column}.npy.zst")
            if blob is None:
                raise ValueError(f"sample {key!r} has no {column}.npy.zst member")
            array = _load_npy(self.zstd.decompress(blob))
            if array.dtype != dtype:
                raise ValueError(f"sample {key!r}: {column} is {array.dtype}, the schema says {dtype}")
            row[column] = array.reshape(-1)  # (n,) as the Parquet column
        for column in self.binary:
            if f"{column}.bin" not in members:
                raise ValueError(f"sample {key!r} has no {column}.bin member")
            row[column] = members[f"{column}.bin"]
        if self.images:
            image = next((field for field in members if field.startswith(IMAGE_FIELD)), None)
            if image is not None:
                row[IMAGE_DATA] = members[image]
        return row


def check_layout(path: Path, units: list[list[int]], records: int) -> list[str]:
    """Problems with a tar's chunk index: chunks contiguous from byte 0, rows summing to `records`,
    and nothing but tar's end-of-archive zeros after the last chunk."""
    problems, end = [], 0
    for rows, offset, length in units:
        if offset != end or rows < 1 or length < 1:
            problems.append(f"chunk index is not contiguous at byte {offset} (expected {end})")
            break
        end = offset + length
    if sum(u[0] for u in units) != records:
        problems.append(f"chunk rows sum to {sum(u[0] for u in units)}, the shard records {records}")
    with open(path, "rb") as f:
        f.seek(end)
        while block := f.read(1 << 20):
            if block.count(0) != len(block):
                problems.append(f"bytes after the last chunk (offset {end}) are not the tar's end-of-archive zeros")
                break
    return problems


def embedded_image_ok(row: dict) -> bool:
    """False when a row's embedded image bytes do not have its image_sha256."""
    data = row.get(IMAGE_DATA)
    return data is None or hashlib.sha256(data).hexdigest() == row.get("image_sha256")
