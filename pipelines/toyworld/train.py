"""python -m modkd.pipelines.toyworld.train MODEL_DIR world/train.jsonl world/ OUT_DIR --steps 2000

Plain supervised fine-tuning of a toy LLaVA model on toy-world records (trains the toy teacher).

This is how the toy *teacher* gets its knowledge, and the plain-SFT baseline it is compared with: CE on
assistant-response tokens only, every parameter trained, AdamW with cosine decay. Records are encoded
by the extractor's own Encoder, so the teacher trains on exactly the tokens it is later distilled on.
The distillation trainer is `mod-student`; this loop only exists to make the built-in teacher.
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from modkd.extract.encode import RESPONSE, Encoded, Encoder, Rejected
from modkd.extract.records import read_records
from modkd.student.model import save_pretrained

IGNORE = -100  # transformers' ignore index for labels


def encode_all(processor, data: Path, image_root: Path, max_length: int = 256) -> list[Encoded]:
    encoder = Encoder(processor.tokenizer, processor, image_root, max_length)
    out = []
    for raw in read_records(data):
        try:
            out.append(encoder.encode(raw))
        except Rejected as r:  # the toy world makes no bad records; a rejection here is a bug
            raise ValueError(f"{data}:{raw.line}: {r.reason}") from None
    return out


def collate(batch: list[Encoded], pad_id: int, all_tokens: bool = False) -> dict[str, torch.Tensor]:
    """Padded batch; labels on response tokens (SFT), or on every token when `all_tokens` (plain LM)."""
    T = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), T), IGNORE, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(batch), T), dtype=torch.long)  # (B, T)
    for b, e in enumerate(batch):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        mask[b, :n] = 1
        response = torch.from_numpy((e.token_kinds == RESPONSE) | all_tokens)  # (n,) bool
        labels[b, :n] = torch.where(response, ids[b, :n], IGNORE)
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    pixels = [e.model_inputs["pixel_values"] for e in batch if "pixel_values" in e.model_inputs]
    if pixels:
        out["pixel_values"] = torch.cat(pixels)  # (n_images, 3, H, W)
    return out


def train_sft(model_dir: Path, data: Path, image_root: Path, out: Path, steps: int, batch_size: int = 32,
              lr: float = 5e-4, seed: int = 0, warmup: float = 0.03, all_tokens: bool = False) -> list[float]:
    """Trains every parameter on response tokens (on every token when `all_tokens`: plain LM); saves model +
    processor to `out`; returns the loss curve."""
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # fp32 either way: the toy is small
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model.train()
    records = encode_all(processor, data, image_root)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    n_warm = max(1, int(warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / n_warm, 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    rng = random.Random(seed)
    order: list[int] = []
    losses = []
    for step in (bar := tqdm(range(steps), desc=f"sft {model_dir.name}", unit="step")):
        if len(order) < batch_size:  # reshuffle each epoch
            order += rng.sample(range(len(records)), len(records))
        batch, order = [records[i] for i in order[:batch_size]], order[batch_size:]
        inputs = {k: v.to(device) for k, v in collate(batch, processor.tokenizer.pad_token_id, all_tokens).items()}
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
    save_pretrained(model, out)
    processor.save_pretrained(out)
    return losses


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("image_root", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    train_sft(a.model_dir, a.data, a.image_root, a.out, a.steps, a.batch_size, a.lr, a.seed)
