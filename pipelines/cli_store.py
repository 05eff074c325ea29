"""`mod-store verify cache/` and `mod-store inspect cache/ [--json]`: check and summarise a cache (either format).

`mod-store convert cache/ cache-wds/ --format webdataset [--embed-images]` rewrites a finished cache in
another shard format (store/convert.py). `mod-store status cache/ [--json]` lists each part's complete,
partial and missing shards and whether its manifest is final (store/status.py), also during an extraction.

Thin: parses the path, calls modkd.store, prints. Exit status 1 when the cache has problems.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from modkd.store import FORMATS, Cache, CacheError, convert_cache, verify_cache
from modkd.store.status import cache_status, ranges

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Check and summarise a modkd teacher-logit cache.")


@app.command()
def verify(path: Path = typer.Argument(..., help="cache directory (holds manifest.json)")) -> None:
    """Hash and read every shard; print OK with counts, or each problem and exit 1."""
    problems = verify_cache(path)
    if problems:
        for problem in problems:
            typer.echo(problem)
        raise typer.Exit(1)
    cache = Cache.open(path)
    if cache.manifest is not None:
        totals = cache.manifest["totals"]
        typer.echo(
            f"OK: {path}: {totals['records_written']} records, {totals['positions']} positions, "
            f"{totals['bytes']} bytes; {totals['records_rejected']} of {totals['records_in']} input records rejected"
        )
    if cache.preference_manifest is not None:
        typer.echo(f"OK: {path}/preference: {_preference_line(cache.preference_manifest)}")


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="cache directory (holds manifest.json)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of a table"),
) -> None:
    """Per-shard records, positions, bytes, bytes/position, mean top-k mass and entropy; rejects by reason;
    LLaVA-KD's relation matrices (form, N_p, bytes per record)."""
    try:
        cache = Cache.open(path)
        rows = cache.stats()
    except CacheError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(1) from None
    preference = cache.preference_manifest
    relation = cache.manifest["settings"].get("relation", "none") if cache.manifest else None  # form, or none
    if as_json:
        typer.echo(json.dumps({"shards": rows[:-1], "total": rows[-1] if rows else None, "relation": relation,
                               "rejects": cache.manifest["rejects"] if cache.manifest else {},
                               "preference": None if preference is None else
                               {"totals": preference["totals"], "rejects": preference["rejects"]}}, indent=2))
        return
    if cache.manifest is not None:
        _print_table(rows, cache.manifest["rejects"])
        typer.echo(f"relation matrices: {_relation_line(relation, rows[-1])}")
    if preference is not None:
        typer.echo(f"preference pairs: {_preference_line(preference)}")


@app.command()
def convert(
    src: Path = typer.Argument(..., help="a finished cache"),
    dst: Path = typer.Argument(..., help="new directory (a rerun finishes an interrupted conversion)"),
    shard_format: str = typer.Option(..., "--format", help=" | ".join(FORMATS)),
    embed_images: bool = typer.Option(False, help="webdataset: carry the image bytes (read under --image-root)"),
    image_root: Path = typer.Option(None, exists=True, file_okay=False,
                                    help="where the images are (default: the manifest's image_root)"),
) -> None:
    """Rewrite SRC's records into DST in another format: same records, units and manifest apart from format, bytes, hashes."""
    try:
        manifests = convert_cache(src, dst, shard_format, embed_images, image_root, log=typer.echo)
    except (CacheError, ValueError, OSError) as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(1) from None
    for subdir, manifest in manifests.items():
        t = manifest["totals"]
        typer.echo(f"converted {subdir}: {t['records_written']} records, {t['bytes']} bytes as {shard_format}")


@app.command()
def status(
    path: Path = typer.Argument(..., help="cache directory (complete or not)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of lines"),
) -> None:
    """Per part (shards/, preference/): shards complete, partial (files present, no done marker) and missing; manifest final?"""
    parts = cache_status(path)
    if as_json:
        typer.echo(json.dumps(parts, indent=2))
        return
    for subdir, st in parts.items():
        if st is None:
            typer.echo(f"{subdir}: not started")
            continue
        typer.echo(f"{subdir}: {len(st['complete'])} of {st['num_shards']} shards complete, {len(st['partial'])} partial, "
                   f"{len(st['missing'])} missing; manifest {'final' if st['manifest_final'] else 'not written yet'}")
        for state in ("complete", "partial", "missing"):
            typer.echo(f"  {state + ':':<9} {ranges(st[state])}")


def _print_table(rows: list[dict], rejects: dict) -> None:
    typer.echo(f"{'shard':<22} {'records':>9} {'positions':>11} {'bytes':>13} {'B/pos':>8} {'ids/pos':>8} "
               f"{'topk mass':>10} {'topk H>=':>9}")
    for row in rows:
        typer.echo(
            f"{row['name']:<22} {row['records']:>9} {row['positions']:>11} {row['bytes']:>13} "
            f"{_number(row['bytes_per_position'], 1):>8} {_number(row['mean_ids'], 1):>8} "
            f"{_number(row['mean_topk_mass'], 4):>10} {_number(row['mean_topk_entropy'], 4):>9}"
        )
    kinds = ", ".join(f"{kind} {count}" for kind, count in rows[-1]["positions_by_kind"].items())
    typer.echo(f"positions by kind: {kinds}")
    reasons = ", ".join(f"{reason} {count}" for reason, count in rejects.items()) or "none"
    typer.echo(f"rejected input records: {sum(rejects.values())} ({reasons})")


def _relation_line(form: str, total: dict) -> str:
    """settings.relation, N_p and the column's bytes per record with a matrix (store/stats.py)."""
    if total["relation_records"] == 0:
        return f"{form} (settings.relation); no record holds one"
    low, high = total["relation_n_p"]
    sizes = f"N_p = {low}" if low == high else f"N_p = {low}..{high}"
    return (f"{form} (settings.relation), {sizes}, {total['relation_records']} of {total['records']} records, "
            f"{total['relation_bytes_per_record']:,.0f} B per record with a matrix as fp16 upper triangles"
            + ("" if total["relation_disk_bytes_per_record"] is None else
               f", {total['relation_disk_bytes_per_record']:,.1f} B on disk (zstd Parquet)"))


def _preference_line(manifest: dict) -> str:
    t = manifest["totals"]
    reasons = ", ".join(f"{reason} {count}" for reason, count in manifest["rejects"].items()) or "none"
    return (f"{t['records_written']} pairs in {manifest['num_shards']} shards, {t['bytes']} bytes; "
            f"{t['records_rejected']} of {t['records_in']} input records rejected ({reasons})")


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    app()


if __name__ == "__main__":
    main()
