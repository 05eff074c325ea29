"""python -m modkd.pipelines.toyworld.evaluate MODEL_DIR WORLD_DIR

Evaluate a LLaVA checkpoint on the toy world's held-out splits with greedy decoding.

Per-task exact match (count, colour, position, exist, text), POPE F1 per negative split (random,
popular, adversarial) and CHAIR-style caption hallucination (response level chair_s, mention level
chair_i), with object recall and the number of distinct captions beside it (a captioner that names one
popular object everywhere lowers CHAIR without describing anything). Per-probe QA hits are kept
(`qa_hits`, in probe order) so two models can be compared paired, probe by probe. The model is loaded
with plain transformers, as any user would load it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from .metrics import chair_scores, exact_match_by_task, exact_match_hits, pope_scores
from .world import read_jsonl, world_paths

MAX_NEW_TOKENS = {"qa": 8, "pope": 4, "caption": 48}  # longest reference answer of each split, with room to spare


@torch.no_grad()
def generate(model, processor, records: list[dict], image_root: Path, max_new_tokens: int, batch_size: int = 64) -> dict[str, str]:
    """Greedy answers to each record's first human turn, keyed by record id."""
    processor.tokenizer.padding_side = "left"  # generation appends on the right
    out = {}
    for start in tqdm(range(0, len(records), batch_size), desc="generate", unit="batch", leave=False):
        batch = records[start : start + batch_size]
        texts, images = [], []
        for rec in batch:
            question = rec["conversations"][0]["value"]
            content = [{"type": "text", "text": question}]
            if "image" in rec:
                content = [{"type": "image"}, {"type": "text", "text": question.removeprefix("<image>\n")}]
                images.append(Image.open(image_root / rec["image"]).convert("RGB"))
            texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
        inputs = processor(images=images or None, text=texts, padding=True, add_special_tokens=False,
                           return_tensors="pt").to(model.device)
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)  # (B, T + new)
        answers = processor.tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        out.update({rec["id"]: a.strip() for rec, a in zip(batch, answers)})
    return out


def evaluate(model_dir: Path, world_dir: Path, limit: int | None = None) -> dict:
    paths = world_paths(Path(world_dir))
    processor = AutoProcessor.from_pretrained(model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    results = {}
    for split, key in (("qa", "eval_qa"), ("pope", "eval_pope"), ("caption", "eval_caption")):
        records = read_jsonl(paths[key])[:limit]
        preds = generate(model, processor, records, Path(world_dir), MAX_NEW_TOKENS[split])
        if split == "qa":
            results["exact_match"] = exact_match_by_task(records, preds)
            results["qa_hits"] = exact_match_hits(records, preds)
        elif split == "pope":
            results["pope"] = pope_scores(records, preds)
        else:
            results["chair"] = {**chair_scores(records, preds), "distinct": len(set(preds.values()))}
    return results


if __name__ == "__main__":
    print(json.dumps(evaluate(Path(sys.argv[1]), Path(sys.argv[2])), indent=2))
