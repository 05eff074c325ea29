"""pytest tests/test_vllm_serve.py -q     # the vLLM test needs the vLLM environment: bash pipelines/vllm-cpu-env.sh

A student trained d2d -> d2s (E4T2) by `mod-student`, served straight from `OUT/final`: the saved file is in
the Hub's layout (CLIP tower under `vision_tower.vision_model.*`, no zero-size tensors), transformers reloads
it with the logits of the trained weights, and vLLM's CPU build (its own environment, transformers 5.19)
loads it as is and gives, on an image prompt, the prompt log-probs of transformers (fp32, within 1e-4) and
the same greedy tokens. The student's attention heads are 32 wide: vLLM's CPU attention has no head_dim 16.
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
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

from conftest import LOGIT_SCALE, vllm_env
from modkd.extract.run import ExtractConfig, run
from modkd.pipelines.toyworld.models import STUDENT_LLM, build_model
from modkd.student.model import save_pretrained, upcycle

WIDE_STUDENT_LLM = dict(STUDENT_LLM, num_attention_heads=2, num_key_value_heads=1)  # hidden 64 / 2 heads: head_dim 32
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
MOD_STUDENT = str(Path(sys.executable).with_name("mod-student"))
ATOL = 1e-4  # fp32 vLLM vs transformers (shared/notes/vllm-on-cpu.md measured 2-5e-5)
TIE = 1e-4  # log-probs this close are a tie: either side may put either id at the top-5 boundary
K = 5
NEW_TOKENS = 8
STEPS = "2"


def train(stage: str, cache: Path, student: Path, out: Path) -> Path:
    cmd = [MOD_STUDENT, "train", "--stage", stage, "--cache", str(cache), "--student", str(student), "--out", str(out),
           "--max-steps", STEPS, "--lr", "1e-3", "--batch-size", "4", "--grad-accum", "1", "--set", "log_every=1"]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-3000:]}"
    return out / "final"


@pytest.fixture(scope="module")
def final(tmp_path_factory, tokenizer, teacher_dir, mixed_data, world) -> Path:
    """runs/d2s/final of a wide student: d2d from a random init, then d2s (upcycled to E4T2 by the trainer)."""
    root = tmp_path_factory.mktemp("serve")
    student = build_model(root / "student", tokenizer, WIDE_STUDENT_LLM, seed=1)
    model = AutoModelForImageTextToText.from_pretrained(student)
    with torch.no_grad():  # as conftest does for the teachers: spread log-probs, so top-5 and greedy have no near-ties
        model.get_output_embeddings().weight.mul_(LOGIT_SCALE)
    save_pretrained(model, student)
    cache = root / "cache"
    run(ExtractConfig(teacher=str(teacher_dir), data=mixed_data, out=cache, image_root=world, top_k=8, positions="all"))
    dense = train("d2d", cache, student, root / "runs" / "d2d")
    return train("d2s", cache, dense, root / "runs" / "d2s")


def image_prompt(world: Path) -> tuple[Image.Image, str]:
    record = json.loads((world / "eval" / "qa.jsonl").read_text().splitlines()[0])
    return Image.open(world / record["image"]).convert("RGB"), record["question"]


def render(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_final_is_saved_in_the_hub_layout(final):
    with safe_open(str(final / "model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert not [k for k, s in shapes.items() if 0 in s], "zero-size tensors"
    assert not [k for k in shapes if ".shared_expert." in k]  # the empty expert; its (1, H) gate stays: vLLM has one
    tower = [k for k in shapes if k.startswith("vision_tower.")]
    assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)
    assert any(".mlp.experts." in k for k in shapes) and any(k.endswith(".mlp.gate.weight") for k in shapes)
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    text = config["text_config"]
    assert text["model_type"] == "qwen2_moe" and text["num_experts"] == 4 and text["num_experts_per_tok"] == 2
    assert text["hidden_size"] // text["num_attention_heads"] == 32


def logits_of(model, processor, world: Path) -> torch.Tensor:
    image, question = image_prompt(world)
    inputs = processor(text=render(processor, question), images=image, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits[0]


def test_transformers_reloads_final_with_the_trained_logits(final, world):
    """OUT/final against the trained weights as the run's last checkpoint holds them (accelerate's own file)."""
    processor = AutoProcessor.from_pretrained(final)
    reloaded = AutoModelForImageTextToText.from_pretrained(final, dtype=torch.float32).eval()
    checkpoint = sorted((final.parent / "checkpoints").glob("step-*[0-9]"))[-1] / "model.safetensors"
    with safe_open(str(checkpoint), framework="pt") as f:
        trained = {k.removeprefix("llava."): f.get_tensor(k) for k in f.keys()}
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig.from_pretrained(final)).eval()
    missing, unexpected = model.load_state_dict(trained, strict=False)
    tied_or_empty = [n for n in missing if model.get_parameter(n).numel() == 0 or n.endswith("lm_head.weight")]
    assert not unexpected and missing == tied_or_empty, missing
    model.tie_weights()
    assert torch.equal(logits_of(reloaded, processor, world), logits_of(model, processor, world))


def test_save_pretrained_roundtrip_of_an_upcycled_student(tmp_path, tokenizer, world):
    """The Hub layout reloads with identical logits (experts made distinct, so a misplaced weight would show)."""
    dense_dir = build_model(tmp_path / "dense", tokenizer, WIDE_STUDENT_LLM, seed=2)
    sparse = upcycle(AutoModelForImageTextToText.from_pretrained(dense_dir), experts=4, top_k=2).eval()
    with torch.no_grad():
        for name, param in sparse.named_parameters():
            if ".mlp." in name and param.numel():
                param.add_(0.02 * torch.randn_like(param))
    processor = AutoProcessor.from_pretrained(dense_dir)
    save_pretrained(sparse, tmp_path / "sparse")
    processor.save_pretrained(tmp_path / "sparse")
    with safe_open(str(tmp_path / "sparse" / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if ".shared_expert." in k] and all(
        k.startswith("vision_tower.vision_model.") for k in keys if k.startswith("vision_tower."))
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "sparse", dtype=torch.float32).eval()
    assert torch.equal(logits_of(reloaded, processor, world), logits_of(sparse, processor, world))


VLLM_SCRIPT = '''
import json, sys


def main(args):
    from modkd.extract.vllm_backend import cpu_environment

    cpu_environment()  # before vllm is imported
    import vllm
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(args["model"])  # transformers 5.19 here
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args["question"]}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = processor.tokenizer(text)["input_ids"]  # ONE image placeholder: vLLM expands it
    prompt = {"prompt_token_ids": ids, "multi_modal_data": {"image": Image.open(args["image"]).convert("RGB")}}
    llm = vllm.LLM(model=args["model"], dtype="float32", enforce_eager=True, max_logprobs=args["k"],
                   limit_mm_per_prompt={"image": 1}, seed=0)
    scored = llm.generate([prompt], vllm.SamplingParams(max_tokens=1, prompt_logprobs=args["k"], detokenize=False))[0]
    greedy = llm.generate([prompt], vllm.SamplingParams(temperature=0, max_tokens=args["new_tokens"],
                                                        logprobs=args["k"], detokenize=False))[0].outputs[0]
    table = lambda row: None if row is None else [[int(t), lp.logprob, lp.rank] for t, lp in row.items()]
    result = {"text": text, "ids": ids, "prompt_token_ids": list(scored.prompt_token_ids),
              "prompt_logprobs": [table(row) for row in scored.prompt_logprobs],
              "greedy": list(greedy.token_ids), "greedy_logprobs": [table(row) for row in greedy.logprobs],
              "finish_reason": greedy.finish_reason, "vllm": vllm.__version__}
    with open(args["out"], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":  # vLLM spawns workers
    with open(sys.argv[1]) as f:
        main(json.load(f))
'''


def assert_row_matches(row: list, hf: torch.Tensor, actual: int, where: str) -> float:
    """One vLLM log-prob row ([id, log-prob, rank] for the top-K and the actual token) against transformers'
    log_softmax: every value within ATOL, the top-K ids the same up to ties at the boundary; returns max |diff|."""
    entries = {tok: lp for tok, lp, _ in row}
    assert actual in entries, f"{where}: the actual token {actual} is missing"
    worst = 0.0
    for tok, lp in entries.items():
        diff = abs(lp - hf[tok].item())
        assert diff < ATOL, f"{where} token {tok}: vLLM {lp} vs transformers {hf[tok].item()}"
        worst = max(worst, diff)
    top = {tok for tok, _, rank in row if rank <= K}
    assert len(top) == K, f"{where}: vLLM gave {len(top)} top ids"
    hf_top = torch.topk(hf, K)
    boundary = hf_top.values[-1].item()
    for tok in top ^ set(hf_top.indices.tolist()):  # ids in one top-K only must tie at the boundary
        assert abs(hf[tok].item() - boundary) < TIE, f"{where}: top-{K} ids differ beyond a tie at {tok}"
    return worst


def up_to_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def test_vllm_serves_final_as_transformers_does(vllm_python, final, world, tmp_path):
    image, question = image_prompt(world)
    args = {"model": str(final), "image": str(tmp_path / "image.png"), "question": question, "k": K,
            "new_tokens": NEW_TOKENS, "out": str(tmp_path / "vllm.json")}
    image.save(args["image"])
    (tmp_path / "args.json").write_text(json.dumps(args))
    (tmp_path / "serve.py").write_text(VLLM_SCRIPT)
    proc = subprocess.run([str(vllm_python), str(tmp_path / "serve.py"), str(tmp_path / "args.json")],
                          capture_output=True, text=True, env=vllm_env(tmp_path), timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    got = json.loads(Path(args["out"]).read_text())

    processor = AutoProcessor.from_pretrained(final)
    text = render(processor, question)
    assert got["text"] == text  # the saved processor renders the same prompt under transformers 5.19 and here
    inputs = processor(text=text, images=image, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert got["ids"].count(image_token) == 1 and ids.count(image_token) == 9
    assert got["prompt_token_ids"] == ids  # vLLM's expansion is the processor's

    model = AutoModelForImageTextToText.from_pretrained(final, dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = torch.log_softmax(model(**inputs).logits[0].float(), dim=-1)  # row t predicts token t + 1
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    generated = out.sequences[0, len(ids):].tolist()

    rows = got["prompt_logprobs"]
    assert len(rows) == len(ids) and rows[0] is None
    worst = max(assert_row_matches(rows[t], logprobs[t - 1], ids[t], f"prompt position {t}")
                for t in range(1, len(ids)))
    print(f"\nmax |vLLM - transformers| prompt log-prob: {worst:.2e} over {len(ids) - 1} positions")

    eos = processor.tokenizer.eos_token_id
    vllm_tokens = up_to_eos(got["greedy"], eos)
    hf_tokens = up_to_eos(generated, eos)
    print(f"greedy vLLM {got['greedy']} ({got['finish_reason']}), transformers {generated}")
    assert vllm_tokens == hf_tokens and vllm_tokens
    assert len(vllm_tokens) == NEW_TOKENS or vllm_tokens[-1] == eos  # both stopped at EOS or ran the full length
    # the decode steps (KV cache, positions) too: each step's log-probs, not only its argmax
    worst = max(assert_row_matches(got["greedy_logprobs"][s], torch.log_softmax(out.logits[s][0].float(), dim=-1),
                                   vllm_tokens[s], f"decode step {s}") for s in range(len(vllm_tokens)))
    print(f"max |vLLM - transformers| decode log-prob: {worst:.2e} over {len(vllm_tokens)} steps")
