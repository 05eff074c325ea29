"""`mod-store verify cache/`: read every byte of a cache and list what is wrong with it.

Checks per shard: the file exists, has the manifest's byte size and sha256, opens as DISTILL_SCHEMA,
holds the manifest's record and position counts, and every row is self-consistent (one value per
position P where the encoding stores one, positions in [0, T - 1), known position kinds, no NaN, the
distribution decodes (ids below the vocabulary, sampled counts summing to N per position), the decoded
top-k mass agrees with 1 - tail_mass, image columns set together); the rejects file has one line per rejected record; sample ids are unique across the
cache. Preference shards (cache/preference/) get the same file checks and their own row checks: each
response's ids and per-token log-probs have one non-zero length, log-probs are finite and <= 0, the
stored sums equal the per-token sums. WebDataset shards (.tar) get the same checks, read through the
same row checks, plus their chunk index (contiguous chunks, rows adding up, nothing after the last
chunk but tar's end blocks) and embedded image bytes against their sha256. Every problem names its shard.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa

from .encoding import LOGPROB_STEP, Encoding, decode_sampled, decode_topk
from .layout import PREFERENCE_SUBDIR, SHARDS_SUBDIR, CacheError, manifest_path, relative_name, shard_paths
from .manifest import has_part, load_manifest, shard_format
from .schema import DISTILL_SCHEMA, POSITION_KINDS, PREFERENCE_SCHEMA
from .shard_file import list_column, shard_batches
from .webdataset import check_layout
from .writer import sha256_file

MASS_TOLERANCE = 1e-3  # float32 log-probs of a full-vocab softmax sum to 1 within ~1e-5; beyond 1e-3 is a bug
DECODED_MASS_ERROR = math.expm1(LOGPROB_STEP / 2)  # relative: each decoded top-k probability is within it
SUM_TOLERANCE = 1e-4  # relative: the stored float64 sum against the float32 per-token values summed here


def verify_cache(cache_dir: Path | str) -> list[str]:
    """Problems of the cache at `cache_dir`, starting from its manifests; empty when it is sound."""
    parts = [subdir for subdir in (SHARDS_SUBDIR, PREFERENCE_SUBDIR) if has_part(cache_dir, subdir)] or [SHARDS_SUBDIR]
    problems = []
    for subdir in parts:
        try:
            manifest = load_manifest(cache_dir, subdir)
        except CacheError as err:
            problems.append(str(err))
            continue
        problems += verify_shards(Path(cache_dir), manifest, subdir)
    return problems


def verify_shards(cache_dir: Path, manifest: dict, subdir: str = SHARDS_SUBDIR) -> list[str]:
    problems: list[str] = []
    seen_ids: set[str] = set()
    num_shards = manifest["num_shards"]
    listed = relative_name(cache_dir, manifest_path(cache_dir, subdir))  # how messages name the manifest
    for index, shard in enumerate(manifest["shards"]):
        parquet, rejects, _ = shard_paths(cache_dir, index, num_shards, subdir, shard_format(manifest))
        name = relative_name(cache_dir, parquet)
        problems += _check_rejects(rejects, relative_name(cache_dir, rejects), shard["records_rejected"], listed)
        if not parquet.is_file():
            problems.append(f"{name}: missing")
            continue
        size = parquet.stat().st_size
        if size != shard["bytes"]:
            problems.append(f"{name}: {size} bytes, {listed} records {shard['bytes']} (truncated or modified)")
        elif sha256_file(parquet) != shard["sha256"]:
            problems.append(f"{name}: sha256 differs from {listed} (file modified or corrupted)")
        if "units" in shard:
            problems += [f"{name}: {problem}" for problem in check_layout(parquet, shard["units"], shard["records"])]
        try:
            if subdir == SHARDS_SUBDIR:
                problems += _check_rows(parquet, name, shard, Encoding.from_settings(manifest["settings"]), seen_ids,
                                        listed)
            else:
                problems += _check_preference_rows(parquet, name, shard, seen_ids, listed)
        except CacheError as err:
            problems.append(str(err))
    return problems


def _check_rejects(path: Path, name: str, expected: int, listed: str) -> list[str]:
    if not path.is_file():
        return [f"{name}: missing"]
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = sum(1 for _ in f)
    return [] if lines == expected else [f"{name}: {lines} lines, {listed} records {expected} rejected records"]


def _check_rows(path: Path, name: str, shard: dict, encoding: Encoding, seen_ids: set[str], listed: str) -> list[str]:
    bad: dict[str, list] = {}  # check -> [rows failing, first failing row index in the shard]
    records = positions = 0
    for row_group, batch, extra in shard_batches(path, name, DISTILL_SCHEMA, shard):
        for check, mask in {**_row_checks(batch, encoding, name, row_group), **extra}.items():  # mask: (R,) bool, True = bad
            if mask.any():
                entry = bad.setdefault(check, [0, records + int(np.argmax(mask))])
                entry[0] += int(mask.sum())
        for sample_id in batch.column("sample_id").to_pylist():
            if sample_id in seen_ids:
                bad.setdefault(f"sample_id {sample_id!r} appears twice in the cache", [0, records])[0] += 1
            seen_ids.add(sample_id)
        records += batch.num_rows
        positions += int(np.diff(batch.column("positions").offsets.to_numpy()).sum())
    problems = [f"{name}: {count} rows with {check} (first: row {first})" for check, (count, first) in bad.items()]
    if records != shard["records"]:
        problems.append(f"{name}: {records} records, {listed} records {shard['records']}")
    if positions != shard["positions"]:
        problems.append(f"{name}: {positions} positions, {listed} records {shard['positions']}")
    return problems


def _row_checks(batch: pa.RecordBatch, encoding: Encoding, name: str, row_group: int) -> dict[str, np.ndarray]:
    """Per-row failure masks, each (R,) bool, keyed by what is wrong."""
    try:
        columns = {
            column: list_column(batch.column(column))
            for column in ("input_ids", "positions", "position_kinds", "top_logprobs", "tail_mass", "target_logprobs")
        }
    except ValueError as err:
        raise CacheError(f"{name}: row group {row_group}: {err}") from None
    lengths = {column: np.diff(offsets) for column, (offsets, _) in columns.items()}  # each (R,) int32
    num_positions = lengths["positions"]  # (R,) int32
    per_position = num_positions if encoding.name == "topk" else 0 * num_positions  # sampled: both lists empty
    checks = {
        "len(position_kinds) != P": lengths["position_kinds"] != num_positions,
        "len(target_logprobs) != P": lengths["target_logprobs"] != num_positions,
        f"len(top_logprobs) != {'P' if encoding.name == 'topk' else '0'}": lengths["top_logprobs"] != per_position,
        f"len(tail_mass) != {'P' if encoding.name == 'topk' else '0'}": lengths["tail_mass"] != per_position,
    }
    row_of_position = np.repeat(np.arange(batch.num_rows), num_positions)  # (P_total,) int64
    positions = columns["positions"][1]  # (P_total,) int32
    last = (lengths["input_ids"] - 1)[row_of_position]  # (P_total,) int32: position t needs t + 1 < T
    outside = (positions < 0) | (positions >= last)  # (P_total,) bool
    checks["positions outside [0, T - 1)"] = _rows_with(row_of_position, outside, batch.num_rows)
    kinds_ok = np.isin(columns["position_kinds"][1], list(POSITION_KINDS.values()))  # (sum len(kinds),) bool
    kinds_rows = np.repeat(np.arange(batch.num_rows), lengths["position_kinds"])
    checks["unknown position kinds"] = _rows_with(kinds_rows, ~kinds_ok, batch.num_rows)
    for column, bad, what in (("top_logprobs", lambda v: ~(v <= 0), "NaN or positive top-1 log-probs"),
                              ("tail_mass", lambda v: ~((v >= 0) & (v <= 1)), "NaN or tail mass outside [0, 1]"),
                              ("target_logprobs", lambda v: ~(v <= 0), "NaN or positive target log-probs")):
        rows = np.repeat(np.arange(batch.num_rows), lengths[column])
        checks[what] = _rows_with(rows, bad(columns[column][1]), batch.num_rows)
    malformed = np.any([mask for mask in checks.values()], axis=0)  # (R,) rows whose lengths cannot be decoded
    checks["a distribution that does not decode"] = decode_fails = np.zeros(batch.num_rows, dtype=bool)
    checks["top-k mass disagrees with 1 - tail_mass"] = mass_differs = np.zeros(batch.num_rows, dtype=bool)
    dist = {c: batch.column(c).to_pylist() for c in ("num_ids", "ids", "values")}
    for r in np.flatnonzero(~malformed):
        lo, hi = columns["positions"][0][r], columns["positions"][0][r + 1]
        try:
            if encoding.name == "topk":
                top = columns["top_logprobs"][1][lo:hi]  # (P,) float32
                _, logprobs = decode_topk(encoding, dist["num_ids"][r], dist["ids"][r], dist["values"][r], top)
                kept = 1.0 - columns["tail_mass"][1][lo:hi].astype(np.float64)  # (P,) exact at extraction
                decoded = np.exp(logprobs.astype(np.float64)).sum(axis=1)  # (P,) within the quantisation error
                mass_differs[r] = (np.abs(decoded - kept) > kept * DECODED_MASS_ERROR + MASS_TOLERANCE).any()
            else:
                decode_sampled(encoding, hi - lo, dist["num_ids"][r], dist["ids"][r], dist["values"][r])
        except ValueError:
            decode_fails[r] = True
    checks.update(_image_checks(batch))
    return checks


def _rows_with(row_of_item: np.ndarray, item_bad: np.ndarray, num_rows: int) -> np.ndarray:
    """(R,) bool: rows owning at least one bad item."""
    return np.bincount(row_of_item[item_bad], minlength=num_rows) > 0


def _check_preference_rows(path: Path, name: str, shard: dict, seen_ids: set[str], listed: str) -> list[str]:
    bad: dict[str, list] = {}  # check -> [rows failing, first failing row index in the shard]
    records = 0
    for row_group, batch, extra in shard_batches(path, name, PREFERENCE_SCHEMA, shard):
        for check, mask in {**_preference_checks(batch, name, row_group), **extra}.items():  # (R,) bool, True = bad
            if mask.any():
                bad.setdefault(check, [0, records + int(np.argmax(mask))])[0] += int(mask.sum())
        for sample_id in batch.column("sample_id").to_pylist():
            if sample_id in seen_ids:
                bad.setdefault(f"sample_id {sample_id!r} appears twice in the cache", [0, records])[0] += 1
            seen_ids.add(sample_id)
        records += batch.num_rows
    problems = [f"{name}: {count} rows with {check} (first: row {first})" for check, (count, first) in bad.items()]
    if records != shard["records"]:
        problems.append(f"{name}: {records} records, {listed} records {shard['records']}")
    return problems


def _preference_checks(batch: pa.RecordBatch, name: str, row_group: int) -> dict[str, np.ndarray]:
    checks = {}
    for response in ("chosen", "rejected", "mismatched"):
        try:
            id_offsets, _ = list_column(batch.column(f"{response}_ids"))
            lp_offsets, logprobs = list_column(batch.column(f"{response}_logprobs"))  # (N,) float32
        except ValueError as err:
            raise CacheError(f"{name}: row group {row_group}: {err}") from None
        lengths = np.diff(id_offsets)  # (R,) int32
        checks[f"empty or mismatched {response} ids/log-probs"] = (lengths == 0) | (lengths != np.diff(lp_offsets))
        rows = np.repeat(np.arange(batch.num_rows), np.diff(lp_offsets))  # (N,) row of each token
        checks[f"NaN or positive {response} log-probs"] = _rows_with(rows, ~(logprobs <= 0), batch.num_rows)
        summed = np.bincount(rows, weights=logprobs.astype(np.float64), minlength=batch.num_rows)  # (R,) float64
        stored = batch.column(f"{response}_logprob").to_numpy()  # (R,) float64
        checks[f"{response}_logprob != sum of {response}_logprobs"] = ~(
            np.abs(summed - stored) <= SUM_TOLERANCE * np.maximum(1.0, np.abs(stored)))
    checks.update(_image_checks(batch))
    return checks


def _image_checks(batch: pa.RecordBatch) -> dict[str, np.ndarray]:
    image_path = batch.column("image_path").is_null().to_numpy(zero_copy_only=False)  # (R,) bool
    image_sha = batch.column("image_sha256").is_null().to_numpy(zero_copy_only=False)  # (R,) bool
    image_tokens = batch.column("num_image_tokens").to_numpy()  # (R,) int32
    return {
        "only one of image_path and image_sha256 set": image_path != image_sha,
        "num_image_tokens != 0 without an image": image_path & (image_tokens != 0),
        "negative num_image_tokens": image_tokens < 0,
    }
