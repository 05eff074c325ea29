"""pytest tests/test_webdataset.py -q   # the WebDataset shard format against the Parquet one

The toy world's 30 mixed records and 8 preference pairs, extracted by the tiny teacher once per format
(3 shards, chunks/row groups of 4, every position kind): the WebDataset cache embeds its images. Both
must decode to the same records through Cache.open, split and resume alike, train the same student
bit for bit, and the tars must be plain WebDataset that the `webdataset` package reads without modkd.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file
from test_store_helpers import HEADER, VOCAB, assert_same_record, random_record, write_shard
from transformers import AutoProcessor
from typer.testing import CliRunner

from modkd.extract.run import ExtractConfig, run
from modkd.pipelines.cli_store import app as store_cli
from modkd.pipelines.toyworld.models import STUDENT_LLM, build_model
from modkd.store import Cache, CacheError, Encoding, ImageRef, finalize_manifest, sha256_file, shard_paths, verify_cache
from modkd.store.webdataset import read_unit, sample_key
from modkd.student.config import TrainConfig
from modkd.student.data import ImageLoader
from modkd.student.trainer import train

SHARD_1 = "shards/part-00001-of-00003.tar"
STORE_FIELDS = {"bytes", "sha256", "units"}  # per-shard manifest fields that depend on the format
runner = CliRunner()


def extract_both(out: Path, teacher_dir: Path, world: Path, data: Path, pref: Path, **kw) -> Cache:
    for path in (data, pref):
        summary = run(ExtractConfig(teacher=str(teacher_dir), data=path, out=out, image_root=world, shards=3, top_k=8,
                                    positions="all", row_group_size=4, batch_size=4, **kw))
        assert summary["manifest"] is not None
    return Cache.open(out)


@pytest.fixture(scope="module")
def parquet(tmp_path_factory, teacher_dir, world, mixed_data) -> Cache:
    return extract_both(tmp_path_factory.mktemp("pq") / "cache", teacher_dir, world, mixed_data, world / "pref.jsonl")


@pytest.fixture(scope="module")
def wds(tmp_path_factory, teacher_dir, world, mixed_data) -> Cache:
    """The same extraction as `parquet`, written as WebDataset tars with the images inside."""
    return extract_both(tmp_path_factory.mktemp("wds") / "cache", teacher_dir, world, mixed_data, world / "pref.jsonl",
                        format="webdataset", embed_images=True)


@pytest.fixture(scope="module")
def converted(parquet, tmp_path_factory) -> tuple[Cache, Cache]:
    """`mod-store convert` of the Parquet cache to WebDataset (image references only), and back to Parquet."""
    tmp = tmp_path_factory.mktemp("convert")
    for src, dst, fmt in ((parquet.path, tmp / "wds", "webdataset"), (tmp / "wds", tmp / "pq", "parquet")):
        result = runner.invoke(store_cli, ["convert", str(src), str(dst), "--format", fmt])
        assert result.exit_code == 0, result.output
        assert "converted shards: 30 records" in result.output and "converted preference: 8 records" in result.output
    return Cache.open(tmp / "wds"), Cache.open(tmp / "pq")


def without_format(manifest: dict) -> dict:
    """The manifest less what the format decides: settings.format/embed_images, shard bytes/hashes/units, total bytes."""
    settings = {k: v for k, v in manifest["settings"].items() if k not in ("format", "embed_images")}
    shards = [{k: v for k, v in shard.items() if k not in STORE_FIELDS} for shard in manifest["shards"]]
    totals = {k: v for k, v in manifest["totals"].items() if k != "bytes"}
    return {**manifest, "settings": settings, "shards": shards, "totals": totals}


def assert_same_pair(got, want) -> None:
    for name, value in vars(want).items():
        other = getattr(got, name)
        if isinstance(value, np.ndarray):
            assert other.dtype == value.dtype and np.array_equal(other, value), name
        else:
            assert other == value, name


# ---------------------------------------------------------------- the same records through Cache.open


def test_both_formats_decode_to_identical_records(parquet, wds, world):
    assert sorted(p.name for p in (wds.path / "shards").glob("part-*")) == sorted(
        f"part-0000{i}-of-00003.{ext}" for i in range(3) for ext in ("tar", "rejects.jsonl", "done.json"))
    assert wds.format() == "webdataset" and parquet.format() == "parquet"
    assert wds.manifest["settings"]["format"] == "webdataset" and wds.manifest["settings"]["embed_images"] is True
    assert without_format(wds.manifest) == without_format(parquet.manifest)
    assert without_format(wds.preference_manifest) == without_format(parquet.preference_manifest)
    a, b = list(parquet.records()), list(wds.records())
    assert len(a) == len(b) == 30 and sum(r.image is not None for r in a) > 10
    for got, want in zip(b, a):
        assert_same_record(got, want)  # every field; ImageRef equality is path + sha256
        assert got.cursor == want.cursor
        if want.image is not None:  # embedded: the image file's bytes, which the sha256 names
            assert want.image.data is None and got.image.data == (world / want.image.path).read_bytes()
    pairs_a, pairs_b = list(parquet.preference_records()), list(wds.preference_records())
    assert len(pairs_a) == len(pairs_b) == 8
    for got, want in zip(pairs_b, pairs_a):
        assert_same_pair(got, want)


def test_units_split_and_resume_identically(parquet, wds):
    assert wds.units() == parquet.units() and len(parquet.units()) == 9  # 3 shards x (4 + 4 + 2)
    assert wds.units("preference") == parquet.units("preference")
    for world_size, seed in [(1, None), (2, None), (3, "0/epoch1"), (4, 7)]:
        for rank in range(world_size):
            full = list(parquet.records(rank, world_size, order_seed=seed))
            for start in (0, 1, 5, len(full) - 1):
                got = list(wds.records(rank, world_size, start=max(start, 0), order_seed=seed))
                assert [(r.sample_id, r.cursor) for r in got] == [(r.sample_id, r.cursor) for r in full[start:]]
    columns = ["input_ids", "image_path"]
    for got, want in zip(wds.records(columns=columns), parquet.records(columns=columns)):
        assert np.array_equal(got.input_ids, want.input_ids) and got.image == want.image
        assert got.topk_ids is None and got.positions is None and got.num_image_tokens is None


def test_inspect_and_verify_read_both_formats(parquet, wds):
    assert verify_cache(wds.path) == [] and verify_cache(parquet.path) == []
    for got, want in zip(wds.stats(), parquet.stats()):
        assert {k: v for k, v in got.items() if not k.startswith("bytes")} == {
            k: v for k, v in want.items() if not k.startswith("bytes")}
    result = runner.invoke(store_cli, ["inspect", str(wds.path)])
    assert result.exit_code == 0 and "part-00001-of-00003" in result.output and "preference pairs: 8" in result.output


# ---------------------------------------------------------------- plain WebDataset, no modkd

PLAIN_READER = """
import io, json, sys
import numpy as np, webdataset as wds, zstandard
urls = json.loads(sys.argv[1])
samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
first = samples[0]
array = np.load(io.BytesIO(zstandard.ZstdDecompressor().decompress(first[sys.argv[2]])))
assert not any(name.startswith("modkd") for name in sys.modules), "modkd was imported"
print(json.dumps({"count": len(samples), "ids": [json.loads(s["json"])["sample_id"] for s in samples],
                  "keys": sorted(set(k for s in samples for k in s if not k.startswith("__"))),
                  "first_key": first["__key__"], "array": array.tolist()}))
