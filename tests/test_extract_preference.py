"""pytest tests/test_extract_preference.py -q

Preference extraction: the stored ids are exactly what the teacher saw, the stored log-probs are the
teacher's (per token and summed, response tokens only), KTO's mismatched pairing is fixed and stored,
bad pairs are rejected with a reason, reruns resume, and one cache holds both parts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from modkd.extract.run import ExtractConfig, run
from modkd.store import Cache, CacheError, shard_paths, verify_cache


def extract(out: Path, teacher: Path, data: Path, root: Path, **kw) -> dict:
    return run(ExtractConfig(teacher=str(teacher), data=data, out=out, image_root=root, **{"shards": 2, **kw}))


@pytest.fixture(scope="module")
def pref_data(world, tmp_path_factory) -> Path:
    """The toy world's 8 RLAIF-V-style pairs plus 2 LLaVA-style ones with a conversation prefix."""
    records = [json.loads(line) for line in (world / "pref.jsonl").read_text().splitlines()]
    for i, base in enumerate(records[:2]):
        records.append({"id": f"conv-pref-{i}", "image": base["image"], "chosen": base["chosen"],
                        "rejected": base["rejected"], "conversations": [
                            {"from": "human", "value": "<image>\nhow many shapes are there?"},
                            {"from": "gpt", "value": "some."},
                            {"from": "human", "value": base["question"]}]})
    out = tmp_path_factory.mktemp("pref") / "pref.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


@pytest.fixture(scope="module")
def pref_cache(tmp_path_factory, teacher_dir, pref_data, world) -> Path:
    out = tmp_path_factory.mktemp("prefcache") / "cache"
    extract(out, teacher_dir, pref_data, world, batch_size=3)
    return out


def by_id(cache: Path) -> dict:
    return {r.sample_id: r for r in Cache.open(cache).preference_records()}


def test_ids_are_the_chat_template_rendering_and_logprobs_are_the_teachers(pref_cache, pref_data, teacher_dir, world):
    processor = AutoProcessor.from_pretrained(teacher_dir)
    teacher = AutoModelForImageTextToText.from_pretrained(teacher_dir).eval()
    records = by_id(pref_cache)
    raw = {r["id"]: r for r in map(json.loads, pref_data.read_text().splitlines())}
    assert set(records) == set(raw)
    for sample_id in ("pref-000000", "conv-pref-1"):
        rec, data = records[sample_id], raw[sample_id]
        if "conversations" in data:  # the prefix's turns, then the question
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many shapes are there?"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "some."}]},
                        {"role": "user", "content": [{"type": "text", "text": data["conversations"][-1]["value"]}]}]
        else:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": data["question"]}]}]
        image = Image.open(world / data["image"]).convert("RGB")
        for response in ("chosen", "rejected"):
            full = processor.apply_chat_template(
                [*messages, {"role": "assistant", "content": [{"type": "text", "text": data[response]}]}],
                tokenize=False).rstrip()
            inputs = processor(images=[image], text=[full], add_special_tokens=False, return_tensors="pt")
            assert rec.sequence(response).tolist() == inputs["input_ids"][0].tolist()
            tail = processor.tokenizer.decode(getattr(rec, f"{response}_ids"))
            assert tail == data[response] + "<|im_end|>"  # the answer through its end-of-turn token, nothing else
            with torch.no_grad():
                logits = teacher(**inputs).logits[0].float()  # (T, V)
            logp = torch.log_softmax(logits, -1)
            n = len(rec.prompt_ids)
            expected = logp[n - 1 : -1].gather(1, inputs["input_ids"][0, n:, None])[:, 0].numpy()  # (Tx,)
            np.testing.assert_allclose(getattr(rec, f"{response}_logprobs"), expected, atol=2e-5)
            assert getattr(rec, f"{response}_logprob") == pytest.approx(float(expected.astype(np.float64).sum()), abs=1e-4)
        assert rec.num_image_tokens == (rec.prompt_ids == processor.image_token_id).sum() > 0


