"""`python -c "from modkd.store import shard_paths; print(shard_paths('cache', 3, 256))"`: names of every cache file.

    cache/manifest.json
    cache/shards/part-00003-of-00256.parquet        distillation records of shard 3 (.tar for the WebDataset format)
    cache/shards/part-00003-of-00256.rejects.jsonl  one JSON line per rejected input record
    cache/shards/part-00003-of-00256.done.json      completion marker, written last
    cache/preference/manifest.json                  the preference records' own manifest
    cache/preference/part-00000-of-00004.parquet    preference records, with the same rejects and done files

Distillation and preference records come from two `mod-extract` runs (two data files) into one cache
directory; each part has its own manifest, shard count and fingerprints, and either may be absent.

A shard's done marker (`write_done_marker("cache/", 3, 256, records_in, rejects, writer.stats)`) is
written last, after the shard's file and its rejects file are in place, so its presence alone means the
shard is complete. It records what went in and what came out: records_in = records_written +
records_rejected, always. A WebDataset shard's marker also holds `format` ("webdataset") and `units`
([rows, byte offset, byte length] of each chunk of the tar).

Every problem with a cache on disk raises `CacheError`, whose message names the shard or file and says
what is wrong with it, so nobody has to read a pyarrow traceback to learn that a shard was truncated.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .writer import write_json_atomic

MANIFEST_NAME = "manifest.json"
SHARDS_SUBDIR = "shards"  # distillation records
PREFERENCE_SUBDIR = "preference"  # preference records
DONE_SUFFIX = ".done.json"
FORMATS = {"parquet": ".parquet", "webdataset": ".tar"}  # shard format -> file suffix (store/webdataset.py)
_DONE_NAME = re.compile(r"part-(\d+)-of-(\d+)\.done\.json")


class CacheError(Exception):
    """A cache on disk is incomplete, corrupt or inconsistent with its manifest."""


def shard_stem(index: int, num_shards: int) -> str:
    """'part-00003-of-00256': zero-padded so names sort in shard order."""
    if not 0 <= index < num_shards:
        raise ValueError(f"shard index {index} is outside [0, {num_shards})")
    return f"part-{index:05d}-of-{num_shards:05d}"


def shard_paths(
    cache_dir: Path | str, index: int, num_shards: int, subdir: str = SHARDS_SUBDIR, fmt: str = "parquet"
) -> tuple[Path, Path, Path]:
    """(shard file, rejects, done) paths of one shard; the shard file is .parquet or .tar by `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown cache format {fmt!r}; formats: {', '.join(FORMATS)}")
    folder = Path(cache_dir) / subdir
    stem = shard_stem(index, num_shards)
    return folder / f"{stem}{FORMATS[fmt]}", folder / f"{stem}.rejects.jsonl", folder / f"{stem}{DONE_SUFFIX}"


def manifest_path(cache_dir: Path | str, subdir: str = SHARDS_SUBDIR) -> Path:
    """cache/manifest.json for distillation records (the cache's main manifest), cache/SUBDIR/manifest.json otherwise."""
    return Path(cache_dir) / MANIFEST_NAME if subdir == SHARDS_SUBDIR else Path(cache_dir) / subdir / MANIFEST_NAME


def done_markers_on_disk(cache_dir: Path | str, subdir: str = SHARDS_SUBDIR) -> list[tuple[int, int]]:
    """(index, num_shards) of every done marker present, sorted; used to explain an incomplete cache."""
    found = []
    for path in (Path(cache_dir) / subdir).glob("part-*" + DONE_SUFFIX):
        match = _DONE_NAME.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), int(match.group(2))))
    return sorted(found)


def relative_name(cache_dir: Path | str, path: Path) -> str:
    """'shards/part-00003-of-00256.parquet': how errors name a file."""
    return path.relative_to(Path(cache_dir)).as_posix()


DONE_KEYS = (
    "shard",
    "num_shards",
    "records_in",
    "records_written",
    "records_rejected",
    "positions",
    "bytes",
    "sha256",
    "rejects",
)
WEBDATASET_KEYS = ("format", "units")  # only in a WebDataset shard's marker


def write_done_marker(
    cache_dir: Path | str,
    index: int,
    num_shards: int,
    records_in: int,
    rejects: dict[str, int],
    writer_stats: dict,
    subdir: str = SHARDS_SUBDIR,
) -> dict:
    """Mark shard `index` complete; `rejects` counts rejected records by reason kind, `writer_stats` is ShardWriter.stats.

    Raises ValueError when the counts do not add up or the shard's files are not in place.
    """
    fmt = writer_stats.get("format", "parquet")
    parquet, rejects_file, done = shard_paths(cache_dir, index, num_shards, subdir, fmt)
    records_rejected = sum(rejects.values())
    if records_in != writer_stats["records"] + records_rejected:
        raise ValueError(
            f"{done.name}: records_in {records_in} != records written {writer_stats['records']} "
            f"+ records rejected {records_rejected}"
        )
    if not parquet.is_file() or parquet.stat().st_size != writer_stats["bytes"]:
        raise ValueError(f"{done.name}: {parquet.name} is missing or not the file ShardWriter closed")
    if not rejects_file.is_file():
        raise ValueError(f"{done.name}: write {rejects_file.name} (empty when nothing was rejected) before the marker")
    with open(rejects_file, encoding="utf-8") as f:
        reject_lines = sum(1 for _ in f)
    if reject_lines != records_rejected:
        raise ValueError(f"{done.name}: {rejects_file.name} has {reject_lines} lines but rejects count {records_rejected}")
    marker = {
        "shard": index,
        "num_shards": num_shards,
        "records_in": records_in,
        "records_written": writer_stats["records"],
        "records_rejected": records_rejected,
        "positions": writer_stats["positions"],
        "bytes": writer_stats["bytes"],
        "sha256": writer_stats["sha256"],
        "rejects": dict(sorted(rejects.items())),
        **{key: writer_stats[key] for key in WEBDATASET_KEYS if fmt == "webdataset"},
    }
    write_json_atomic(done, marker)
    return marker


def read_done_marker(cache_dir: Path | str, index: int, num_shards: int, subdir: str = SHARDS_SUBDIR) -> dict:
    """The marker of shard `index`, checked for completeness; CacheError naming the file otherwise."""
    done = shard_paths(cache_dir, index, num_shards, subdir)[2]
    name = relative_name(cache_dir, done)
    try:
        marker = json.loads(done.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CacheError(f"{name} is missing: shard {index} of {num_shards} is not complete") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CacheError(f"{name} is unreadable ({err}); delete it and rerun mod-extract to redo the shard") from None
    if not isinstance(marker, dict) or set(marker) - set(WEBDATASET_KEYS) != set(DONE_KEYS) or (
            marker.get("format", "parquet") == "webdataset") != ("units" in marker):
        raise CacheError(f"{name} does not hold the keys {list(DONE_KEYS)}; delete it and rerun mod-extract to redo the shard")
    if (marker["shard"], marker["num_shards"]) != (index, num_shards):
        raise CacheError(f"{name} says shard {marker['shard']} of {marker['num_shards']}, expected {index} of {num_shards}")
    if marker["records_in"] != marker["records_written"] + marker["records_rejected"]:
        raise CacheError(f"{name}: records_in != records_written + records_rejected")
    return marker
