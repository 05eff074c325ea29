"""pytest tests/test_extract.py -q

Extraction correctness: cached top-k equals the teacher's full log_softmax; positions; invariances.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from modkd.store.encoding import LOGPROB_STEP
from modkd.extract.run import ExtractConfig, run
from modkd.store import DISTILL_SCHEMA, POSITION_KINDS, Cache

RESPONSE, INSTRUCTION, IMAGE = (POSITION_KINDS[k] for k in ("response", "instruction", "image"))


def extract(tmp_path: Path, teacher: Path, data: Path, world: Path | None, name: str = "cache", **kw) -> Cache:
    cfg = ExtractConfig(teacher=str(teacher), data=data, out=tmp_path / name, image_root=world, **kw)
    summary = run(cfg)
    assert summary["manifest"] is not None
    return Cache.open(cfg.out)


def by_id(cache: Cache) -> dict:
    return {r.sample_id: r for r in cache.records()}


@torch.no_grad()
def full_logprobs(model, processor, rec, world: Path) -> torch.Tensor:
    """(T, V) fp32: an independent full-vocabulary forward of the same teacher on the cached tokens."""
    inputs = {"input_ids": torch.tensor(rec.input_ids, dtype=torch.long)[None]}
    if rec.image is not None:
        image = Image.open(world / rec.image.path).convert("RGB")
        inputs["pixel_values"] = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    return torch.log_softmax(model(**inputs).logits[0].float(), dim=-1)


@pytest.fixture(scope="module")
def all_positions_cache(tmp_path_factory, teacher_dir, mixed_data, world) -> Cache:
    return extract(tmp_path_factory.mktemp("all"), teacher_dir, mixed_data, world, positions="all", top_k=8)


def test_topk_equals_full_logsoftmax_every_kind(all_positions_cache, teacher_dir, world):
    model = AutoModelForImageTextToText.from_pretrained(teacher_dir).eval()
    processor = AutoProcessor.from_pretrained(teacher_dir)
    seen_kinds, seen_text_only, seen_image = set(), False, False
    for rec in all_positions_cache.records():
        logp = full_logprobs(model, processor, rec, world)  # (T, V)
        assert rec.positions.tolist() == list(range(len(rec.input_ids) - 1))  # "all": every predicting position
        top_lp, top_id = logp[rec.positions].topk(all_positions_cache.top_k, dim=-1)  # (P, k)
        np.testing.assert_array_equal(rec.topk_ids, top_id.numpy())
        np.testing.assert_allclose(rec.topk_logprobs, top_lp.numpy(), atol=LOGPROB_STEP / 2 + 1e-4, rtol=0)  # quantised
        target = logp[rec.positions, torch.as_tensor(rec.input_ids[rec.positions + 1], dtype=torch.long)]  # (P,)
        np.testing.assert_allclose(rec.target_logprobs, target.numpy(), atol=1e-4, rtol=0)
        seen_kinds |= set(rec.position_kinds.tolist())
        seen_text_only |= rec.image is None
        seen_image |= rec.image is not None
        if rec.image is not None:
            assert rec.num_image_tokens == 9  # 48x48 image, 16-px patches, CLS dropped
            assert (rec.position_kinds == IMAGE).sum() == 9
    assert seen_kinds == {RESPONSE, INSTRUCTION, IMAGE} and seen_text_only and seen_image


def test_response_positions_are_exactly_the_assistant_tokens(tmp_path, teacher_dir, mixed_data, world):
    cache = extract(tmp_path, teacher_dir, mixed_data, world)  # default --positions response
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    source = {json.loads(line)["id"]: json.loads(line) for line in mixed_data.read_text().splitlines()}
    multi_turn = 0
    for rec in cache.records():
        assert (rec.position_kinds == RESPONSE).all()
        answers = [t["value"] for t in source[rec.sample_id]["conversations"] if t["from"] == "gpt"]
        predicted = rec.input_ids[rec.positions + 1]  # the tokens these positions predict (the shift)
        assert tok.decode(predicted) == "".join(a + "<|im_end|>" for a in answers)
        # each response run starts right after "<|im_start|>assistant\n"
        starts = rec.positions[np.r_[0, np.flatnonzero(np.diff(rec.positions) > 1) + 1]]
        assert len(starts) == len(answers)
        for t in starts:
            assert tok.decode(rec.input_ids[: t + 1]).endswith("<|im_start|>assistant\n")
        multi_turn += len(answers) > 1
    assert multi_turn > 0


def test_response_plus_instruction_selects_both(tmp_path, teacher_dir, mixed_data, world):
    cache = extract(tmp_path, teacher_dir, mixed_data, world, positions="response+instruction")
    for rec in cache.records():
        kinds = set(rec.position_kinds.tolist())
        assert kinds == {RESPONSE, INSTRUCTION}
        if rec.image is not None:  # no position on an image token, and none missing elsewhere
            assert len(rec.positions) == len(rec.input_ids) - 1 - rec.num_image_tokens
        else:
            assert len(rec.positions) == len(rec.input_ids) - 1


def assert_same_records(a: Cache, b: Cache, atol: float = 1e-5) -> None:
    ra, rb = by_id(a), by_id(b)
    assert list(ra) == list(rb)  # same ids, same order
    for sid, x in ra.items():
        y = rb[sid]
        for field in ("input_ids", "positions", "position_kinds", "topk_ids"):
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field), err_msg=f"{sid}.{field}")
        # each is within LOGPROB_STEP / 2 of its float32 value: two runs may round to neighbouring steps
        np.testing.assert_allclose(x.topk_logprobs, y.topk_logprobs, atol=LOGPROB_STEP + atol, rtol=0)
        np.testing.assert_allclose(x.target_logprobs, y.target_logprobs, atol=atol, rtol=0)
        assert x.image == y.image and x.num_image_tokens == y.num_image_tokens


def test_batch_size_and_shard_count_do_not_change_records(tmp_path, teacher_dir, mixed_data, world):
    one = extract(tmp_path, teacher_dir, mixed_data, world, "b1s1", batch_size=1, shards=1)
    eight = extract(tmp_path, teacher_dir, mixed_data, world, "b8s7", batch_size=8, shards=7)
    assert len(eight.manifest["shards"]) == 7
    assert_same_records(one, eight)


def test_two_workers_write_disjoint_shards_and_the_last_writes_the_manifest(tmp_path, teacher_dir, mixed_data, world):
    out = tmp_path / "workers"
    first = run(ExtractConfig(str(teacher_dir), mixed_data, out, world, shards=4, num_workers=2, worker_index=0))
    assert first["manifest"] is None and first["shards_done_now"] == 2
    second = run(ExtractConfig(str(teacher_dir), mixed_data, out, world, shards=4, num_workers=2, worker_index=1))
    assert second["manifest"] is not None and second["shards_done_now"] == 2
    again = run(ExtractConfig(str(teacher_dir), mixed_data, out, world, shards=4, num_workers=2, worker_index=0))
    assert again["shards_skipped"] == 2 and again["shards_done_now"] == 0
    single = extract(tmp_path, teacher_dir, mixed_data, world, "single", shards=4)
    assert_same_records(Cache.open(out), single, atol=0)


def test_rerun_into_a_cache_with_other_settings_is_refused(tmp_path, teacher_dir, mixed_data, world):
    extract(tmp_path, teacher_dir, mixed_data, world, "c", top_k=4)
    with pytest.raises(ValueError, match="different settings.*settings"):
        run(ExtractConfig(str(teacher_dir), mixed_data, tmp_path / "c", world, top_k=5))


def test_text_only_teacher(tmp_path, text_teacher_dir, mixed_data, world):
    cache = extract(tmp_path, text_teacher_dir, mixed_data, world, positions="all", top_k=5)
    model = AutoModelForCausalLM.from_pretrained(text_teacher_dir).eval()
    records = list(cache.records())
    assert records and all(r.image is None for r in records)
    for rec in records:
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor(rec.input_ids, dtype=torch.long)[None]).logits[0], -1)
        np.testing.assert_allclose(rec.topk_logprobs, logp[rec.positions].topk(5, -1).values.numpy(),
                                   atol=LOGPROB_STEP / 2 + 1e-4)
    rejected = {r["kind"] for r in cache.rejects()}
    assert rejected == {"no_vision_tower"}  # the image records, each with its reason
    t = cache.manifest["totals"]
    assert t["records_in"] == t["records_written"] + t["records_rejected"] == 30


def test_shard_is_plain_parquet_with_the_documented_schema(all_positions_cache):
    shard = all_positions_cache.path / "shards" / "part-00000-of-00001.parquet"
    table = pq.read_table(shard)
    assert table.schema.remove_metadata().equals(DISTILL_SCHEMA.remove_metadata())
    assert pq.ParquetFile(shard).metadata.row_group(0).column(0).compression == "ZSTD"
    assert table.num_rows == all_positions_cache.num_records


def test_backend_choice_and_its_errors(tmp_path, text_teacher_dir, mixed_data):
    """auto is hf where vLLM is not installed (this environment); vllm says how to install it; a top-k above
    the vocabulary is refused before vLLM would start; the vLLM path needs no transformers weights."""
    from modkd.extract.run import resolve_backend
    from modkd.extract.teacher import load_teacher
    from modkd.extract.vllm_backend import VLLMBackend, VLLMOptions

    assert importlib.util.find_spec("vllm") is None, "this test is for the main environment, without vLLM"
    assert resolve_backend("auto") == "hf"
    assert run(ExtractConfig(str(text_teacher_dir), mixed_data, tmp_path / "auto", top_k=4))["backend"] == "hf"
    with pytest.raises(ImportError, match="vllm-cpu-env.sh"):
        run(ExtractConfig(str(text_teacher_dir), mixed_data, tmp_path / "v", backend="vllm"))
    with pytest.raises(ValueError, match="--backend must be one of"):
        run(ExtractConfig(str(text_teacher_dir), mixed_data, tmp_path / "x", backend="tensorrt"))
    light = load_teacher(str(text_teacher_dir), torch.float32, "cpu", load_weights=False)
    full = load_teacher(str(text_teacher_dir), torch.float32, "cpu")
    assert light.model is None and light.fingerprint == full.fingerprint
    vocab = light.fingerprint["vocab_size"]
    with pytest.raises(ValueError, match=f"between 1 and the vocabulary size {vocab}"):
        VLLMBackend(light, vocab + 1, "float32", VLLMOptions())


def test_workers_with_other_paths_to_the_same_files_join_one_extraction(tmp_path, teacher_dir, mixed_data, world):
    """Worker 1 sees the teacher and the images under other paths (another node's mounts): same extraction."""
    out = tmp_path / "joint"
    run(ExtractConfig(str(teacher_dir), mixed_data, out, world, shards=4, num_workers=2, worker_index=0))
    teacher_copy, world_copy = shutil.copytree(teacher_dir, tmp_path / "t"), shutil.copytree(world, tmp_path / "w")
    second = run(ExtractConfig(str(teacher_copy), mixed_data, out, world_copy, shards=4, num_workers=2, worker_index=1))
    assert second["manifest"] is not None
    assert_same_records(Cache.open(out), extract(tmp_path, teacher_dir, mixed_data, world, "single", shards=4), atol=0)
    with pytest.raises(ValueError, match="different settings"):  # different weights are still refused
        broken = shutil.copytree(teacher_dir, tmp_path / "t2")
        weights = broken / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
        run(ExtractConfig(str(broken), mixed_data, out, world, shards=4, num_workers=2, worker_index=1))
