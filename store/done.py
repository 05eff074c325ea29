"""`write_done_marker("cache/", 3, 256, records_in, rejects, writer.stats)`: a shard's completion marker.

The marker is written last, after the shard's Parquet file and its rejects file are in place, so its
presence alone means the shard is complete. It records what went in and what came out:
records_in = records_written + records_rejected, always. A WebDataset shard's marker also holds
`format` ("webdataset") and `units` ([rows, byte offset, byte length] of each chunk of the tar).
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import CacheError
from .layout import SHARDS_SUBDIR, relative_name, shard_paths
from .writer import write_json_atomic

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
