"""`mod-store convert cache/ cache-wds/ --format webdataset [--embed-images]`: rewrite a finished cache in another format.

Every part (distillation records, preference pairs) is rewritten shard by shard in file order, each shard
with its source's unit sizes, so the two caches hold the same records in the same units: they split over
ranks, permute and resume identically. Rejects files are copied; done markers and the manifest are
written as mod-extract writes them, so the new manifest equals the source's apart from `settings.format`
(and `settings.embed_images`), each shard's `bytes`, `sha256` and `units`, and `totals.bytes`.

Atomic and resumable like an extraction: each shard is written under a temporary name, then its done
marker; rerunning the same command skips converted shards. A destination that holds another cache or
another conversion (its extract_config.json differs) is refused. Each source shard's sha256 is checked
before it is read, so a corrupted source is never copied.
"""

from __future__ import annotations

import json
from pathlib import Path

from .layout import (
    FORMATS, SHARDS_SUBDIR, CacheError, read_done_marker, relative_name, shard_paths, write_done_marker,
)
from .manifest import STORE_KEYS, finalize_manifest
from .reader import PARTS, Cache
from .shard_file import shard_writer
from .writer import sha256_file, write_json_atomic, write_text_atomic

DEFAULT_ROW_GROUP = 256  # an empty source shard has no unit to copy the size from: the writers' default


def convert_cache(src: Path | str, dst: Path | str, fmt: str, embed_images: bool = False,
                  image_root: Path | str | None = None, log=print) -> dict[str, dict]:
    """Write `src` to `dst` in format `fmt`; returns {part subdir: its new manifest}.

    embed_images (webdataset only) carries each image's bytes, read from `image_root` (default: the
    manifest's image_root) unless the source embeds them already; a Parquet destination keeps references."""
    src, dst = Path(src), Path(dst)
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if embed_images and fmt != "webdataset":
        raise ValueError("--embed-images needs --format webdataset (Parquet shards hold image references only)")
    if dst.resolve() == src.resolve():
        raise ValueError(f"{dst} is the source cache; convert into a new directory")
    cache = Cache.open(src)
    manifests = {}
    for subdir, manifest in cache.manifests.items():
        header = _header(manifest, fmt, embed_images)
        _claim(dst, subdir, header)
        root = image_root if image_root is not None else manifest.get("image_root")
        num_shards = manifest["num_shards"]
        for index in range(num_shards):
            if not shard_paths(dst, index, num_shards, subdir)[2].exists():
                _convert_shard(cache, dst, subdir, index, fmt, embed_images, root)
                log(f"[convert] {subdir}/{manifest['shards'][index]['name']}: "
                    f"{manifest['shards'][index]['records']} records")
        manifests[subdir] = finalize_manifest(dst, num_shards, header, subdir)
        if Cache.open(dst).units(subdir) != cache.units(subdir):
            raise CacheError(f"{dst}/{subdir}: the converted shards' units differ from the source's")
    return manifests


def _header(manifest: dict, fmt: str, embed_images: bool) -> dict:
    """The source's extraction header with the new format."""
    header = {k: v for k, v in manifest.items() if k not in STORE_KEYS}
    settings = {k: v for k, v in header["settings"].items() if k != "embed_images"}
    header["settings"] = {**settings, "format": fmt, **({"embed_images": True} if embed_images else {})}
    return header


def _claim(dst: Path, subdir: str, header: dict) -> None:
    """Write the part's extract_config.json, or refuse a destination holding something else."""
    path = (dst if subdir == SHARDS_SUBDIR else dst / subdir) / "extract_config.json"
    if path.exists():
        if json.loads(path.read_text(encoding="utf-8")) != header:
            raise ValueError(f"{path} belongs to another cache or conversion; convert into a new directory "
                             "(or delete it to start over)")
        return
    write_json_atomic(path, header)


def _convert_shard(cache: Cache, dst: Path, subdir: str, index: int, fmt: str, embed_images: bool,
                   image_root: Path | str | None) -> None:
    manifest = cache.manifests[subdir]
    num_shards, shard = manifest["num_shards"], manifest["shards"][index]
    source, name = cache._shard_file(index, subdir)
    if sha256_file(source) != shard["sha256"]:
        raise CacheError(f"{name}: sha256 differs from the manifest (file modified or corrupted); run mod-store verify")
    path, rejects, _ = shard_paths(dst, index, num_shards, subdir, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{shard['name']}*"):  # temporaries of a killed conversion
        stale.unlink()
    units = [rows for i, _, rows in cache.units(subdir) if i == index]
    row_group_size = units[0] if units else DEFAULT_ROW_GROUP  # [R, ..., R, rest]: R reproduces them all
    with shard_writer(fmt, path, PARTS[subdir], row_group_size, image_root and Path(image_root), embed_images) as writer:
        for record in cache.shard_records(index, subdir):
            writer.write(record)
    source_rejects = shard_paths(cache.path, index, num_shards, subdir)[1]
    try:
        write_text_atomic(rejects, source_rejects.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CacheError(f"{relative_name(cache.path, source_rejects)} is missing; run mod-store verify") from None
    marker = read_done_marker(cache.path, index, num_shards, subdir)
    write_done_marker(dst, index, num_shards, marker["records_in"], marker["rejects"], writer.stats, subdir)