"""


def plain_read(urls: list[Path], member: str = "input_ids.npy.zst") -> dict:
    """What the plain `webdataset` package reads from `urls`, and the first sample's `member` decoded with numpy."""
    out = subprocess.run([sys.executable, "-c", PLAIN_READER, json.dumps([str(u) for u in urls]), member],
                         capture_output=True, text=True, check=True, cwd=urls[0].parent)
    return json.loads(out.stdout)


def test_plain_webdataset_reads_the_shards(wds):
    urls = [shard_paths(wds.path, i, 3, fmt="webdataset")[0] for i in range(3)]
    plain = plain_read(urls)
    records = list(wds.records())
    assert plain["count"] == wds.num_records == len(records) == 30
    assert plain["ids"] == [r.sample_id for r in records]
    assert plain["first_key"] == sample_key(records[0].sample_id)
    assert np.array_equal(np.array(plain["array"], dtype=np.int32), records[0].input_ids)
    assert {"json", "input_ids.npy.zst", "ids.bin", "values.bin", "top_logprobs.npy.zst", "tail_mass.npy.zst",
            "image.png"} <= set(plain["keys"])
    pref = plain_read([shard_paths(wds.path, i, 3, "preference", "webdataset")[0] for i in range(3)],
                      "chosen_logprobs.npy.zst")
    pairs = list(wds.preference_records())
    assert pref["count"] == wds.num_preference_records == len(pairs) == 8
    assert pref["ids"] == [p.sample_id for p in pairs]
    assert np.array_equal(np.array(pref["array"], dtype=np.float32), pairs[0].chosen_logprobs)


