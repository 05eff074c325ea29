"""python -m modkd.student.model runs/d2d/final runs/upcycled --experts 4 --top-k 2   # upcycle a dense student

The student: a plain transformers LLaVA model (frozen vision tower, 2-layer MLP projector, LLM), and
sparse upcycling of its dense Qwen2 LLM into a Qwen2-MoE LLM (LLaVA-MoD section 3.1, Eq. 2-4).

Upcycling copies each chosen FFN into `experts` identical experts and adds a linear router
(softmax over experts, top-k). The result is the same LLaVA class (`LlavaForConditionalGeneration`, or
`LlavaOnevisionForConditionalGeneration`) with a `qwen2_moe` text config (`shared_expert_intermediate_size=0`),
so a saved student loads with plain transformers.

Routing weights follow DeepSpeed-MoE, which LLaVA-MoD's code uses: for k >= 2 the top-k softmax weights
are renormalised to sum to 1 (`norm_topk_prob=True`), so identical experts give exactly the dense output
and the upcycled model starts with the dense model's function. For k = 1 the weight is the raw softmax
value (`norm_topk_prob=False`, the literal Eq. 2-4): renormalising would make it 1 and the router would
get no gradient from the LM loss, but the raw weight starts near 1/E, so an upcycled top-1 model does
NOT start with the dense model's function (its FFN outputs are scaled by ~1/E). `normalize_topk`
overrides either choice.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (AutoModelForImageTextToText, LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration,
                          Qwen2MoeConfig)

from .config import STAGES
from .processor import load_processor

LLAVA_CLASSES = (LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration)  # the families students may be



def load_student(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, processor) from a local HF directory or a hub id; the model must be a LLaVA-family model."""
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    if not isinstance(model, LLAVA_CLASSES):
        raise ValueError(f"{path}: the student must be a LLaVA model ({', '.join(c.__name__ for c in LLAVA_CLASSES)}), "
                         f"got {type(model).__name__}")
    return model, load_processor(path)


def save_pretrained(model, out: str | Path, state_dict: dict | None = None) -> Path:
    """`model.save_pretrained(out, state_dict=...)`, then its safetensors rewritten in the layout real checkpoints
    use. `state_dict`: the full weights where the model's own are sharded (FSDP, ZeRO-3: accelerator.get_state_dict).

    transformers 5.x writes a LLaVA CLIP tower as `vision_tower.embeddings.*` where the Hub's llava-hf
    checkpoints (and so vLLM) have `vision_tower.vision_model.*`, and writes zero-size tensors for a
    Qwen2-MoE shared expert of size 0, which vLLM rejects ("no module or parameter named ...shared_expert").
    The rewritten files drop the empty tensors and rename the tower; transformers reloads them with the
    same logits (it lists the empty tensors as missing and rebuilds them empty).
    """
    out = Path(out)
    model.save_pretrained(out, state_dict=state_dict)
    index = out / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    weight_map = {}
    for name in files:
        with safe_open(str(out / name), framework="pt") as f:
            metadata = f.metadata()
            tensors = {_hub_key(k): f.get_tensor(k) for k in f.keys()}
        tensors = {k: v for k, v in tensors.items() if v.numel() > 0}
        tmp = out / f".{name}.tmp"
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(out / name)
        weight_map.update(dict.fromkeys(tensors, name))
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = dict(sorted(weight_map.items()))
        index.write_text(json.dumps(data, indent=2))
    return out


def _hub_key(key: str) -> str:
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + key.removeprefix("vision_tower.")
    return key


def is_sparse(model: LlavaForConditionalGeneration) -> bool:
    return model.config.text_config.model_type == "qwen2_moe"


def moe_layers(num_layers: int, every: int) -> list[int]:
    """Layers that get experts: all (every=1) or every other one from layer 0 (every=2, MoE-LLaVA's choice)."""
    return list(range(0, num_layers, every))


