"""`mod-store status cache/`: which shards of each part are complete, partial or missing, and whether its manifest is final.

complete: the shard's done marker exists. partial: no marker, but some of the shard's files are there (a
temporary being written, or the renamed shard or rejects file just before the marker): a worker is on
it, or was killed on it and a rerun redoes it. missing: nothing of it yet. Works while an extraction
runs, and for either shard format (files are matched by their shard name, not their suffix).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .layout import DONE_SUFFIX, PREFERENCE_SUBDIR, SHARDS_SUBDIR, manifest_path, shard_stem

PARTS = (SHARDS_SUBDIR, PREFERENCE_SUBDIR)
HEADER_NAME = "extract_config.json"  # the extractor's header, written before any shard: gives the shard count early
_ANY_SHARD_FILE = re.compile(r"\.?part-\d+-of-(\d+)\..*")


def cache_status(cache_dir: Path | str) -> dict[str, dict | None]:
    """{part subdir: part_status or None when the part has not been started}."""
    return {subdir: part_status(cache_dir, subdir) for subdir in PARTS}


def part_status(cache_dir: Path | str, subdir: str = SHARDS_SUBDIR) -> dict | None:
    """num_shards, complete / partial / missing shard indices, manifest_final; None when nothing of the part exists."""
    folder = Path(cache_dir) / subdir
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    num_shards = _num_shards(cache_dir, subdir, names)
    if num_shards is None:
        return None
    status = {"num_shards": num_shards, "complete": [], "partial": [], "missing": [],
              "manifest_final": manifest_path(cache_dir, subdir).is_file()}
    for index in range(num_shards):
        stem = shard_stem(index, num_shards)
        if stem + DONE_SUFFIX in names:
            status["complete"].append(index)
        elif any(name.startswith((stem + ".", f".{stem}.")) for name in names):
            status["partial"].append(index)
        else:
            status["missing"].append(index)
    return status


def _num_shards(cache_dir: Path | str, subdir: str, names: set[str]) -> int | None:
    """From the manifest, else the extractor's header, else the shard files' names (`part-00003-of-00256...`)."""
    folder = Path(cache_dir) / ("" if subdir == SHARDS_SUBDIR else subdir)
    for path, read in ((manifest_path(cache_dir, subdir), lambda m: m["num_shards"]),
                       (folder / HEADER_NAME, lambda h: h["settings"]["shards"])):
        try:
            return int(read(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    counts = {int(m.group(1)) for name in names if (m := _ANY_SHARD_FILE.fullmatch(name))}
    return max(counts) if counts else None


def ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    spans: list[list[int]] = []
    for i in indices:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans) or "none"