def test_mismatched_pair_is_another_records_chosen_in_the_same_shard(pref_cache, pref_data):
    records = by_id(pref_cache)
    raw = [json.loads(line) for line in pref_data.read_text().splitlines()]
    shard_of = {r["id"]: i * 2 // len(raw) for i, r in enumerate(raw)}  # 2 contiguous shards
    for rec in records.values():
        partner = records[rec.mismatched_from]
        assert rec.mismatched_from != rec.sample_id and shard_of[rec.mismatched_from] == shard_of[rec.sample_id]
        np.testing.assert_array_equal(rec.mismatched_ids, partner.chosen_ids)
        assert rec.mismatched_logprob == pytest.approx(float(rec.mismatched_logprobs.astype(np.float64).sum()))
    assert records["pref-000001"].mismatched_from == "pref-000000"  # the nearest earlier record
    assert records["pref-000000"].mismatched_from == raw[len(raw) // 2 - 1]["id"]  # cyclic within shard 0


def test_batch_size_does_not_change_the_records(tmp_path, pref_cache, teacher_dir, pref_data, world):
    extract(tmp_path / "b1", teacher_dir, pref_data, world, batch_size=1)
    ours, theirs = by_id(pref_cache), by_id(tmp_path / "b1")
    for sample_id, rec in ours.items():
        other = theirs[sample_id]
        for response in ("chosen", "rejected", "mismatched"):
            np.testing.assert_array_equal(rec.sequence(response), other.sequence(response))
            np.testing.assert_allclose(getattr(rec, f"{response}_logprobs"), getattr(other, f"{response}_logprobs"),
                                       atol=1e-5)


def test_rerun_redoes_only_the_missing_shard_and_gives_the_same_bytes(tmp_path, teacher_dir, pref_data, world):
    out = tmp_path / "cache"
    extract(out, teacher_dir, pref_data, world)
    parquet, _, done = shard_paths(out, 1, 2, "preference")
    before = parquet.read_bytes()
    done.unlink()
    parquet.unlink()
    summary = extract(out, teacher_dir, pref_data, world)
    assert (summary["shards_skipped"], summary["shards_done_now"]) == (1, 1)
    assert parquet.read_bytes() == before


def test_distillation_and_preference_parts_share_one_cache(tmp_path, teacher_dir, pref_data, mixed_data, world):
    out = tmp_path / "cache"
    extract(out, teacher_dir, pref_data, world)
    only_pref = Cache.open(out)
    assert only_pref.manifest is None and only_pref.num_preference_records == 10
    with pytest.raises(CacheError, match="holds no distillation records"):
        only_pref.records()
    extract(out, teacher_dir, mixed_data, world, shards=3)
    both = Cache.open(out)
    assert both.num_records == 30 and both.num_preference_records == 10
    assert both.preference_manifest["settings"]["kind"] == "preference"
    assert both.preference_manifest["tokenizer_sha256"] == both.manifest["tokenizer_sha256"]
    assert verify_cache(out) == []


def test_verify_finds_a_tampered_preference_sum(tmp_path, teacher_dir, pref_data, world):
    import pyarrow.parquet as pq

    out = tmp_path / "cache"
    extract(out, teacher_dir, pref_data, world)
    parquet = shard_paths(out, 0, 2, "preference")[0]
    table = pq.read_table(parquet)
    sums = table.column("chosen_logprob").to_pylist()
    sums[0] += 1.0
    index = table.schema.get_field_index("chosen_logprob")
    table = table.set_column(index, table.schema.field(index), [sums])
    pq.write_table(table, parquet, compression="zstd")
    problems = verify_cache(out)
    assert any("preference/manifest.json records" in p for p in problems)  # size or hash differs
    assert any("chosen_logprob != sum of chosen_logprobs" in p for p in problems)


def test_every_bad_pair_is_rejected_with_its_reason(tmp_path, teacher_dir, world):
    image = "images/000000.png"
    good = {"image": image, "question": "describe the image.", "chosen": "a red circle.", "rejected": "a blue square."}
    cases = {
        "no-chosen": ({"image": image, "question": "describe.", "rejected": "a blue square."}, "missing_field"),
        "empty-rejected": ({**good, "rejected": "  "}, "empty_response"),
        "identical": ({**good, "rejected": "a red circle."}, "identical_pair"),
        "no-prompt": ({"image": image, "chosen": "a.", "rejected": "b."}, "missing_field"),
        "prefix-ends-with-gpt": ({**good, "conversations": [{"from": "human", "value": "<image>\nhi"},
                                                            {"from": "gpt", "value": "hello"}]}, "prompt_turns"),
        "prefix-no-placeholder": ({**good, "conversations": [{"from": "human", "value": "hi"}]}, "image_placeholders"),
        "escape": ({**good, "image": "../outside.png"}, "image_outside_root"),
        "missing-image": ({**good, "image": "images/nope.png"}, "image_missing"),
    }
    lines = [json.dumps({"id": "good-0", **good}), json.dumps({"id": "good-1", **good, "chosen": "a green circle."})]
    lines += [json.dumps({"id": name, **record}) for name, (record, _) in cases.items()]
    lines.append("{not json")
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    manifest = extract(tmp_path / "cache", teacher_dir, data, world, shards=1)["manifest"]
    rejects = {r["sample_id"]: r for r in Cache.open(tmp_path / "cache").rejects("preference")}
    assert {name: rejects[name]["kind"] for name in cases} == {name: kind for name, (_, kind) in cases.items()}
    assert rejects["line:11"]["kind"] == "malformed"
    assert manifest["totals"]["records_written"] == 2  # the two good ones, each the other's KTO partner
    assert manifest["totals"]["records_in"] == manifest["totals"]["records_written"] + manifest["totals"]["records_rejected"]


def test_a_shard_with_one_usable_record_rejects_it_for_want_of_a_kto_partner(tmp_path, teacher_dir, world):
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"id": "alone", "image": "images/000000.png", "question": "describe the image.",
                                "chosen": "a red circle.", "rejected": "a blue square."}) + "\n")
    manifest = extract(tmp_path / "cache", teacher_dir, data, world, shards=1)["manifest"]
    assert manifest["rejects"] == {"no_mismatch": 1}
