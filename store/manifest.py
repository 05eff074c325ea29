"""`finalize_manifest("cache/", 256, header)`: assemble, write and load cache/manifest.json.

(With subdir="preference", the preference part's cache/preference/manifest.json: same keys.)

The manifest is the extractor's header (teacher fingerprints, tokenizer and image-processor hashes,
image tokens per image, data hash, settings) plus what the store adds: schema_version, num_shards,
the shard list, totals and reject counts. It is built only from completed shards (done markers) and
holds no timestamps, so the same extraction always yields the same bytes. `settings.format` says how the
shards are stored ("parquet", the default when absent, or "webdataset", whose shard entries also list
their chunks as `units`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .encoding import Encoding
from .layout import (
    FORMATS, MANIFEST_NAME, SHARDS_SUBDIR, CacheError, done_markers_on_disk, manifest_path, read_done_marker,
    shard_paths, shard_stem,
)
from .schema import SCHEMA_VERSION
from .writer import write_json_atomic

STORE_KEYS = ("schema_version", "num_shards", "shards", "totals", "rejects")
_SHOWN_MISSING = 5  # how many missing shards an error lists by name before "and N more"


def shard_progress(cache_dir: Path | str, num_shards: int, subdir: str = SHARDS_SUBDIR) -> tuple[int, list[int]]:
    """(number of shards complete, indices of those not complete)."""
    missing = [i for i in range(num_shards) if not shard_paths(cache_dir, i, num_shards, subdir)[2].is_file()]
    return num_shards - len(missing), missing


def finalize_manifest(cache_dir: Path | str, num_shards: int, header: dict, subdir: str = SHARDS_SUBDIR) -> dict | None:
    """Write the part's manifest once every shard has its done marker and return it; None while shards are missing."""
    clash = sorted(set(header) & set(STORE_KEYS))
    if clash:
        raise ValueError(f"manifest header must not set the store's own keys {clash}")
    if shard_progress(cache_dir, num_shards, subdir)[1]:
        return None
    fmt = header.get("settings", {}).get("format", "parquet")
    shards = []
    rejects: Counter[str] = Counter()
    for index in range(num_shards):
        marker = read_done_marker(cache_dir, index, num_shards, subdir)
        parquet = shard_paths(cache_dir, index, num_shards, subdir, fmt)[0]
        if marker.get("format", "parquet") != fmt:
            raise CacheError(f"{subdir}/{shard_stem(index, num_shards)}.done.json is a {marker.get('format', 'parquet')} "
                             f"shard but the extraction writes {fmt}; clear the directory and re-extract")
        if not parquet.is_file() or parquet.stat().st_size != marker["bytes"]:
            raise CacheError(
                f"{subdir}/{parquet.name} is missing or differs in size from its done marker; "
                f"delete {subdir}/{shard_stem(index, num_shards)}.done.json and rerun mod-extract to redo it"
            )
        shards.append(
            {
                "name": shard_stem(index, num_shards),
                "records": marker["records_written"],
                "positions": marker["positions"],
                "bytes": marker["bytes"],
                "sha256": marker["sha256"],
                "records_in": marker["records_in"],
                "records_rejected": marker["records_rejected"],
                **({"units": marker["units"]} if fmt == "webdataset" else {}),
            }
        )
        rejects.update(marker["rejects"])
    manifest = dict(header)
    manifest.update(
        {
            "schema_version": SCHEMA_VERSION,
            "num_shards": num_shards,
            "shards": shards,
            "totals": {
                "records_in": sum(s["records_in"] for s in shards),
                "records_written": sum(s["records"] for s in shards),
                "records_rejected": sum(s["records_rejected"] for s in shards),
                "positions": sum(s["positions"] for s in shards),
                "bytes": sum(s["bytes"] for s in shards),
            },
            "rejects": dict(sorted(rejects.items())),
        }
    )
    write_json_atomic(manifest_path(cache_dir, subdir), manifest)
    return manifest


def _incomplete_message(cache_dir: Path, subdir: str = SHARDS_SUBDIR) -> str:
    markers = done_markers_on_disk(cache_dir, subdir)
    if not markers:
        return (
            f"{cache_dir} has no {MANIFEST_NAME} and no completed shards: not a modkd cache, "
            "or mod-extract has not finished any shard yet"
        )
    counts = sorted({n for _, n in markers})
    if len(counts) > 1:
        return f"{cache_dir} has no {MANIFEST_NAME} and done markers for different shard counts {counts}; clear it and re-extract"
    num_shards = counts[0]
    done, missing = shard_progress(cache_dir, num_shards, subdir)
    names = ", ".join(shard_stem(i, num_shards) for i in missing[:_SHOWN_MISSING])
    more = f" and {len(missing) - _SHOWN_MISSING} more" if len(missing) > _SHOWN_MISSING else ""
    return (
        f"{cache_dir}: extraction is incomplete, {done} of {num_shards} shards complete; missing {names}{more}; "
        "rerun mod-extract with the same arguments to finish"
    )


def has_part(cache_dir: Path | str, subdir: str) -> bool:
    """Whether the cache holds (a manifest or any completed shard of) the part in `subdir`."""
    return manifest_path(cache_dir, subdir).is_file() or bool(done_markers_on_disk(cache_dir, subdir))


def load_manifest(cache_dir: Path | str, subdir: str = SHARDS_SUBDIR) -> dict:
    """Read and check a part's manifest (keys, schema version, shard names); CacheError says what is wrong."""
    cache_dir = Path(cache_dir)
    path = manifest_path(cache_dir, subdir)
    if not path.is_file():
        raise CacheError(_incomplete_message(cache_dir, subdir))
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CacheError(f"{path} is unreadable: {err}") from None
    missing = [key for key in STORE_KEYS if not isinstance(manifest, dict) or key not in manifest]
    if missing:
        raise CacheError(f"{path} lacks {missing}: not a manifest written by finalize_manifest")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise CacheError(
            f"{path} has schema_version {manifest['schema_version']} but this modkd reads {SCHEMA_VERSION}; "
            "re-extract the cache or install the matching modkd"
        )
    num_shards = manifest["num_shards"]
    names = [shard["name"] for shard in manifest["shards"]]
    if names != [shard_stem(i, num_shards) for i in range(num_shards)]:
        raise CacheError(f"{path}: shard list does not name shards 0..{num_shards - 1} of {num_shards} in order")
    settings = manifest.get("settings")
    if not isinstance(settings, dict):
        raise CacheError(f"{path}: no settings object (the extractor's header sets it)")
    if subdir == SHARDS_SUBDIR:
        try:
            Encoding.from_settings(settings)
        except ValueError as err:
            raise CacheError(f"{path}: this modkd cannot decode its distributions: {err}; re-extract the cache or "
                             "install the matching modkd") from None
    fmt = shard_format(manifest)
    if fmt not in FORMATS:
        raise CacheError(f"{path}: settings.format {fmt!r} is not one of {', '.join(FORMATS)}; install a newer modkd")
    if any(("units" in shard) != (fmt == "webdataset") for shard in manifest["shards"]):
        raise CacheError(f"{path}: {'every' if fmt == 'webdataset' else 'no'} shard entry must list units in the "
                         f"{fmt} format")
    return manifest


def shard_format(manifest: dict) -> str:
    """How a part's shards are stored: "parquet" (caches from before the format setting) or "webdataset"."""
    return manifest["settings"].get("format", "parquet")
