"""pytest tests/test_arch_extract.py -q   # mod-extract (hf backend) on LLaVA-Interleave and LLaVA-OneVision copies

Tiny random copies of the presets' real architectures (tests/arch_models.py): SigLIP + "full" selection
(Interleave, `LlavaForConditionalGeneration`) and anyres tiling with image_newline (OneVision,
`LlavaOnevisionForConditionalGeneration`, images of six sizes, so records hold different numbers of image
tokens and image tensors of different shapes). For each: the cached input_ids are what the model's own
processor gives for the record's conversation and image, every image token's position is stored as an
image position, and the stored top-k and target log-probs equal an independent full-vocabulary
log_softmax of the same model on the processor's inputs at every position (response, instruction, image).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration

import arch_models
from modkd.store.encoding import LOGPROB_STEP
from modkd.extract.hf_backend import batches, shape_key
from modkd.extract.processor import load_processor
from modkd.extract.run import ExtractConfig, run
from modkd.pipelines.toyworld.world import corpus_texts
from modkd.store import POSITION_KINDS, Cache

RESPONSE, INSTRUCTION, IMAGE = (POSITION_KINDS[k] for k in ("response", "instruction", "image"))
TOP_K = 8
N_RECORDS = 14  # text-only, multi-turn and single-image records of the toy world: every kind, a few seconds
CLASSES = {"interleave": LlavaForConditionalGeneration, "onevision": LlavaOnevisionForConditionalGeneration}
TWO_IMAGES = {"id": "two-images", "image": ["a.png", "b.png"],
              "conversations": [{"from": "human", "value": "<image>\n<image>\nwhich one is red?"},
                                {"from": "gpt", "value": "the first."}]}


@pytest.fixture(scope="module", params=arch_models.ARCHS)
def arch(request, tmp_path_factory, world, mixed_data) -> dict:
    """One architecture: its tokenizer, tiny teacher, data (OneVision: resized images, a two-image record)."""
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    tok = arch_models.tokenizer(name, corpus_texts(world))
    records = [json.loads(line) for line in mixed_data.read_text().splitlines()][:N_RECORDS]
    image_root = world
    if name == "onevision":  # anyres: many sizes and aspect ratios, so token counts and tile counts differ
        image_root = tmp / "images"
        image_root.mkdir()
        records = arch_models.write_images(world, image_root, records, arch_models.ONEVISION_SIZES) + [TWO_IMAGES]
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"name": name, "tmp": tmp, "tok": tok, "teacher": arch_models.teacher(tmp / "teacher", name, tok),
            "data": data, "records": {r["id"]: r for r in records}, "image_root": image_root}


@pytest.fixture(scope="module")
def cache(arch) -> Cache:
    out = arch["tmp"] / "cache"
    summary = run(ExtractConfig(teacher=str(arch["teacher"]), data=arch["data"], out=out, image_root=arch["image_root"],
                                positions="all", top_k=TOP_K, batch_size=4))
    assert summary["manifest"] is not None
    return Cache.open(out)


def messages(record: dict) -> list[dict]:
    """The record's conversation as the checkpoints' chat templates take it: typed parts, image parts first."""
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    out = []
    for turn in record["conversations"]:
        text = turn["value"]
        parts = [{"type": "image"}] * text.count("<image>") + [{"type": "text", "text": text.replace("<image>\n", "")}]
        out.append({"role": roles[turn["from"]], "content": parts})
    return out


@torch.no_grad()
def reference(model, processor, record: dict, image_root: Path) -> tuple[list[int], torch.Tensor, int]:
    """(input_ids, (T, V) fp32 full log_softmax, image tokens) of the model on its own processor's inputs."""
    text = processor.apply_chat_template(messages(record), tokenize=False)
    images = [Image.open(image_root / record["image"]).convert("RGB")] if "image" in record else None
    inputs = processor(images=images, text=[text], add_special_tokens=False, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    logp = torch.log_softmax(model(**inputs).logits[0].float(), dim=-1)  # (T, V): every row of the lm_head
    return ids, logp, ids.count(processor.image_token_id)


def test_architecture_is_the_real_one(arch):
    model = AutoModelForImageTextToText.from_pretrained(arch["teacher"])
    config = json.loads((arch["teacher"] / "config.json").read_text())
    assert type(model) is CLASSES[arch["name"]]
    assert config["model_type"] == {"interleave": "llava", "onevision": "llava_onevision"}[arch["name"]]
    assert config["vision_config"]["model_type"] == "siglip_vision_model"
    assert config["vision_feature_select_strategy"] == "full" and config["vision_feature_layer"] == -1
    assert config["text_config"]["model_type"] == "qwen2" and not config["text_config"]["tie_word_embeddings"]
    tok = arch["tok"]
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]) == [0, 1, 2, 3]
    assert config["image_token_index"] == tok.convert_tokens_to_ids("<image>")
    if arch["name"] == "onevision":
        assert config["vision_aspect_ratio"] == "anyres_max_9" and len(config["image_grid_pinpoints"]) == 36
        assert config["video_token_index"] == tok.convert_tokens_to_ids("<video>")
        assert model.model.image_newline.shape == (arch_models.TEACHER_LLM["hidden_size"],)


