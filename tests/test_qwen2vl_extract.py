"""pytest tests/test_qwen2vl_extract.py -q

`mod-extract` (hf backend) on tiny random Qwen2-VL and Qwen2.5-VL teachers (tests/qwen2vl_model.py): images of
four sizes (dynamic resolution: 4 to 15 image tokens each, one image downscaled by max_pixels, one upscaled by
min_pixels), text-only records, a video record. The cache must hold exactly the ids the checkpoint's own
processor makes, and top-k / target log-probs equal to an independent full-vocabulary log_softmax of the model
called directly with the processor's outputs (pixel_values, image_grid_thw, mm_token_type_ids), at every
position kind; batching images of different sizes together must not change a record.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from modkd.store.encoding import LOGPROB_STEP
from modkd.extract.hf_backend import batches, shape_key
from modkd.extract.processor import load_processor
from modkd.extract.run import ExtractConfig, run
from modkd.store import POSITION_KINDS, Cache
from qwen2vl_model import FAMILIES, build

RESPONSE, INSTRUCTION, IMAGE = (POSITION_KINDS[k] for k in ("response", "instruction", "image"))
TOP_K = 8
# (width, height) -> image tokens: smart_resize to multiples of 28 px within [56*56, 16*28*28] px, one token per 28x28
IMAGES = {"square.png": ((56, 56), 4), "wide.png": ((140, 84), 15), "big.png": ((200, 300), 12),
          "tiny.png": ((30, 20), 6)}

RECORDS = [
    {"id": "square", "image": "square.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the picture?"},
        {"from": "gpt", "value": "A red square on a white ground."}]},
    {"id": "wide", "image": "wide.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe it."},
        {"from": "gpt", "value": "A blue circle."},
        {"from": "human", "value": "And the ground?"},
        {"from": "gpt", "value": "It is white."}]},
    {"id": "big", "image": "big.png", "conversations": [
        {"from": "system", "value": "You describe pictures."},
        {"from": "human", "value": "<image>\nWhat is in the picture?"},
        {"from": "gpt", "value": "A blue square and a red circle."}]},
    {"id": "tiny", "image": "tiny.png", "conversations": [
        {"from": "human", "value": "What is this?\n<image>"},
        {"from": "gpt", "value": "A red circle."}]},
    {"id": "text", "conversations": [
        {"from": "human", "value": "Name a colour."},
        {"from": "gpt", "value": "Blue."}]},
    {"id": "text-2", "conversations": [
        {"from": "human", "value": "What is a square?"},
        {"from": "gpt", "value": "A shape."},
        {"from": "human", "value": "And a circle?"},
        {"from": "gpt", "value": "A round shape."}]},
    {"id": "video", "video": "clip.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhat happens?"},
        {"from": "gpt", "value": "A circle moves."}]},
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """(data file, image root): random-noise images of four sizes and the records above."""
    root = tmp_path_factory.mktemp("qwen2vl-data")
    rng = np.random.default_rng(0)
    for name, ((w, h), _) in IMAGES.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path, root


def texts() -> list[str]:
    return [t["value"].replace("<image>", "") for r in RECORDS for t in r["conversations"]]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def teacher(request, tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp(request.param), texts(), request.param)


@pytest.fixture(scope="module")
def caches(teacher, data, tmp_path_factory) -> tuple[Cache, Cache]:
    """Every position of every record, batch size 8 (all images in one batch) and batch size 1."""
    path, root = data
    out = tmp_path_factory.mktemp("caches")
    made = []
    for b in (8, 1):
        cfg = ExtractConfig(str(teacher), path, out / f"b{b}", root, positions="all", top_k=TOP_K, batch_size=b)
        assert run(cfg)["manifest"] is not None
        made.append(Cache.open(cfg.out))
    return made[0], made[1]


def reference_inputs(processor, rec: dict, root: Path) -> dict:
    """The processor's own outputs for a record, from chat messages built here (not by the encoder)."""
    messages = []
    for turn in rec["conversations"]:
        role = {"human": "user", "gpt": "assistant", "system": "system"}[turn["from"]]
        parts = []
        for j, text in enumerate(turn["value"].split("<image>")):
            if j:
                parts.append({"type": "image"})
            if text.strip("\n"):
                parts.append({"type": "text", "text": text.strip("\n")})
        messages.append({"role": role, "content": parts})
    text = processor.apply_chat_template(messages, tokenize=False)
    images = [Image.open(root / rec["image"]).convert("RGB")] if "image" in rec else None
    return processor(images=images, text=[text], return_tensors="pt")


