"""mod-extract --teacher toy-teacher --data world/pref.jsonl --image-root world/ --out cache/

Preference pairs -> the teacher's reference log-probs (DESIGN section 4; LLaVA-MoD section 3.2).

Input records, one per line (the file is recognised by its records having "chosen" and "rejected"):

    {"id", "image", "question", "chosen", "rejected"}                 RLAIF-V style; "<image>\\n" is put
                                                                      before the question when it has none
    {"id", "image", "conversations": [...], "chosen", "rejected"}     LLaVA style: the conversation so far,
                                                                      ending with a human turn

The prompt is rendered with the teacher's chat template and generation prompt; each response is the
assistant turn's tokens through its end-of-turn token, so the teacher sees prompt_ids + response_ids,
exactly as the trainer will feed the student. The teacher scores three sequences per record: the
chosen, the rejected, and KTO's mismatched pair: this prompt followed by another record's chosen
response. The partner is fixed here from the data alone (the nearest earlier record in the same shard,
cyclically, with a usable and different chosen response), so it does not depend on batch size or
workers, and it is stored in the record (`mismatched_from`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from modkd.store import ImageRef, PreferenceRecord

from .encode import IMAGE_PLACEHOLDER, Encoded, Encoder, Rejected
from .records import RawRecord

RESPONSES = ("chosen", "rejected", "mismatched")


def is_preference_data(records: list[RawRecord]) -> bool:
    """True when the file's first parsable record has both "chosen" and "rejected"."""
    first = next((r.data for r in records if r.data is not None), None)
    return first is not None and "chosen" in first and "rejected" in first


@dataclass
class EncodedPreference:
    sample_id: str
    prompt_ids: list[int]  # (Tp,) image placeholder expanded
    responses: dict[str, list[int]]  # chosen / rejected / mismatched -> (Tx,) response ids incl. end of turn
    mismatched_from: str
    model_inputs: dict[str, torch.Tensor]  # image tensors, batch dim 1 (empty if text-only)
    image: ImageRef | None
    num_image_tokens: int
    pil: Image.Image | None = None  # the decoded image, for vLLM


def mismatched_partners(raws: list[RawRecord]) -> dict[int, tuple[str, str] | None]:
    """raw.index -> (chosen text, sample_id) of its KTO partner within `raws` (one shard), or None."""
    def chosen(raw: RawRecord) -> str | None:
        value = raw.data.get("chosen") if raw.data is not None else None
        return value if isinstance(value, str) and value.strip() else None

    partners = {}
    for j, raw in enumerate(raws):
        own = chosen(raw)
        partners[raw.index] = None
        for step in range(1, len(raws)):
            other = raws[j - step]  # j - step < 0 wraps to the shard's end
            text = chosen(other)
            if text is not None and (own is None or text.strip() != own.strip()):
                partners[raw.index] = (text, other.sample_id)
                break
    return partners


