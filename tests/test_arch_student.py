"""pytest tests/test_arch_student.py -q   # mod-student on LLaVA-Interleave- and LLaVA-OneVision-shaped students

For each architecture of tests/arch_models.py, a cache made by the 7B-shaped teacher (3 layers x 128,
untied lm_head) trains the 0.5B-shaped student of the same family (2 layers x 64, tied; same tokenizer,
processor and vision tower shape, so the same image tokens): d2d (dense), d2s (upcycled to Qwen2-MoE
E4T2, OneVision's LLM included) and pd (KTO against the teacher's cached reference log-probs). Each
stage's OUT/final reloads with plain transformers (a subprocess that never imports modkd) as the same
class, with the logits modkd's loader gives; the trainer's checks accept this pair and refuse a student
whose tokenizer differs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import arch_models
from modkd.extract.run import ExtractConfig, run
from modkd.pipelines.toyworld.world import corpus_texts
from modkd.store import Cache
from modkd.student.checks import check_student_matches_cache, vision_tokens_per_image
from modkd.student.config import TrainConfig
from modkd.student.data import ImageLoader, collate
from modkd.student.model import load_student
from modkd.student.trainer import train

N_RECORDS = 12
CLASS = {"interleave": "LlavaForConditionalGeneration", "onevision": "LlavaOnevisionForConditionalGeneration"}


@pytest.fixture(scope="module", params=arch_models.ARCHS)
def family(request, tmp_path_factory, world, mixed_data) -> dict:
    """A teacher, a student of the same family and one cache (distillation: every position; preference pairs)."""
    name = request.param
    tmp = tmp_path_factory.mktemp(f"{name}-student")
    tok = arch_models.tokenizer(name, corpus_texts(world))
    records = [json.loads(line) for line in mixed_data.read_text().splitlines()][:N_RECORDS]
    pairs = [json.loads(line) for line in (world / "pref.jsonl").read_text().splitlines()][:4]
    image_root = world
    if name == "onevision":  # images of several sizes: records hold different numbers of image tokens
        image_root = tmp / "images"
        image_root.mkdir()
        records = arch_models.write_images(world, image_root, records, arch_models.ONEVISION_SIZES)
        pairs = arch_models.write_images(world, image_root, pairs, arch_models.ONEVISION_SIZES[1:])
    data, pref = tmp / "data.jsonl", tmp / "pref.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    pref.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    teacher = arch_models.teacher(tmp / "teacher", name, tok)
    cache = tmp / "cache"
    for source, kw in ((data, {"positions": "all", "top_k": 8}), (pref, {})):
        run(ExtractConfig(teacher=str(teacher), data=source, out=cache, image_root=image_root, **kw))
    return {"name": name, "tmp": tmp, "tok": tok, "cache": cache, "image_root": image_root,
            "student": arch_models.student(tmp / "student", name, tok)}


def config(family: dict, stage: str, student: Path, **kw) -> TrainConfig:
    base = dict(stage=stage, cache=family["cache"], student=str(student), out=family["tmp"] / stage,
                image_root=family["image_root"], max_steps=2, batch_size=4, lr=1e-3, save_every=100, log_every=1,
                lm_weight=1.0 if stage == "d2s" else 0.0, kd_positions="all" if stage != "pd" else "response")
    return TrainConfig(**{**base, **kw})


PLAIN_LOAD = """
import sys, torch
from transformers import AutoModelForImageTextToText
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
batch = torch.load(sys.argv[2])
with torch.no_grad():
    out = model(**batch).logits.float()
assert not any(name == "modkd" or name.startswith("modkd.") for name in sys.modules), "modkd was imported"
torch.save({"class": type(model).__name__, "text": model.config.text_config.model_type, "logits": out}, sys.argv[3])
"""


def plain_logits(final: Path, batch: dict, tmp: Path) -> dict:
    torch.save(batch, tmp / "batch.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(final), str(tmp / "batch.pt"), str(tmp / "out.pt")],
                          cwd=tmp, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp / "out.pt")


def image_batch(family: dict, processor) -> dict:
    """Two image records of the cache through the trainer's own collate (OneVision: two sizes, image_sizes)."""
    records = [r for r in Cache.open(family["cache"]).records() if r.image is not None][:2]
    batch = collate(records, processor.tokenizer.pad_token_id, ImageLoader(family["image_root"], processor.image_processor))
    inputs = {k: v for k, v in batch.model_inputs().items() if v is not None and k != "use_cache"}
    assert ("image_sizes" in inputs) == (family["name"] == "onevision")
    return inputs


def test_checks_accept_the_family_pair_and_refuse_another_tokenizer(family, world):
    cache = Cache.open(family["cache"])
    model, processor = load_student(family["student"])
    tokens = vision_tokens_per_image(model, processor)
    assert tokens == cache.manifest["image_tokens_per_image"]
    check_student_matches_cache(cache, model, processor, "student", "all")  # accepted
    check_student_matches_cache(cache, model, processor, "student", None)  # and for pd
    other = arch_models.tokenizer(family["name"], corpus_texts(world))
    other.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})  # one token more: another tokenizer
    stranger = arch_models.student(family["tmp"] / "stranger", family["name"], other)
    model, processor = load_student(stranger)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        check_student_matches_cache(cache, model, processor, "stranger", "all")


def test_d2d_d2s_pd_from_a_bigger_teacher_reload_with_plain_transformers(family):
    finals = {}
    previous = family["student"]
    for stage in ("d2d", "d2s", "pd"):
        final = train(config(family, stage, previous), log=lambda *a: None)
        metrics = [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == 2 and all(m["grad_norm"] > 0 for m in metrics), metrics
        finals[stage] = previous = final
    for stage, final in finals.items():
        config_json = json.loads((final / "config.json").read_text())
        assert config_json["architectures"] == [CLASS[family["name"]]]
        assert config_json["text_config"]["model_type"] == ("qwen2" if stage == "d2d" else "qwen2_moe")
        model, processor = load_student(final)
        batch = image_batch(family, processor)
        with torch.no_grad():
            ours = model.eval()(**batch).logits.float()
        plain = plain_logits(final, batch, family["tmp"])
        assert plain["class"] == CLASS[family["name"]]
        assert plain["text"] == config_json["text_config"]["model_type"]
        assert ours.abs().max() > 0.5  # spread logits: an equality that means something
        torch.testing.assert_close(plain["logits"], ours, atol=1e-5, rtol=0)
    before, _ = load_student(family["student"])
    after, _ = load_student(finals["d2d"])
    moved = {n for n, p in after.named_parameters() if not torch.equal(p, before.state_dict()[n])}
    assert any(".language_model." in n for n in moved) and not any("vision_tower" in n for n in moved)
    if family["name"] == "onevision":
        assert "model.image_newline" in moved  # trained with the projector
