"""pytest tests/test_student_model.py -q   # upcycling, plain-transformers loading, frozen sets, routing

The dense student is a tiny random toy LLaVA (build_model + STUDENT_LLM, saved and loaded through
from_pretrained, its lm_head scaled so logits are spread like a trained model's). Properties:

* upcycling keeps the dense function exactly where the routing form guarantees it (renormalised
  top-k, or k = E), on text and image+text input, and not for raw top-1 (the documented case);
* a saved upcycled student is a plain transformers model (loaded in a subprocess without modkd);
* each stage trains exactly its parameters (those that get a gradient), never the vision tower;
* RouterTap: one logits tensor per MoE layer, jitter/rsample only in training, the aux loss and the
  expert load, and the top-1 renormalisation pitfall (no router gradient).
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
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter, load_balancing_loss_func

from modkd.pipelines.toyworld.models import STUDENT_LLM, build_model
from modkd.student.model import freeze_for, load_student, upcycle
from modkd.student.routing import RouterTap

LOGIT_SCALE = 5.0  # as tests/conftest.py: random init gives near-uniform logits; spread them


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tokenizer) -> Path:
    out = build_model(tmp_path_factory.mktemp("student"), tokenizer, STUDENT_LLM, seed=0)
    model, _ = load_student(out)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(LOGIT_SCALE)
    model.save_pretrained(out)
    return out


@pytest.fixture()
def dense(student_dir):
    model, _ = load_student(student_dir)
    return model.eval()


@pytest.fixture(scope="module")
def inputs(student_dir, world) -> dict[str, dict[str, torch.Tensor]]:
    """{"text": ..., "image": ...}: model inputs built by the student's processor on toy-world data."""
    _, processor = load_student(student_dir)
    records = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()]
    record = next(r for r in records if "image" in r)
    image = Image.open(world / record["image"]).convert("RGB")
    text = processor(text=["is there a red circle? yes."], return_tensors="pt")
    both = processor(images=[image], text=["<image>\nwhat is in the picture? a red circle."], return_tensors="pt")
    assert (both["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum() == 9  # expanded
    return {"text": dict(text), "image": dict(both)}


@torch.no_grad()
def logits(model, batch: dict) -> torch.Tensor:
    return model(**batch).logits.float()


# ---------------------------------------------------------------- upcycling keeps the function


@pytest.mark.parametrize("experts,top_k,every,normalize", [
    (4, 2, 1, None),  # E4T2, renormalised top-2 (default for k >= 2)
    (8, 2, 2, None),  # E8T2 in every other layer
    (4, 4, 1, False),  # k = E, raw softmax: the weights sum to 1 anyway
    (4, 1, 1, True),  # top-1 renormalised: weight 1
])
def test_upcycled_equals_dense(dense, inputs, experts, top_k, every, normalize):
    sparse = upcycle(dense, experts, top_k, every, normalize_topk=normalize).eval()
    assert sparse.config.text_config.model_type == "qwen2_moe"
    n_moe = sum(isinstance(m, Qwen2MoeTopKRouter) for m in sparse.modules())
    assert n_moe == len(range(0, STUDENT_LLM["num_hidden_layers"], every))
    for kind, batch in inputs.items():
        ref, got = logits(dense, batch), logits(sparse, batch)
        assert ref.abs().max() > 0.5  # spread logits: an equality that means something
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0, msg=f"{kind} input")


def test_upcycled_raw_top1_does_not_equal_dense(dense, inputs):
    """The documented case: a raw top-1 weight (~1/E) scales every FFN output down."""
    sparse = upcycle(dense, experts=4, top_k=1).eval()
    assert sparse.config.text_config.norm_topk_prob is False
    for batch in inputs.values():
        assert (logits(sparse, batch) - logits(dense, batch)).abs().max() > 1e-2


def test_upcycle_rejects_bad_arguments(dense):
    with pytest.raises(ValueError, match="top_k"):
        upcycle(dense, experts=4, top_k=5)
    with pytest.raises(ValueError, match="Qwen2"):
        upcycle(upcycle(dense, 4, 2))


# ---------------------------------------------------------------- a saved student is plain transformers

PLAIN_LOAD = """
import sys, torch
from transformers import AutoModelForImageTextToText
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
assert type(model).__name__ == "LlavaForConditionalGeneration", type(model)
batch = torch.load(sys.argv[2])
with torch.no_grad():
    out = model(**batch).logits.float()
assert not any(name == "modkd" or name.startswith("modkd.") for name in sys.modules), "modkd was imported"
torch.save(out, sys.argv[3])
"""


def test_saved_upcycled_student_loads_with_plain_transformers(dense, inputs, tmp_path):
    sparse = upcycle(dense, experts=4, top_k=2, every=2).eval()
    sparse.save_pretrained(tmp_path / "moe")
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["model_type"] == "llava"
    assert config["text_config"]["model_type"] == "qwen2_moe"
    assert config["text_config"]["shared_expert_intermediate_size"] == 0
    assert "auto_map" not in config and "auto_map" not in config["text_config"]
    for kind, batch in inputs.items():
        torch.save(batch, tmp_path / f"{kind}.pt")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(tmp_path / "moe"), str(tmp_path / f"{kind}.pt"),
                               str(tmp_path / f"{kind}.out.pt")], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        torch.testing.assert_close(torch.load(tmp_path / f"{kind}.out.pt"), logits(sparse, batch), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- trainable sets per stage


def expected_trained(model, stage: str) -> set[str]:
    names = [n for n, _ in model.named_parameters()]
    projector = {n for n in names if "multi_modal_projector" in n}
    if stage == "init":
        return projector
    if stage in ("sft", "d2d"):
        return projector | {n for n in names if ".language_model." in n or n.startswith("lm_head")}
    # d2s: the LLM's FFNs (experts, routers, dense FFNs of layers without experts); CLIP's layers have ".mlp." too
    d2s = projector | {n for n in names if ".language_model." in n and ".mlp." in n and ".shared_expert" not in n}
    return d2s if stage == "d2s" else {n for n in d2s if not n.endswith(".mlp.gate.weight")}  # pd: routers frozen


@pytest.mark.parametrize("stage", ["init", "sft", "d2d", "d2s", "pd"])
def test_stage_trains_exactly_its_parameters(dense, inputs, stage):
    model = upcycle(dense, experts=4, top_k=2, every=2) if stage in ("d2s", "pd") else dense
    model.train()
    tap = RouterTap(model)  # d2s: the aux loss gives the routers a gradient (identical experts alone do not)
    returned = freeze_for(model, stage)
    out = model(**inputs["image"]).logits.float()  # vision tower, projector and LLM all in the graph
    loss = out.logsumexp(-1).mean() + tap.aux_loss(inputs["image"]["attention_mask"])
    loss.backward()
    tap.remove()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    expected = expected_trained(model, stage)
    assert got == expected, f"missing {sorted(expected - got)[:5]}, extra {sorted(got - expected)[:5]}"
    assert set(returned) == expected
    assert not any("vision_tower" in n for n in got | set(returned))
    if stage != "init":
        assert any(".mlp.experts." in n for n in got) == (stage in ("d2s", "pd"))
        assert any(n.endswith("mlp.gate.weight") for n in got) == (stage == "d2s")
        assert any("embed_tokens" in n for n in got) == (stage in ("sft", "d2d"))


def test_d2s_needs_a_sparse_student(dense):
    with pytest.raises(ValueError, match="upcycle"):
        freeze_for(dense, "d2s")
    with pytest.raises(ValueError, match="unknown stage"):
        freeze_for(dense, "dpo")


# ---------------------------------------------------------------- routing


def _perturb_experts(model, scale: float = 0.5, seed: int = 0) -> None:
    """Make the experts differ (as after training), so the choice of experts changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp.experts." in name:
                p.mul_(1 + scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("every,routers", [(2, 1), (1, 2)])
def test_routing_tap_records_one_logits_per_moe_layer(dense, inputs, every, routers):
    sparse = upcycle(dense, experts=8, top_k=2, every=every).eval()
    tap = RouterTap(sparse)
    assert len(tap.routers) == routers
    batch = inputs["image"]
    n = batch["input_ids"].numel()
    logits(sparse, batch)
    assert [t.shape for t in tap.logits] == [torch.Size([n, 8])] * routers
    tap.reset()
    logits(sparse, batch)
    assert len(tap.logits) == routers  # reset between forwards: only the last forward's
    tap.remove()
    logits(sparse, batch)
    assert len(tap.logits) == routers  # removed: nothing recorded any more


def test_routing_jitter_only_in_training(dense, inputs):
    sparse = upcycle(dense, experts=4, top_k=2)
    _perturb_experts(sparse)
    batch = inputs["image"]
    ref = {}
    for mode in ("train", "eval"):
        getattr(sparse, mode)()
        tap = RouterTap(sparse, "topk")
        ref[mode] = (logits(sparse, batch), [t.clone() for t in tap.logits])
        tap.remove()
    torch.testing.assert_close(ref["train"][0], ref["eval"][0], atol=0, rtol=0)  # no dropout: modes agree on topk

    tap = RouterTap(sparse, "jitter")
    sparse.train()
    torch.manual_seed(0)
    out_train, router_train = logits(sparse, batch), [t.clone() for t in tap.logits]
    assert (out_train - ref["train"][0]).abs().max() > 1e-4
    assert all((a - b).abs().max() > 0 for a, b in zip(router_train, ref["train"][1]))
    # on one router: the input is multiplied elementwise by U(0.99, 1.01), so |dlogit| <= 0.01 * sum_h |x_h w_eh|
    router = tap.routers[0]
    hidden = torch.randn(32, STUDENT_LLM["hidden_size"], generator=torch.Generator().manual_seed(0))
    exact = hidden @ router.weight.T  # (32, E)
    bound = 0.01 * (hidden.abs() @ router.weight.abs().T)  # (32, E)
    with torch.no_grad():
        jittered = router(hidden)[0]
    assert ((jittered - exact).abs() <= bound + 1e-6).all() and (jittered - exact).abs().max() > 0.1 * bound.max()
    tap.reset()
    sparse.eval()
    torch.testing.assert_close(logits(sparse, batch), ref["eval"][0], atol=0, rtol=0)
    torch.testing.assert_close(tap.logits, ref["eval"][1], atol=0, rtol=0)
    tap.remove()


def test_routing_rsample_explores_in_training_only(dense):
    sparse = upcycle(dense, experts=4, top_k=1)
    router = next(m for m in sparse.modules() if isinstance(m, Qwen2MoeTopKRouter))
    hidden = torch.randn(64, STUDENT_LLM["hidden_size"], generator=torch.Generator().manual_seed(0))
    router.eval()
    ref_logits, ref_weights, ref_idx = router(hidden)  # plain top-1
    assert torch.equal(ref_idx[:, 0], ref_logits.argmax(-1))
    tap = RouterTap(sparse, "rsample")
    torch.manual_seed(0)
    router.train()
    got_logits, got_weights, got_idx = router(hidden)
    torch.testing.assert_close(got_logits, ref_logits, atol=0, rtol=0)
    assert (got_idx != ref_idx).any()  # some tokens sample another expert than the argmax
    probs = torch.softmax(ref_logits, -1)
    torch.testing.assert_close(got_weights, probs.gather(1, got_idx))  # raw softmax weight of the drawn expert
    router.eval()
    ev_logits, ev_weights, ev_idx = router(hidden)
    assert torch.equal(ev_idx, ref_idx) and torch.equal(ev_weights, ref_weights)
    tap.remove()


def test_routing_rsample_draws_distinct_experts_with_renormalised_weights(dense):
    sparse = upcycle(dense, experts=4, top_k=2)  # renormalised top-2
    router = next(m for m in sparse.modules() if isinstance(m, Qwen2MoeTopKRouter))
    hidden = torch.randn(64, STUDENT_LLM["hidden_size"], generator=torch.Generator().manual_seed(1))
    tap = RouterTap(sparse, "rsample")
    torch.manual_seed(0)
    router.train()
    _, weights, idx = router(hidden)
    assert (idx[:, 0] != idx[:, 1]).all()  # without replacement
    torch.testing.assert_close(weights.sum(-1), torch.ones(64))
    tap.remove()


def test_routing_aux_loss_and_expert_load(dense, inputs, tokenizer):
    sparse = upcycle(dense, experts=4, top_k=2, every=1).train()
    with torch.no_grad():  # routers that prefer some experts: a balance loss clearly above its minimum
        for m in sparse.modules():
            if isinstance(m, Qwen2MoeTopKRouter):
                m.weight.mul_(20)
    ids = inputs["text"]["input_ids"]  # (1, T)
    pad = torch.full((1, 3), tokenizer.pad_token_id)
    batch = {"input_ids": torch.cat([torch.cat([ids, pad], 1), torch.cat([ids[:, :4], ids[:, 4:].flip(1), pad], 1)]),
             "attention_mask": torch.cat([torch.ones_like(ids), torch.zeros(1, 3, dtype=torch.long)], 1).repeat(2, 1)}
    batch["attention_mask"][1, -5:] = 0  # the second row is shorter
    tap = RouterTap(sparse)
    sparse(**batch)
    mask = batch["attention_mask"]
    aux = tap.aux_loss(mask)
    torch.testing.assert_close(aux, load_balancing_loss_func(tuple(tap.logits), 4, 2, mask))
    # the Switch/Mixtral formula, written out: E * sum_e (share of top-k slots to e) * (mean prob of e), real tokens
    keep = mask.reshape(-1).bool()
    f = torch.zeros(4)
    p = torch.zeros(4)
    for layer in tap.logits:
        probs = torch.softmax(layer[keep].float(), -1)
        f += torch.bincount(probs.topk(2, -1).indices.reshape(-1), minlength=4).float() / keep.sum()
        p += probs.mean(0)
    manual = 4 * (f / len(tap.logits) * p / len(tap.logits)).sum()
    torch.testing.assert_close(aux, manual)
    assert torch.isfinite(aux) and aux > 0
    assert aux.requires_grad  # it trains the routers
    unmasked = tap.aux_loss(None)
    assert not torch.isclose(unmasked, aux)  # the padding is really left out
    loads = tap.expert_load(mask)
    assert len(loads) == 2
    for load, layer in zip(loads, tap.logits):
        assert load.shape == (4,)
        torch.testing.assert_close(load.sum(), torch.tensor(1.0))
        counts = torch.bincount(layer[keep].topk(2, -1).indices.reshape(-1), minlength=4).float()
        torch.testing.assert_close(load, counts / counts.sum())
    tap.remove()


@pytest.mark.parametrize("normalize,zero", [(True, True), (None, False)])
def test_routing_top1_renormalised_router_gets_no_gradient(dense, inputs, normalize, zero):
    """Renormalised top-1 makes the weight p/p = 1: the LM loss gives the router no gradient."""
    sparse = upcycle(dense, experts=4, top_k=1, normalize_topk=normalize).train()
    freeze_for(sparse, "d2s")
    sparse(**inputs["image"]).logits.float().logsumexp(-1).mean().backward()  # no aux loss
    routers = [m.weight for m in sparse.modules() if isinstance(m, Qwen2MoeTopKRouter)]
    experts = [p for n, p in sparse.named_parameters() if ".mlp.experts." in n]
    assert all(p.grad is not None and p.grad.abs().max() > 1e-6 for p in experts)  # the loss does reach the layer
    biggest = max(w.grad.abs().max().item() for w in routers)
    if zero:
        assert biggest < 1e-7, biggest  # float rounding of p / p; raw top-1 gives ~1e-3
    else:
        assert all(w.grad.abs().max() > 1e-6 for w in routers)


def test_unknown_routing_is_refused(dense):
    with pytest.raises(ValueError, match="unknown routing"):
        RouterTap(upcycle(dense, 4, 2), "gumbel")
