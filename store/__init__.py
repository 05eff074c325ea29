"""`python -c "from modkd.store import Cache; help(Cache)"`: the cache format, its writer and its streaming reader.

Imports nothing else of modkd: the cache is the only thing that crosses from extraction to training.
"""

from .convert import convert_cache
from .encoding import ENCODINGS, Encoding
from .layout import (
    FORMATS, PREFERENCE_SUBDIR, SHARDS_SUBDIR, CacheError, read_done_marker, shard_paths, write_done_marker,
)
from .manifest import finalize_manifest, shard_progress
from .reader import Cache
from .records import DistillRecord, ImageRef, PreferenceRecord
from .schema import DISTILL_SCHEMA, POSITION_KINDS, POSITION_MODES, PREFERENCE_SCHEMA, SCHEMA_VERSION
from .shard_file import shard_writer
from .verify import verify_cache
from .webdataset import WebDatasetWriter
from .writer import ShardWriter, sha256_file, write_json_atomic, write_text_atomic

__all__ = [
    "Cache",
    "CacheError",
    "DISTILL_SCHEMA",
    "DistillRecord",
    "ENCODINGS",
    "Encoding",
    "FORMATS",
    "ImageRef",
    "POSITION_KINDS",
    "POSITION_MODES",
    "PREFERENCE_SCHEMA",
    "PREFERENCE_SUBDIR",
    "PreferenceRecord",
    "SCHEMA_VERSION",
    "SHARDS_SUBDIR",
    "ShardWriter",
    "WebDatasetWriter",
    "convert_cache",
    "finalize_manifest",
    "read_done_marker",
    "sha256_file",
    "shard_paths",
    "shard_progress",
    "shard_writer",
    "verify_cache",
    "write_done_marker",
    "write_json_atomic",
    "write_text_atomic",
]
