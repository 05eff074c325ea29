"""pytest tests/test_vocab.py -q   # lm_heads with more rows than the tokenizer has tokens (Qwen's padded vocabularies)

Qwen's 7B teachers carry 152,064 lm_head rows for a 151,646-token tokenizer, their 0.5B-1.8B students
151,936. The rows beyond `len(tokenizer)` are no tokens: the cache's distributions are over the tokenizer's
vocabulary, so extraction drops those rows before the log-softmax and top-k, and the student's KL and CE do
the same. Here a teacher with 8 padding rows carries PLANTED logits there, large enough to take most of the
probability if they were not dropped (checked), and a student with 2 padding rows (other row counts, one
tokenizer) trains from its cache.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText

from modkd.extract.run import ExtractConfig, run
from modkd.extract.teacher import load_teacher
from modkd.extract.topk import topk_logprobs
from modkd.extract.vllm_backend import VLLMBackend, VLLMOptions
from modkd.pipelines.toyworld.models import STUDENT_LLM, TEACHER_LLM, build_model, processor
from modkd.store import Cache
from modkd.student.config import TrainConfig
from modkd.student.data import ImageLoader, collate
from modkd.student.model import save_pretrained
from modkd.student.trainer import StudentWithLoss, train

TEACHER_PADDING, STUDENT_PADDING = 8, 2
PLANTED = 500.0  # logit of a padding row at a typical hidden state; the real ones here are tens at most


def padded_model(out, tokenizer, llm: dict, seed: int, padding: int, plant_from=None):
    """A toy LLaVA whose lm_head has `padding` rows beyond the tokenizer; with `plant_from` (a data file), those
    rows point along the mean hidden state of its texts, so their logits are ~PLANTED where the real ones are
    tens at most (text hidden states share a large common component)."""
    build_model(out, tokenizer, llm, seed=seed, tie=False)
    model = AutoModelForImageTextToText.from_pretrained(out)
    V = len(tokenizer)
    model.resize_token_embeddings(V + padding)
    with torch.no_grad():
        model.get_output_embeddings().weight[:V].mul_(5.0)  # spread the real logits (as conftest's teachers)
        if plant_from is not None:
            records = [json.loads(line) for line in plant_from.read_text().splitlines()]
            texts = [" ".join(turn["value"] for turn in r["conversations"]) for r in records]
            hidden = torch.cat([model.model.language_model(**tokenizer(t, return_tensors="pt")).last_hidden_state[0]
                                for t in texts])  # (N, H)
            m = hidden.mean(0)  # (H,)
            model.get_output_embeddings().weight[V:] = PLANTED * m / m.pow(2).sum()  # (padding, H)
    save_pretrained(model, out)
    processor(tokenizer).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def padded_teacher(tmp_path_factory, tokenizer, mixed_data):
    return padded_model(tmp_path_factory.mktemp("padded_teacher"), tokenizer, TEACHER_LLM, 0, TEACHER_PADDING, mixed_data)


@pytest.fixture(scope="module")
def padded_cache(tmp_path_factory, padded_teacher, mixed_data, world):
    out = tmp_path_factory.mktemp("padded") / "cache"
    run(ExtractConfig(str(padded_teacher), mixed_data, out, world, top_k=8, positions="all"))
    return out


def test_topk_drops_the_padding_rows():
    torch.manual_seed(0)
    V, H = 50, 16
    head = torch.nn.Linear(H, V + 6)
    with torch.no_grad():
        head.bias[V:] = 100.0  # every padding row wins everywhere if it is not dropped
    hidden, targets = torch.randn(20, H), torch.randint(0, V, (20,))
    ids, lps, tgt = topk_logprobs(hidden, head, targets, 8, chunk=7, vocab=V)
    logp = torch.log_softmax(head(hidden)[:, :V], dim=-1)  # (20, V) the reference: the tokenizer's rows only
    assert int(ids.max()) < V
    torch.testing.assert_close(lps, logp.gather(1, ids.long()), rtol=0, atol=1e-6)
    torch.testing.assert_close(lps[:, 0], logp.max(-1).values, rtol=0, atol=1e-6)
    torch.testing.assert_close(tgt, logp.gather(1, targets[:, None])[:, 0], rtol=0, atol=1e-6)
    assert int(topk_logprobs(hidden, head, targets, 6, chunk=7)[0].min()) >= V  # without vocab: the 6 padding rows (control)


def test_extraction_never_stores_a_padding_row(padded_teacher, padded_cache, tokenizer, world):
    V = len(tokenizer)
    cache = Cache.open(padded_cache)
    assert cache.manifest["teacher"]["vocab_size"] == V + TEACHER_PADDING
    assert cache.manifest["teacher"]["tokenizer_vocab_size"] == V
    teacher = AutoModelForImageTextToText.from_pretrained(padded_teacher).eval()
    pad_mass, checked = [], 0
    for rec in cache.records():
        assert int(rec.topk_ids.max()) < V
        pixels = None
        if rec.image is not None:
            pixels = ImageLoader(world, processor(tokenizer).image_processor).pixels([rec])
        with torch.no_grad():
            logits = teacher(input_ids=torch.as_tensor(rec.input_ids[None], dtype=torch.long),
                             pixel_values=pixels).logits[0, rec.positions.astype(np.int64)].float()  # (P, V + pad)
        full = torch.log_softmax(logits, dim=-1)  # over every row, padding included
        pad_mass.append(full[:, V:].exp().sum(-1))
        real = torch.log_softmax(logits[:, :V], dim=-1)  # (P, V) the tokenizer's rows
        np.testing.assert_allclose(rec.topk_logprobs, real.gather(1, torch.as_tensor(rec.topk_ids, dtype=torch.long)),
                                   atol=1e-4)
        targets = torch.as_tensor(rec.input_ids[rec.positions + 1], dtype=torch.long)
        np.testing.assert_allclose(rec.target_logprobs, real.gather(1, targets[:, None])[:, 0], atol=1e-4)
        checked += len(rec.positions)
    assert checked > 100
    taken = (torch.cat(pad_mass) > 0.9).float().mean()  # positions where the planted rows would hold > 90% of the mass
    assert taken > 0.3, taken  # (text positions; image positions' hidden states point elsewhere): the test bites


def test_a_student_with_other_padding_trains_and_ignores_its_own_padding_rows(padded_cache, tokenizer, world, tmp_path):
    student = padded_model(tmp_path / "student", tokenizer, STUDENT_LLM, 1, STUDENT_PADDING)
    cfg = TrainConfig(stage="d2d", cache=padded_cache, student=str(student), out=tmp_path / "run", image_root=world,
                      max_steps=2, batch_size=4, lr=1e-3, save_every=100, log_every=1, lm_weight=1.0)
    final = train(cfg)
    metrics = [json.loads(line) for line in (cfg.out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(np.isfinite(m["loss/kd"]) and m["loss/kd"] > 0 for m in metrics)
    model = AutoModelForImageTextToText.from_pretrained(final)
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer) + STUDENT_PADDING
    batch = collate(list(Cache.open(padded_cache).records())[:6], tokenizer.pad_token_id,
                    ImageLoader(world, processor(tokenizer).image_processor))
    mask = batch.kind_mask("all")
    losses = []
    for planted in (False, True):
        if planted:
            with torch.no_grad():
                model.get_output_embeddings().weight[len(tokenizer):] = 1e3  # huge logits on the student's padding
        losses.append(torch.stack(StudentWithLoss(model, vocab=len(tokenizer))(batch, mask, mask)[:2]).detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)


def test_vllm_refuses_a_padded_lm_head_and_says_why(padded_teacher):
    light = load_teacher(str(padded_teacher), torch.float32, "cpu", load_weights=False)
    with pytest.raises(ValueError, match=r"lm_head has \d+ rows for a \d+-token tokenizer.*--backend hf"):
        VLLMBackend(light, 8, "float32", VLLMOptions())


def test_the_image_processor_fingerprint_names_the_pixel_backend():
    """Without torchvision transformers computes pixels with a PIL class whose resizing differs; its to_dict names
    the same type as the torchvision class, so the fingerprint adds the class actually used."""
    from transformers import CLIPImageProcessor

    from modkd.store.fingerprint import image_processor_sha256

    here = CLIPImageProcessor()  # CLIPImageProcessorPil on a machine without torchvision
    other = type("OtherBackend", (type(here),), {})()  # the same settings, computed by another class
    assert here.to_dict() == {**other.to_dict(), "image_processor_type": here.to_dict()["image_processor_type"]}
    assert image_processor_sha256(here) != image_processor_sha256(other)
    assert image_processor_sha256(here) == image_processor_sha256(CLIPImageProcessor())