class PreferenceEncoder(Encoder):
    """Encodes preference records for one teacher (same template, tokenizer and image checks as Encoder)."""

    def encode_pair(self, raw: RawRecord, partner: tuple[str, str] | None) -> EncodedPreference:
        if raw.error is not None:
            raise Rejected(raw.error_kind, raw.error)
        rec = raw.data
        texts = {}
        for name in ("chosen", "rejected"):
            if not isinstance(rec.get(name), str):
                raise Rejected("missing_field", f"no string {name!r} (a preference record needs chosen and rejected)")
            if not rec[name].strip():
                raise Rejected("empty_response", f"{name!r} is empty")
            texts[name] = rec[name]
        if texts["chosen"].strip() == texts["rejected"].strip():
            raise Rejected("identical_pair", "chosen and rejected are the same text: the pair carries no preference")
        if partner is None:
            raise Rejected("no_mismatch", "no other record in this shard has a usable chosen response to pair with "
                                          "this prompt (KTO's reference point); use fewer --shards")
        texts["mismatched"] = partner[0]
        messages = self._prompt_messages(rec)
        image, image_ref = self._image(rec)
        prompt = self._render(messages, generation_prompt=True)
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        responses = {name: self._response_ids(messages, prompt, prompt_ids, text, name) for name, text in texts.items()}
        model_inputs, n_img = {}, 0
        if image is not None:
            kinds = np.zeros(len(prompt_ids), np.int8)  # unused here: kinds matter for distillation records only
            prompt_ids, _, model_inputs, n_img = self._expand_image(prompt, prompt_ids, kinds, image)
        longest = len(prompt_ids) + max(len(ids) for ids in responses.values())
        if longest > self.max_length:
            raise Rejected("too_long", f"{longest} tokens (prompt after image expansion + longest response) exceed "
                                       f"--max-length {self.max_length}")
        return EncodedPreference(raw.sample_id, prompt_ids, responses, partner[1], model_inputs, image_ref, n_img, image)

    def _prompt_messages(self, rec: dict) -> list[dict]:
        has_image = rec.get("image") is not None
        if "conversations" in rec:
            turns = rec["conversations"]
            if not isinstance(turns, list) or not turns:
                raise Rejected("missing_field", "'conversations' must be a non-empty list of turns")
        elif isinstance(rec.get("question"), str) and rec["question"].strip():
            question = rec["question"]
            if has_image and IMAGE_PLACEHOLDER not in question:
                question = f"{IMAGE_PLACEHOLDER}\n{question}"  # RLAIF-V's questions carry no placeholder
            turns = [{"from": "human", "value": question}]
        else:
            raise Rejected("missing_field", "no 'question' string and no 'conversations' prefix")
        messages, placeholders = self._turns(turns)
        if messages[-1]["role"] != "user":
            raise Rejected("prompt_turns", "the conversation prefix must end with a human turn")
        if placeholders != int(has_image):
            raise Rejected("image_placeholders", f"found {placeholders} <image> placeholders, expected {int(has_image)}")
        return messages

    def _response_ids(self, messages: list[dict], prompt: str, prompt_ids: list[int], text: str, name: str) -> list[int]:
        """Tokens of `text` as the assistant's answer after `prompt`, through the end-of-turn token."""
        full = self._render([*messages, {"role": "assistant", "content": self._content(text)}]).rstrip()
        if not full.startswith(prompt):
            raise Rejected("template", f"the chat template does not render the {name} answer after the prompt")
        ids = self.tokenizer(full, add_special_tokens=False)["input_ids"]
        if ids[: len(prompt_ids)] != prompt_ids:
            raise Rejected("template", f"the {name} answer's first token merges with the prompt's last token")
        if len(ids) == len(prompt_ids):
            raise Rejected("empty_response", f"{name!r} has no tokens after tokenisation")
        return ids[len(prompt_ids):]


def score_pairs(encoded: list[EncodedPreference], backend) -> list[PreferenceRecord | Rejected]:
    """The teacher's per-token and summed log-probs of each record's three responses, in input order
    (Rejected where the backend refused one of the three sequences). `backend`: HFBackend or VLLMBackend."""
    sequences, owners = [], []
    for i, e in enumerate(encoded):
        for name in RESPONSES:
            ids = e.prompt_ids + e.responses[name]
            sequences.append(Encoded(e.sample_id, ids, np.zeros(len(ids), np.int8), e.model_inputs, e.image,
                                     e.num_image_tokens, e.pil))
            owners.append((i, name))
    logprobs: list[np.ndarray | Rejected | None] = [None] * len(sequences)
    for batch in backend.batches(sequences):
        positions = [_response_positions(encoded[owners[j][0]], owners[j][1]) for j in batch]
        for j, values in zip(batch, backend.target_logprobs([sequences[j] for j in batch], positions)):
            logprobs[j] = values  # (Tx,) fp32
    records = []
    for i, e in enumerate(encoded):
        per_token = {name: logprobs[3 * i + n] for n, name in enumerate(RESPONSES)}
        refused = [(name, r) for name, r in per_token.items() if isinstance(r, Rejected)]
        if refused:
            name, r = refused[0]
            records.append(Rejected(r.kind, f"{name}: {r.reason}"))
            continue
        records.append(PreferenceRecord(
            sample_id=e.sample_id, prompt_ids=np.asarray(e.prompt_ids, np.int32),
            **{f"{name}_ids": np.asarray(e.responses[name], np.int32) for name in RESPONSES},
            mismatched_from=e.mismatched_from,
            **{f"{name}_logprobs": per_token[name] for name in RESPONSES},
            **{f"{name}_logprob": float(per_token[name].astype(np.float64).sum()) for name in RESPONSES},
            image=e.image, num_image_tokens=e.num_image_tokens))
    return records


def _response_positions(e: EncodedPreference, name: str) -> np.ndarray:
    """(Tx,) int32: positions len(prompt) - 1 + i, each predicting response token i."""
    start = len(e.prompt_ids) - 1
    return np.arange(start, start + len(e.responses[name]), dtype=np.int32)