def test_topk_equals_the_models_own_full_logsoftmax(caches, teacher, data):
    cache = caches[0]
    path, root = data
    model = AutoModelForImageTextToText.from_pretrained(teacher).eval()
    assert type(model).__name__ in {"Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"}
    processor = load_processor(teacher)
    vocab = len(processor.tokenizer)
    source = {r["id"]: r for r in RECORDS}
    records = list(cache.records())
    assert sorted(r.sample_id for r in records) == sorted(i for i in source if i != "video")
    for rec in records:
        inputs = reference_inputs(processor, source[rec.sample_id], root)
        np.testing.assert_array_equal(rec.input_ids, inputs["input_ids"][0].numpy(), err_msg=rec.sample_id)
        with torch.no_grad():
            logits = model(**inputs).logits[0, :, :vocab].float()  # (T, V) over the tokenizer's vocabulary
        logp = torch.log_softmax(logits, dim=-1)
        assert rec.positions.tolist() == list(range(len(rec.input_ids) - 1))
        top_lp, top_id = logp[rec.positions].topk(TOP_K, dim=-1)  # (P, k)
        np.testing.assert_array_equal(rec.topk_ids, top_id.numpy(), err_msg=rec.sample_id)
        np.testing.assert_allclose(rec.topk_logprobs, top_lp.numpy(), atol=LOGPROB_STEP / 2 + 1e-4, rtol=0,
                                   err_msg=rec.sample_id)
        target = logp[rec.positions, torch.as_tensor(rec.input_ids[rec.positions + 1], dtype=torch.long)]  # (P,)
        np.testing.assert_allclose(rec.target_logprobs, target.numpy(), atol=1e-4, rtol=0, err_msg=rec.sample_id)

        is_image = rec.input_ids[rec.positions] == processor.image_token_id  # (P,)
        np.testing.assert_array_equal(rec.position_kinds == IMAGE, is_image, err_msg=rec.sample_id)
        if "image" in source[rec.sample_id]:
            grid = inputs["image_grid_thw"][0]
            expected = IMAGES[source[rec.sample_id]["image"]][1]
            assert rec.num_image_tokens == is_image.sum() == int(grid.prod()) // 4 == expected, rec.sample_id
            run_start = int(np.flatnonzero(is_image)[0])  # one run, between <|vision_start|> and <|vision_end|>
            tok = processor.tokenizer
            assert tok.convert_ids_to_tokens(int(rec.input_ids[run_start - 1])) == "<|vision_start|>"
            assert tok.convert_ids_to_tokens(int(rec.input_ids[run_start + expected])) == "<|vision_end|>"
        else:
            assert rec.image is None and rec.num_image_tokens == 0 and not is_image.any()
        answers = [t["value"] for t in source[rec.sample_id]["conversations"] if t["from"] == "gpt"]
        response = rec.positions[rec.position_kinds == RESPONSE]
        assert processor.tokenizer.decode(rec.input_ids[response + 1]) == "".join(a + "<|im_end|>" for a in answers)
    assert {r.num_image_tokens for r in records} == {0, 4, 6, 12, 15}  # four image sizes, four token counts


def test_images_of_any_size_batch_together_and_change_nothing(caches):
    """Batch size 8 puts the four images (different patch counts) in one forward; batch size 1 one each."""
    a, b = ({r.sample_id: r for r in c.records()} for c in caches)
    assert list(a) == list(b)
    for sid, x in a.items():
        y = b[sid]
        for field in ("input_ids", "positions", "position_kinds", "topk_ids"):
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field), err_msg=f"{sid}.{field}")
        np.testing.assert_allclose(x.topk_logprobs, y.topk_logprobs, atol=LOGPROB_STEP + 1e-5, rtol=0, err_msg=sid)
        np.testing.assert_allclose(x.target_logprobs, y.target_logprobs, atol=1e-5, rtol=0, err_msg=sid)


def test_manifest_and_rejects(caches):
    cache = caches[0]
    assert cache.manifest["image_tokens_per_image"] is None  # dynamic resolution: per record only
    rejects = list(cache.rejects())
    assert [(r["sample_id"], r["kind"]) for r in rejects] == [("video", "video")]
    assert "video records are not supported" in rejects[0]["reason"]
    t = cache.manifest["totals"]
    assert t["records_in"] == len(RECORDS) and t["records_written"] == len(RECORDS) - 1


def test_batching_groups_image_tensors_that_concatenate():
    """Qwen2-VL records of any patch count share a batch; LLaVA records only with the same (C, H, W)."""
    from modkd.extract.encode import Encoded

    def enc(n: int, inputs: dict) -> Encoded:
        return Encoded(f"r{n}", [1] * (10 + n), np.zeros(10 + n, np.int8), inputs, None, 0)

    qwen = [enc(n, {"pixel_values": torch.zeros(4 * n, 1176), "image_grid_thw": torch.tensor([[1, 2, 2 * n]])})
            for n in (1, 3, 5)]
    llava = [enc(n, {"pixel_values": torch.zeros(1, 3, s, s)}) for n, s in ((2, 48), (4, 48), (6, 32))]
    text = [enc(7, {})]
    groups = [sorted(b) for b in batches(qwen + llava + text, 8)]
    assert sorted(groups) == [[0, 1, 2], [3, 4], [5], [6]]
    assert shape_key(qwen[0]) == (("image_grid_thw", (3,)), ("pixel_values", (1176,)))


def test_the_processor_class_is_found_where_hub_checkpoints_keep_it(teacher, tmp_path):
    """The Hub's Qwen2-VL checkpoints have no processor_config.json (transformers 5's file): their
    processor_class sits in preprocessor_config.json. Without torchvision the image-only fallback must find it."""
    import json
    import shutil

    hub = shutil.copytree(teacher, tmp_path / "hub_layout")
    config = json.loads((hub / "processor_config.json").read_text())
    (hub / "processor_config.json").unlink()
    pre = hub / "preprocessor_config.json"
    pre.write_text(json.dumps({**(json.loads(pre.read_text()) if pre.is_file() else config.get("image_processor", {})),
                               "processor_class": config["processor_class"]}))
    processor = load_processor(hub)
    assert type(processor).__mro__[2].__name__ == config["processor_class"]
    assert processor.image_processor is not None and processor.tokenizer is not None