def upcycle(dense: LlavaForConditionalGeneration, experts: int = 4, top_k: int = 2, every: int = 1,
            normalize_topk: bool | None = None, aux_loss_coef: float = 0.01, seed: int = 0) -> LlavaForConditionalGeneration:
    """A LLaVA model of the same class (Llava, LlavaOnevision) whose Qwen2 LLM is sparse-upcycled to Qwen2-MoE
    (see the module docstring for weights); the vision tower, projector (and OneVision's image_newline) are copied."""
    text = dense.config.text_config
    if text.model_type != "qwen2":
        raise ValueError(f"upcycling needs a Qwen2 LLM (dense LLaVA student); this one is {text.model_type!r}")
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k must be in [1, experts={experts}], got {top_k}")
    layers = moe_layers(text.num_hidden_layers, every)
    moe_text = Qwen2MoeConfig(
        **{k: getattr(text, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                         "num_key_value_heads", "hidden_act", "max_position_embeddings",
                                         "initializer_range", "rms_norm_eps", "tie_word_embeddings",
                                         "rope_parameters", "attention_dropout", "pad_token_id", "bos_token_id",
                                         "eos_token_id")},
        intermediate_size=text.intermediate_size,  # the dense FFNs of layers without experts
        moe_intermediate_size=text.intermediate_size,  # each expert is a copy of the dense FFN
        shared_expert_intermediate_size=0,  # LLaVA-MoD has no shared expert
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=top_k > 1 if normalize_topk is None else normalize_topk,
        router_aux_loss_coef=aux_loss_coef,
        decoder_sparse_step=1,
        mlp_only_layers=[i for i in range(text.num_hidden_layers) if i not in layers],
        qkv_bias=True,  # Qwen2 attention has q/k/v biases
    )
    config = type(dense.config)(**{**dense.config.to_dict(), "text_config": moe_text.to_dict()})
    torch.manual_seed(seed)  # the routers' initialisation
    sparse = type(dense)(config).to(dense.dtype)
    state = dense.state_dict()
    prefix = "model.language_model.layers"
    for i in layers:
        mlp = f"{prefix}.{i}.mlp"
        gate, up, down = (state.pop(f"{mlp}.{name}.weight") for name in ("gate_proj", "up_proj", "down_proj"))
        state[f"{mlp}.experts.gate_up_proj"] = torch.cat([gate, up]).expand(experts, -1, -1).clone()  # (E, 2I, H)
        state[f"{mlp}.experts.down_proj"] = down.expand(experts, -1, -1).clone()  # (E, H, I)
    missing, unexpected = sparse.load_state_dict(state, strict=False)
    new = {n for n in missing if n.endswith("mlp.gate.weight") or ".shared_expert" in n}  # routers; empty shared experts
    if set(missing) - new or unexpected:
        raise RuntimeError(f"upcycling mapped the weights wrongly: missing {sorted(set(missing) - new)}, "
                           f"unexpected {sorted(unexpected)}")
    with torch.no_grad():  # the only new weights: routers ~ N(0, initializer_range); shared-expert gates gate nothing
        for name, param in sparse.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, text.initializer_range)
            elif ".shared_expert" in name:
                param.zero_()  # (0, H) / (H, 0) shared expert, and its gate that multiplies nothing
    sparse.generation_config = dense.generation_config
    return sparse


def trainable_names(model: LlavaForConditionalGeneration, stage: str) -> list[str]:
    """Parameters a stage trains (DESIGN section 5); the vision tower is always frozen."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    if stage == "d2s" and not is_sparse(model):
        raise ValueError("stage d2s trains experts: upcycle the dense student first")
    names = []
    for name, _ in model.named_parameters():
        if "multi_modal_projector" in name or name == "model.image_newline":
            names.append(name)  # the projector (and OneVision's learned row separator, which sits in its output)
        elif stage in ("sft", "d2d", "dft") and (".language_model." in name or name.startswith("lm_head")):
            names.append(name)
        elif stage == "d2s" and ".language_model." in name and ".mlp." in name and "shared_expert" not in name:
            names.append(name)  # the LLM's experts, routers, and dense FFNs of layers without experts (not CLIP's mlp)
        elif (stage == "pd" and ".language_model." in name and ".mlp." in name and "shared_expert" not in name
              and ".mlp.gate." not in name):
            names.append(name)  # as d2s without the routers (DESIGN section 5: projector + experts)
    return names


def freeze_for(model: LlavaForConditionalGeneration, stage: str) -> list[str]:
    """Sets requires_grad for `stage`; returns the trained parameter names."""
    names = set(trainable_names(model, stage))
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    return sorted(names)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("dense", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--every", type=int, default=1)
    a = ap.parse_args()
    model, processor = load_student(a.dense)
    save_pretrained(upcycle(model, a.experts, a.top_k, a.every), a.out)
    processor.save_pretrained(a.out)
