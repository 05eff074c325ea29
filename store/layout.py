"""`python -c "from modkd.store import shard_paths; print(shard_paths('cache', 3, 256))"`: names of every cache file.

    cache/manifest.json
    cache/shards/part-00003-of-00256.parquet        distillation records of shard 3 (.tar for the WebDataset format)
    cache/shards/part-00003-of-00256.rejects.jsonl  one JSON line per rejected input record
    cache/shards/part-00003-of-00256.done.json      completion marker, written last
    cache/preference/manifest.json                  the preference records' own manifest
    cache/preference/part-00000-of-00004.parquet    preference records, with the same rejects and done files

Distillation and preference records come from two `mod-extract` runs (two data files) into one cache
directory; each part has its own manifest, shard count and fingerprints, and either may be absent.
"""

from __future__ import annotations

import re
from pathlib import Path

MANIFEST_NAME = "manifest.json"
SHARDS_SUBDIR = "shards"  # distillation records
PREFERENCE_SUBDIR = "preference"  # preference records
DONE_SUFFIX = ".done.json"
FORMATS = {"parquet": ".parquet", "webdataset": ".tar"}  # shard format -> file suffix (store/webdataset.py)
_DONE_NAME = re.compile(r"part-(\d+)-of-(\d+)\.done\.json")


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