def test_cached_records_equal_the_models_own_processor_and_full_log_softmax(arch, cache):
    model = AutoModelForImageTextToText.from_pretrained(arch["teacher"]).eval()
    processor = load_processor(arch["teacher"])
    image_token = processor.image_token_id
    seen, counts = set(), set()
    for rec in cache.records():
        source = arch["records"][rec.sample_id]
        ids, logp, n_img = reference(model, processor, source, arch["image_root"])
        assert rec.input_ids.tolist() == ids  # the placeholder expanded exactly as the processor does
        assert rec.num_image_tokens == n_img == int((rec.input_ids == image_token).sum())
        assert rec.positions.tolist() == list(range(len(ids) - 1))  # "all"
        is_image = rec.input_ids[rec.positions] == image_token  # position t sits on an image token
        np.testing.assert_array_equal(rec.position_kinds == IMAGE, is_image)
        top_lp, top_id = logp[rec.positions].topk(TOP_K, dim=-1)  # (P, k)
        np.testing.assert_array_equal(rec.topk_ids, top_id.numpy())
        np.testing.assert_allclose(rec.topk_logprobs, top_lp.numpy(), atol=LOGPROB_STEP / 2 + 1e-4, rtol=0)
        target = logp[rec.positions, torch.as_tensor(rec.input_ids[rec.positions + 1], dtype=torch.long)]  # (P,)
        np.testing.assert_allclose(rec.target_logprobs, target.numpy(), atol=1e-4, rtol=0)
        assert top_lp[:, 0].min() > -12 and (top_lp[:, 0] - top_lp[:, -1]).max() > 0.5  # spread >> the 1/256-nat tolerance: a real comparison
        seen |= set(rec.position_kinds.tolist())
        counts.add(n_img)
    assert seen == {RESPONSE, INSTRUCTION, IMAGE}
    if arch["name"] == "interleave":
        assert counts == {0, (arch_models.INTERLEAVE_IMAGE // arch_models.PATCH) ** 2}  # 16: "full" keeps every patch
    else:
        assert len(counts - {0}) >= 4, counts  # anyres: the token count follows the image's size


def test_manifest_and_rejects(arch, cache):
    m = cache.manifest
    tile = (arch_models.ONEVISION_TILE // arch_models.PATCH) ** 2
    side = arch_models.ONEVISION_TILE // arch_models.PATCH
    expected = {"interleave": 16, "onevision": 2 * tile + side}[arch["name"]]  # OneVision square: base + 1x1 grid + newlines
    assert m["image_tokens_per_image"] == expected
    rejects = {r["sample_id"]: r for r in cache.rejects()}
    if arch["name"] == "onevision":  # multi-image records: one clear reject each, never silence
        assert set(rejects) == {"two-images"} and rejects["two-images"]["kind"] == "image_field"
        assert "multi-image records are not supported" in rejects["two-images"]["reason"]
    else:
        assert not rejects
    t = m["totals"]
    assert t["records_in"] == t["records_written"] + t["records_rejected"] == len(arch["records"])


def test_anyres_batches_group_equal_image_shapes(arch, cache):
    """hf_backend.batches: records whose tile counts differ never share a batch (their pixel_values cannot stack)."""
    from modkd.extract.encode import Encoder
    from modkd.extract.records import RawRecord

    processor = load_processor(arch["teacher"])
    encoder = Encoder(processor.tokenizer, processor, arch["image_root"], max_length=4096)
    encoded = [encoder.encode(RawRecord(i, i + 1, rec)) for i, rec in enumerate(arch["records"].values()) if "two" not in rec["id"]]
    shapes = {shape_key(e) for e in encoded}
    assert len(shapes) >= (4 if arch["name"] == "onevision" else 2)
    covered = []
    for batch in batches(encoded, batch_size=4):
        assert len({shape_key(encoded[i]) for i in batch}) == 1 and len(batch) <= 4
        covered += batch
    assert sorted(covered) == list(range(len(encoded)))