def test_keys_have_no_dots_and_keep_the_real_id(tmp_path):
    odd = ["a.b", "a/b", "line:12", "ü-x", "a%2Eb", "a_b-c", "long." * 40]  # the last needs a PAX header
    assert sample_key("line:12") == "line%3A12" and sample_key("a_b-c") == "a_b-c"
    assert len({sample_key(s) for s in odd}) == len(odd) and not any("." in sample_key(s) for s in odd)
    rng = np.random.default_rng(0)
    records = [random_record(rng, sample_id, 3) for sample_id in odd]
    write_shard(tmp_path, 0, 1, records, [], row_group_size=4, fmt="webdataset")
    path = shard_paths(tmp_path, 0, 1, fmt="webdataset")[0]
    marker = json.loads(shard_paths(tmp_path, 0, 1)[2].read_text())
    assert marker["format"] == "webdataset" and [u[0] for u in marker["units"]] == [4, 3]
    rows = read_unit(path, "x", marker["units"][1]) + read_unit(path, "x", marker["units"][0], skip=3)
    assert [row["sample_id"] for row in rows] == ["a%2Eb", "a_b-c", "long." * 40, "ü-x"]  # seek, skip within one
    plain = plain_read([path])
    assert plain["ids"] == odd and plain["count"] == len(odd)


def test_verify_checks_embedded_images_and_extract_refuses_embedding_without_a_root(tmp_path, teacher_dir, world):
    image = world / next(p.relative_to(world) for p in sorted(world.rglob("*.png")))
    rng = np.random.default_rng(0)
    records = [random_record(rng, f"r{i}", 3) for i in range(3)]
    for record in records:
        record.image, record.num_image_tokens = ImageRef(image.relative_to(world).as_posix(), sha256_file(image)), 4
    write_shard(tmp_path, 0, 1, records, [], row_group_size=4, fmt="webdataset", image_root=world)
    finalize_manifest(tmp_path, 1, dict(HEADER, settings={**Encoding("topk", VOCAB, k=3).settings(), "format": "webdataset",
                                                       "embed_images": True}))
    assert verify_cache(tmp_path) == []
    path = shard_paths(tmp_path, 0, 1, fmt="webdataset")[0]
    data = path.read_bytes()
    at = data.index(b"IDAT", data.index(b".image.png")) + 10  # in the first embedded image's pixel data
    path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :])
    problems = verify_cache(tmp_path)
    assert "shards/part-00000-of-00001.tar: 1 rows with embedded image bytes differ from image_sha256 (first: row 0)" \
        in problems
    with pytest.raises(ValueError, match="--embed-images needs --format webdataset and --image-root"):
        run(ExtractConfig(teacher=str(teacher_dir), data=world / "train.jsonl", out=tmp_path / "x",
                          format="webdataset", embed_images=True))


# ---------------------------------------------------------------- damage is named


def test_truncated_tar_is_named_by_verify_and_open(wds, tmp_path):
    cache = Path(shutil.copytree(wds.path, tmp_path / "cache"))
    data = (cache / SHARD_1).read_bytes()
    (cache / SHARD_1).write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match=f"{SHARD_1} has {len(data) // 2} bytes but manifest.json records {len(data)}"):
        Cache.open(cache)
    problems = verify_cache(cache)
    assert f"{SHARD_1}: {len(data) // 2} bytes, manifest.json records {len(data)} (truncated or modified)" in problems
    assert any(p.startswith(f"{SHARD_1}: the chunk at byte") and "unreadable" in p for p in problems)
    assert all(p.startswith(SHARD_1) for p in problems)
    result = runner.invoke(store_cli, ["verify", str(cache)])
    assert result.exit_code == 1 and SHARD_1 in result.output


