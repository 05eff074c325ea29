"""pytest tests/test_llava_kd.py -q

LLaVA-KD (llava-kd Sec. 3.3) from the cache: RDist's loss as mathematical properties (0 for identical
matrices, invariant to a positive scale of the logits, gradient equal to autograd of the direct Y Y^T form,
the trainer's batched form equal to the per-record direct form in value and gradient, float64), the relation
matrices the extractor stores (equal to the teacher's own logits' Gram, fp16 tolerance) and what `mod-store
inspect` says of them, L_vis reading exactly the image positions, what dpt and dft train, and the refusal of a
cache that lacks their inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText

from modkd.extract.run import ExtractConfig, run
from modkd.pipelines.recipe import stage_config
from modkd.pipelines.toyworld.models import STUDENT_LLM, build_model
from modkd.store import Cache
from modkd.store.relation import decode_relation, encode_relation
from modkd.student.data import ImageLoader, collate
from modkd.student.losses import blocks, embedding_relation, logit_relation, relation_loss
from modkd.student.model import load_student, trainable_names
from modkd.student.trainer import StudentWithLoss, train


def direct_relation_loss(hidden, weight, r_t):
    """Eq. 4-5 written out: the full (n, V) logits, their Gram, 1 - cosine."""
    y = hidden @ weight.T  # (n, V)
    r_s = y @ y.T  # (n, n)
    return 1 - F.cosine_similarity(r_s.reshape(-1), r_t.reshape(-1), dim=0)


# ---- the loss: properties ----

def test_relation_loss_is_zero_for_identical_matrices():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(9, 16, generator=g), torch.randn(50, 16, generator=g)
    r = logit_relation(h, w)
    assert r.shape == (9, 9) and torch.allclose(r, r.T)
    assert abs(relation_loss(r, r).item()) < 1e-6
    assert relation_loss(r, torch.randn(9, 9, generator=g)).item() > 0.1


@pytest.mark.parametrize("scale", [1e-3, 0.5, 7.0, 300.0])
def test_relation_loss_is_invariant_to_a_positive_scale_of_the_logits(scale):
    g = torch.Generator().manual_seed(1)
    h, w, r_t = torch.randn(9, 16, generator=g), torch.randn(50, 16, generator=g), torch.randn(9, 9, generator=g)
    r_t = r_t @ r_t.T
    base = relation_loss(logit_relation(h, w), r_t)
    scaled = relation_loss(logit_relation(h, scale * w), r_t)  # logits scale by `scale`, R by its square
    torch.testing.assert_close(scaled, base, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(relation_loss(logit_relation(h, w), scale * r_t), base, rtol=1e-5, atol=1e-6)


def test_relation_loss_gradient_equals_autograd_of_the_direct_form():
    g = torch.Generator().manual_seed(2)
    h0, w0 = torch.randn(7, 12, generator=g), torch.randn(40, 12, generator=g)
    r_t = torch.randn(7, 40, generator=g)
    r_t = r_t @ r_t.T
    grads = []
    for fn in (lambda h, w: relation_loss(logit_relation(h, w), r_t), lambda h, w: direct_relation_loss(h, w, r_t)):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fn(h, w)
        loss.backward()
        grads.append((loss.detach(), h.grad, w.grad))
    (l1, gh1, gw1), (l2, gh2, gw2) = grads
    assert l1.item() > 0.01
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh1, gh2, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw1, gw2, rtol=1e-4, atol=1e-6)
    # and in float64, against finite differences
    hd, wd = h0.double().requires_grad_(), w0.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda h, w: direct_relation_loss(h, w, r_t.double()), (hd, wd))


@pytest.mark.parametrize("form", ["logits", "embeddings"])
def test_the_batched_relation_loss_equals_the_per_record_direct_form_in_value_and_gradient(form):
    """The trainer's one-call form (records zero-padded to the largest N_p, one Gram per batch) against Eq. 4-5
    written out record by record (explicit (n, V) logits for `logits`), float64: the same value and gradients."""
    g = torch.Generator().manual_seed(4)
    sizes = [9, 4, 9, 1, 6]  # unequal N_p (anyres towers), one single-token image
    h0 = torch.randn(sum(sizes), 12, generator=g, dtype=torch.float64)  # (M, H) the batch's image-token rows
    w0 = torch.randn(40, 12, generator=g, dtype=torch.float64)  # (V, H)
    targets = []
    for n in sizes:
        a = torch.randn(n, 30, generator=g, dtype=torch.float64)
        targets.append(a @ a.T)  # (n, n) symmetric, as the cache's
    flat_targets = torch.cat([t.reshape(-1) for t in targets])  # (sum n^2,) as Batch.relation_targets

    def per_record(h, w):
        total, start = 0.0, 0
        for n, r_t in zip(sizes, targets):
            x = h[start : start + n]  # (n, H)
            if form == "logits":
                y = x @ w.T  # (n, V)
                r_s = y @ y.T
            else:
                e = x / x.norm(dim=-1, keepdim=True)
                r_s = e @ e.T
            total = total + 1 - F.cosine_similarity(r_s.reshape(-1), r_t.reshape(-1), dim=0)
            start += n
        return total

    def batched(h, w):
        x = blocks(h, torch.tensor(sizes))  # (R, 9, H)
        r_s = logit_relation(x, w) if form == "logits" else embedding_relation(x)  # (R, 9, 9)
        return relation_loss(r_s, blocks(flat_targets, torch.tensor(sizes), square=True)).sum()

    results = []
    for fn in (per_record, batched):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fn(h, w)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad if form == "logits" else None))
    (l1, gh1, gw1), (l2, gh2, gw2) = results
    assert l2.dtype == torch.float64 and l1.item() > 0.05
    torch.testing.assert_close(l2, l1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh2, gh1, rtol=1e-10, atol=1e-12)
    if form == "logits":
        torch.testing.assert_close(gw2, gw1, rtol=1e-10, atol=1e-12)


def test_blocks_pads_records_with_zeros_and_keeps_their_order():
    sizes = torch.tensor([2, 3])
    rows = torch.arange(10.0).reshape(5, 2)  # (5, 2): record 0 rows 0-1, record 1 rows 2-4
    padded = blocks(rows, sizes)
    assert padded.shape == (2, 3, 2)
    assert torch.equal(padded[0, :2], rows[:2]) and torch.equal(padded[0, 2], torch.zeros(2))
    assert torch.equal(padded[1], rows[2:])
    mats = torch.cat([torch.arange(4.0), 10 + torch.arange(9.0)])  # a 2 x 2 and a 3 x 3, row-major
    square = blocks(mats, sizes, square=True)
    assert torch.equal(square[0, :2, :2], torch.arange(4.0).view(2, 2)) and square[0, 2].abs().sum() == 0
    assert square[0, :, 2].abs().sum() == 0 and torch.equal(square[1], 10 + torch.arange(9.0).view(3, 3))


def test_a_zero_matrix_gives_loss_one_not_nan():
    z = torch.zeros(4, 4, requires_grad=True)
    loss = relation_loss(z, torch.eye(4))
    loss.backward()
    assert loss.item() == 1.0 and torch.isfinite(z.grad).all()


def test_embedding_relation_is_a_cosine_self_correlation():
    e = torch.randn(9, 8, generator=torch.Generator().manual_seed(3))
    r = embedding_relation(e)
    torch.testing.assert_close(torch.diagonal(r), torch.ones(9))
    torch.testing.assert_close(embedding_relation(5.0 * e), r)
    assert r.abs().max() <= 1 + 1e-6


def test_stored_relation_round_trips_at_unit_norm_in_float16():
    a = np.random.default_rng(0).normal(size=(9, 300))
    r = (a @ a.T) * 1e4  # raw logit Grams overflow float16; the stored form is scaled to unit norm
    back = decode_relation(encode_relation(r))
    assert back.shape == (9, 9) and np.allclose(back, back.T)
    np.testing.assert_allclose(back, r / np.linalg.norm(r), rtol=2e-3, atol=1e-5)
    assert decode_relation(b"") is None


# ---- the cache and the trainer, on the tiny teacher and student ----

@pytest.fixture(scope="module")
def rel_cache(tmp_path_factory, teacher_dir, mixed_data, world) -> Path:
    out = tmp_path_factory.mktemp("rel") / "cache"
    run(ExtractConfig(teacher=str(teacher_dir), data=mixed_data, out=out, image_root=world, shards=2, top_k=8,
                      positions="all", relation="logits", row_group_size=4))
    return out


@pytest.fixture(scope="module")
def plain_caches(tmp_path_factory, teacher_dir, mixed_data, world) -> dict[str, Path]:
    """Caches without relation matrices: image positions stored (all) and not (response)."""
    tmp = tmp_path_factory.mktemp("plain")
    data = tmp / "few.jsonl"
    data.write_text("".join(line + "\n" for line in mixed_data.read_text().splitlines()[:8]))
    for positions in ("all", "response"):
        run(ExtractConfig(teacher=str(teacher_dir), data=data, out=tmp / positions, image_root=world, top_k=4,
                          positions=positions))
    return {p: tmp / p for p in ("all", "response")}


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tokenizer) -> Path:
    return build_model(tmp_path_factory.mktemp("student"), tokenizer, STUDENT_LLM, seed=1)


def test_the_cache_holds_the_teachers_logit_relation(rel_cache, teacher_dir, world):
    cache = Cache.open(rel_cache)
    assert cache.manifest["settings"]["relation"] == "logits"
    teacher, processor = load_student(teacher_dir)
    image_id = teacher.config.image_token_id
    records = list(cache.records())
    with_image = [r for r in records if r.image is not None]
    assert all(r.relation is None for r in records if r.image is None) and len(with_image) > 10
    b = collate(with_image[:4], processor.tokenizer.pad_token_id, ImageLoader(world, processor.image_processor))
    with torch.no_grad():
        logits = teacher.eval()(**b.model_inputs()).logits  # (B, T, V)
    for row, rec in enumerate(with_image[:4]):
        idx = (b.input_ids[row] == image_id).nonzero()[:, 0]
        assert rec.relation.shape == (idx.numel(), idx.numel()) == (rec.num_image_tokens,) * 2
        y = logits[row, idx].double()  # (N_p, V)
        r = (y @ y.T).numpy()
        np.testing.assert_allclose(rec.relation, r / np.linalg.norm(r), rtol=3e-3, atol=2e-4)


def test_relation_needs_the_hf_backend(tmp_path, teacher_dir, mixed_data, world, monkeypatch):
    monkeypatch.setattr("modkd.extract.run.resolve_backend", lambda choice: "vllm")
    with pytest.raises(ValueError, match="--backend hf"):
        run(ExtractConfig(teacher=str(teacher_dir), data=mixed_data, out=tmp_path / "c", image_root=world,
                          relation="logits", backend="vllm"))


def test_vis_reads_exactly_the_image_positions_and_rel_equals_the_direct_form(rel_cache, student_dir, world):
    model, processor = load_student(student_dir)
    records = [r for r in Cache.open(rel_cache).records()][:6]
    assert any(r.image is None for r in records) and any(r.image is not None for r in records)
    b = collate(records, processor.tokenizer.pad_token_id, ImageLoader(world, processor.image_processor))
    image_id = model.config.image_token_id
    with torch.no_grad():
        logits = model.eval()(**b.model_inputs()).logits.float()  # (B, T, V)
    flat_logits = logits.reshape(-1, logits.shape[-1])  # (B * T, V)
    # reference: the positions whose token is an image token, found from input_ids alone (not the cache's kinds)
    is_image = b.input_ids.reshape(-1)[b.flat_positions] == image_id  # (N,)
    logq = torch.log_softmax(flat_logits[b.flat_positions], -1).gather(1, b.target_ids)  # (N, k)
    p = b.target_probs
    kl = torch.where(p > 0, p * (p.clamp(min=1e-30).log() - logq), torch.zeros_like(p)).sum(-1)  # (N,)
    reference = kl[is_image].sum()
    rel_ref = 0.0
    sizes, offset, start = b.relation_sizes.tolist(), 0, 0
    image_rows = (b.input_ids.reshape(-1) == image_id).nonzero()[:, 0]
    for n in sizes:
        y = flat_logits[image_rows[start : start + n]]  # (n, V)
        r_t = b.relation_targets[offset : offset + n * n].view(n, n)
        rel_ref += (1 - F.cosine_similarity((y @ y.T).reshape(-1), r_t.reshape(-1), dim=0)).item()
        start, offset = start + n, offset + n * n
    wrapped = StudentWithLoss(model, relation="logits")
    none = torch.zeros_like(is_image)
    vis_mask = b.kind_is("image")
    assert vis_mask.sum() > 0 and torch.equal(vis_mask, is_image)
    with torch.no_grad():
        _, _, _, vis, rel = wrapped(b, none, none, None, vis_mask)
        shifted = wrapped(b, none, none, None, vis_mask.roll(1))[3]  # one position off
    torch.testing.assert_close(vis, reference, rtol=1e-5, atol=1e-5)
    assert not torch.isclose(shifted, reference, rtol=1e-3)
    assert len(sizes) == sum(r.image is not None for r in records)
    torch.testing.assert_close(rel.item(), rel_ref, rtol=1e-4, atol=1e-5)
    assert rel.item() > 1e-4  # raw-logit Grams share a large common component: cosines sit near 1


def test_dpt_trains_the_projector_only_and_dft_the_projector_and_llm(student_dir):
    model, _ = load_student(student_dir)
    dpt, dft = set(trainable_names(model, "dpt")), set(trainable_names(model, "dft"))
    assert dpt and all("multi_modal_projector" in n for n in dpt)
    assert dpt < dft and any(".language_model." in n for n in dft)
    assert not any("vision_tower" in n for n in dft)
    llm = {n for n, _ in model.named_parameters() if ".language_model." in n or n.startswith("lm_head")}
    assert dft == dpt | llm


@pytest.mark.parametrize("positions, flag", [("response", "--positions all"), ("all", "--relation logits")])
def test_a_stage_refuses_a_cache_without_its_inputs_before_the_first_step(plain_caches, student_dir, world, tmp_path,
                                                                          positions, flag):
    cfg = stage_config("dpt", cache=plain_caches[positions], student=str(student_dir), out=tmp_path / "run",
                       image_root=world, max_steps=2, batch_size=4, global_batch=4)
    with pytest.raises(ValueError, match=flag):
        train(cfg, log=lambda *a: None)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_dpt_then_dft_train_from_the_cache(rel_cache, student_dir, world, tmp_path):
    before, _ = load_student(student_dir)
    finals = {}
    current = student_dir
    for stage in ("dpt", "dft"):
        cfg = stage_config(stage, cache=rel_cache, student=str(current), out=tmp_path / stage, image_root=world,
                           max_steps=3, batch_size=4, global_batch=4, save_every=100, log_every=1)
        current = finals[stage] = train(cfg, log=lambda *a: None)
        metrics = [json.loads(line) for line in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
        assert all(np.isfinite(m["loss/vis"]) and m["loss/vis"] > 0 and 0 < m["loss/rel"] < 2 for m in metrics)
    after_dpt = AutoModelForImageTextToText.from_pretrained(finals["dpt"]).state_dict()
    after_dft = AutoModelForImageTextToText.from_pretrained(finals["dft"]).state_dict()
    for name, value in before.state_dict().items():
        moved_dpt = not torch.equal(value, after_dpt[name])
        assert moved_dpt == ("multi_modal_projector" in name), name
    assert any(not torch.equal(after_dpt[n], after_dft[n]) for n in after_dft if ".language_model." in n)


def test_the_embedding_form_is_the_cosine_self_correlation_of_the_projected_image_rows(tmp_path, teacher_dir,
                                                                                      student_dir, mixed_data, world):
    """--relation embeddings (the authors' released-code form): the teacher's R_t and the student's R_s are the
    cosine self-correlations of each model's projector outputs (LLaVA's image_hidden_states), independently read."""
    data = tmp_path / "few.jsonl"
    data.write_text("".join(line + "\n" for line in mixed_data.read_text().splitlines()[:10]))
    run(ExtractConfig(teacher=str(teacher_dir), data=data, out=tmp_path / "c", image_root=world, top_k=4,
                      positions="all", relation="embeddings"))
    cache = Cache.open(tmp_path / "c")
    assert cache.manifest["settings"]["relation"] == "embeddings"
    records = [r for r in cache.records() if r.image is not None][:3]
    teacher, processor = load_student(teacher_dir)
    student, _ = load_student(student_dir)
    b = collate(records, processor.tokenizer.pad_token_id, ImageLoader(world, processor.image_processor))

    def cosines(model) -> list[torch.Tensor]:
        with torch.no_grad():
            feats = model.eval().model(**b.model_inputs()).image_hidden_states  # (n_images, N_p, D)
        return [F.normalize(f.float(), dim=-1) @ F.normalize(f.float(), dim=-1).T for f in feats]

    for rec, r in zip(records, cosines(teacher)):
        np.testing.assert_allclose(rec.relation, (r / r.norm()).numpy(), rtol=3e-3, atol=2e-4)
    expected = sum(relation_loss(r_s, torch.from_numpy(rec.relation)) for r_s, rec in zip(cosines(student), records))
    none = torch.zeros_like(b.kind_is("image"))
    with torch.no_grad():
        rel = StudentWithLoss(student, relation="embeddings")(b, none, none, None, none)[4]
    torch.testing.assert_close(rel, expected, rtol=1e-4, atol=1e-6)
    assert rel.item() > 1e-3


def test_inspect_shows_the_relation_form_its_size_and_its_bytes_per_record(rel_cache, plain_caches, tmp_path):
    from typer.testing import CliRunner

    from modkd.pipelines.cli_store import app as store_cli
    from modkd.store.convert import convert_cache

    records = [r for r in Cache.open(rel_cache).records() if r.relation is not None]
    n_p = {r.relation.shape[0] for r in records}
    assert len(n_p) == 1 and n_p == {records[0].num_image_tokens}
    n = n_p.pop()
    result = CliRunner().invoke(store_cli, ["inspect", str(rel_cache)])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("relation matrices:"))
    assert line.startswith(f"relation matrices: logits (settings.relation), N_p = {n}, {len(records)} of ")
    assert f"{n * (n + 1)} B per record with a matrix" in line and "on disk (zstd Parquet)" in line
    report = json.loads(CliRunner().invoke(store_cli, ["inspect", str(rel_cache), "--json"]).output)
    total = report["total"]
    assert report["relation"] == "logits" and total["relation_records"] == len(records)
    assert total["relation_n_p"] == [n, n] and total["relation_bytes_per_record"] == n * (n + 1)  # fp16 triangle
    assert 0 < total["relation_disk_bytes_per_record"] < 2 * n * (n + 1)
    plain = json.loads(CliRunner().invoke(store_cli, ["inspect", str(plain_caches["all"]), "--json"]).output)
    assert plain["relation"] == "none" and plain["total"]["relation_records"] == 0
    assert plain["total"]["relation_bytes_per_record"] is None
    convert_cache(rel_cache, tmp_path / "wds", "webdataset")  # no Parquet footers: raw bytes only
    wds = json.loads(CliRunner().invoke(store_cli, ["inspect", str(tmp_path / "wds"), "--json"]).output)["total"]
    assert wds["relation_bytes_per_record"] == n * (n + 1) and wds["relation_disk_bytes_per_record"] is None


def test_relation_matrices_survive_conversion_to_webdataset(rel_cache, tmp_path):
    from modkd.store.convert import convert_cache

    convert_cache(rel_cache, tmp_path / "wds", "webdataset")
    a, b = list(Cache.open(rel_cache).records()), list(Cache.open(tmp_path / "wds").records())
    assert len(a) == len(b) and sum(r.relation is not None for r in a) > 10
    for x, y in zip(a, b):
        assert (x.relation is None and y.relation is None) or np.array_equal(x.relation, y.relation)


def test_the_recipes_carry_the_papers_values():
    """llava-kd Sec. 4.1: (alpha, beta, gamma) = (1, 1, 0.5); DPT lr 1e-3 batch 32; DFT lr 2e-5 batch 16."""
    from modkd.pipelines.recipe import recipe

    for stage, lr, batch in (("dpt", 1e-3, 32), ("dft", 2e-5, 16)):
        r = recipe(stage)
        assert (r["lr"], r["global_batch"]) == (lr, batch)
        assert (r["lm_weight"], r["kd_weight"], r["vis_weight"], r["rel_weight"]) == (1.0, 1.0, 1.0, 0.5)
        assert r["kd_positions"] == "response" and r["relation"] == "logits"
