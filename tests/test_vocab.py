"""pytest tests/test_vocab.py -q   # lm_heads with more rows than the tokenizer has tokens (Qwen's padded vocabularies)

Qwen's 7B teachers carry 152,064 lm_head rows for a 151,646-token tokenizer, their 0.5B-1.8B students
151,936. The rows beyond `len(tokenizer)` are no tokens: the cache's distributions are over the tokenizer's
vocabulary, so extraction drops those rows before the log-softmax and top-k, and the student's KL and CE do
the same. Here a teacher with 8 padding rows carries PLANTED logits there, large enough to take most of the
probability if they were not dropped (checked), and a student with 2 padding rows (other row counts, one
tokenizer) trains from its cache. The vLLM backend (its tests need the vLLM environment, as
tests/test_vllm_extract.py) makes vLLM drop the rows itself: its caches equal the hf backend's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, Qwen2Config, Qwen2ForCausalLM

from modkd.store.encoding import LOGPROB_STEP
from modkd.extract.run import ExtractConfig, run
from modkd.extract.topk import topk_logprobs
from modkd.pipelines.toyworld.models import STUDENT_LLM, TEACHER_LLM, build_model, processor
from modkd.store import Cache
from modkd.student.config import TrainConfig
from modkd.student.data import ImageLoader, collate
from modkd.student.model import save_pretrained
from modkd.student.trainer import StudentWithLoss, train
from test_vllm_extract import assert_caches_match, text_data, vllm_extract  # noqa: F401 (text_data: a fixture)

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
                                   atol=LOGPROB_STEP / 2 + 1e-4)  # decoded (store/encoding.py)
        np.testing.assert_allclose(rec.topk_logprobs[:, 0], real.max(-1).values, atol=1e-4)  # the top-1: float32
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


@pytest.fixture(scope="module")
def padded_text_teacher(tmp_path_factory, tokenizer, text_data):
    """A tiny text-only Qwen2, untied as Qwen's 7B, its TEACHER_PADDING rows planted as `padded_model` plants them."""
    out = tmp_path_factory.mktemp("padded_text_teacher")
    V = len(tokenizer)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=V + TEACHER_PADDING, max_position_embeddings=256,
                                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, **TEACHER_LLM))
    records = [json.loads(line) for line in text_data.read_text().splitlines() if line.endswith("}")]  # not "broken"
    texts = [" ".join(turn["value"] for turn in r["conversations"]) for r in records]
    with torch.no_grad():
        model.lm_head.weight[:V].mul_(5.0)  # spread the real logits (as conftest's teachers)
        hidden = torch.cat([model.model(**tokenizer(t, return_tensors="pt")).last_hidden_state[0]
                            for t in texts])  # (N, H)
        m = hidden.mean(0)  # (H,)
        model.lm_head.weight[V:] = PLANTED * m / m.pow(2).sum()  # (padding, H)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def reference_logprobs(model, rec) -> tuple[torch.Tensor, torch.Tensor]:
    """At rec's positions: the log-softmax over the first len(tokenizer) logits (P, V) and the mass the padding rows
    would take if kept (P,), from transformers in this environment: independent of both backends."""
    V = model.config.get_text_config().vocab_size - TEACHER_PADDING
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(rec.input_ids[None], dtype=torch.long)).logits[0]  # (T, V + pad)
    logits = logits[torch.as_tensor(rec.positions, dtype=torch.long)].float()  # (P, V + pad)
    return torch.log_softmax(logits[:, :V], dim=-1), torch.log_softmax(logits, dim=-1)[:, V:].exp().sum(-1)


def test_vllm_drops_the_padding_rows_as_hf_does(vllm_python, tmp_path, padded_text_teacher, text_data, tokenizer):
    """vLLM keeps only the tokenizer's logits (extract/vllm_backend.py), so its cache equals the hf backend's and an
    independent log-softmax over the first len(tokenizer) logits, though the planted rows would win if kept."""
    V = len(tokenizer)
    hf, vl = tmp_path / "hf", tmp_path / "vllm"
    run(ExtractConfig(str(padded_text_teacher), text_data, hf, backend="hf", positions="all", top_k=8))
    proc = vllm_extract(vllm_python, tmp_path, vl, "--teacher", str(padded_text_teacher), "--data", str(text_data),
                        "--positions", "all", "--top-k", "8")
    assert f"vLLM drops the {TEACHER_PADDING} padding rows" in proc.stdout + proc.stderr
    cache = Cache.open(vl)
    assert cache.manifest["teacher"]["vocab_size"] == V + TEACHER_PADDING
    assert cache.manifest["teacher"]["tokenizer_vocab_size"] == V
    assert_caches_match(Cache.open(hf), cache)  # ids, log-probs (1e-4), targets, rejects, manifest
    model = Qwen2ForCausalLM.from_pretrained(padded_text_teacher).eval()
    pad_mass, checked = [], 0
    for rec in cache.records():
        assert int(rec.topk_ids.max()) < V
        real, mass = reference_logprobs(model, rec)
        pad_mass.append(mass)
        np.testing.assert_allclose(rec.topk_logprobs, real.topk(8, dim=-1).values, atol=LOGPROB_STEP / 2 + 1e-4, rtol=0)
        np.testing.assert_allclose(rec.topk_logprobs, real.gather(1, torch.as_tensor(rec.topk_ids, dtype=torch.long)),
                                   atol=LOGPROB_STEP / 2 + 1e-4, rtol=0)  # decoded (store/encoding.py)
        np.testing.assert_allclose(rec.topk_logprobs[:, 0], real.max(-1).values, atol=1e-4, rtol=0)  # float32
        np.testing.assert_allclose(rec.tail_mass, 1 - real.topk(8, dim=-1).values.exp().sum(-1), atol=1e-4, rtol=0)
        targets = torch.as_tensor(rec.input_ids[rec.positions + 1], dtype=torch.long)
        np.testing.assert_allclose(rec.target_logprobs, real.gather(1, targets[:, None])[:, 0], atol=1e-4, rtol=0)
        checked += len(rec.positions)
    assert checked > 100
    taken = int((torch.cat(pad_mass) > 0.9).sum())  # positions where the planted rows would hold > 90% of the mass
    assert taken >= 3, taken  # the test bites: kept, the padding ids would top those positions (3% of them here,
    # 81% before the toy tokenizer stopped reading the eval split: the mean hidden state's direction moved)


def test_vllm_drops_the_padding_rows_of_a_llava_teacher(vllm_python, tmp_path, padded_teacher, padded_cache, mixed_data,
                                                        world):
    """The same through vLLM's LLaVA (its Qwen2 inside), images included, against the hf backend's padded cache."""
    vl = tmp_path / "vllm"
    vllm_extract(vllm_python, tmp_path, vl, "--teacher", str(padded_teacher), "--data", str(mixed_data),
                 "--image-root", str(world), "--positions", "all", "--top-k", "8")
    assert_caches_match(Cache.open(padded_cache), Cache.open(vl))  # padded_cache: checked against the model above


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