def test_a_changed_byte_is_named_by_verify(wds, tmp_path):
    cache = Path(shutil.copytree(wds.path, tmp_path / "cache"))
    data = bytearray((cache / SHARD_1).read_bytes())
    data[700] ^= 0xFF  # inside the first member's data, same size: only hashing sees it
    (cache / SHARD_1).write_bytes(bytes(data))
    Cache.open(cache)  # the cheap size check passes
    assert f"{SHARD_1}: sha256 differs from manifest.json (file modified or corrupted)" in verify_cache(cache)


# ---------------------------------------------------------------- mod-store convert


def test_convert_round_trip_gives_identical_records_and_manifest(parquet, converted, tmp_path):
    as_wds, back = converted
    assert as_wds.format() == "webdataset" and back.format() == "parquet"
    assert without_format(as_wds.manifest) == without_format(parquet.manifest)
    assert back.manifest == parquet.manifest and back.preference_manifest == parquet.preference_manifest  # bytes too
    assert as_wds.units() == parquet.units() == back.units()
    for cache in (as_wds, back):
        assert verify_cache(cache.path) == []
        for got, want in zip(cache.records(), parquet.records(), strict=True):
            assert_same_record(got, want)
            assert got.image is None or got.image.data is None  # converted without --embed-images
        for got, want in zip(cache.preference_records(), parquet.preference_records(), strict=True):
            assert_same_pair(got, want)
    for part in ("shards", "preference"):  # rejects files copied
        for i in range(3):
            name = f"{part}/part-0000{i}-of-00003.rejects.jsonl"
            assert (as_wds.path / name).read_bytes() == (parquet.path / name).read_bytes()
    again = runner.invoke(store_cli, ["convert", str(parquet.path), str(as_wds.path), "--format", "webdataset"])
    assert again.exit_code == 0 and "[convert]" not in again.output  # resumable: every shard is done already
    refused = runner.invoke(store_cli, ["convert", str(parquet.path), str(as_wds.path), "--format", "parquet"])
    assert refused.exit_code == 1 and "belongs to another cache or conversion" in refused.output


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tokenizer) -> Path:
    return build_model(tmp_path_factory.mktemp("student"), tokenizer, STUDENT_LLM, seed=1)


def train_from(cache: Path, student: Path, out: Path, image_root: Path | None) -> dict:
    cfg = TrainConfig(stage="d2d", cache=cache, student=str(student), out=out, image_root=image_root, max_steps=4,
                      batch_size=4, lr=1e-3, save_every=100, log_every=1, kd_positions="all")
    train(cfg, log=lambda *a: None)
    return load_file(out / "final" / "model.safetensors")


def test_d2d_from_webdataset_gives_bit_identical_weights(parquet, wds, converted, student_dir, world, tmp_path):
    """Parquet (images from the root), WebDataset with references (same root) and WebDataset with embedded
    images and no image root at all: the same order, the same pixels, the same weights."""
    want = train_from(parquet.path, student_dir, tmp_path / "pq", world)
    initial = load_file(student_dir / "model.safetensors")
    assert any(not np.array_equal(want[k].numpy(), initial[k].numpy()) for k in want if k in initial)  # it trained
    for name, cache, root in (("refs", converted[0].path, world), ("embedded", wds.path, None)):
        got = train_from(cache, student_dir, tmp_path / name, root)
        assert got.keys() == want.keys()
        assert all(np.array_equal(got[k].numpy(), want[k].numpy()) for k in want), name


def test_embedded_images_need_no_root_and_are_checked(wds, teacher_dir):
    processor = AutoProcessor.from_pretrained(teacher_dir)
    records = [r for r in wds.records() if r.image is not None][:3]
    pixels = ImageLoader(None, processor.image_processor).pixels(records)
    assert pixels.shape == (3, 3, 48, 48)
    bad = records[0]
    bad.image = ImageRef(bad.image.path, bad.image.sha256, data=bad.image.data[:-1] + b"\0")
    with pytest.raises(ValueError, match="embedded image .* sha256"):
        ImageLoader(None, processor.image_processor).pixels([bad])
