"""python -c "from modkd.extract.encode import Encoder; help(Encoder.encode)"

Turn one LLaVA-format record into exactly the tokens the teacher sees, with a kind per token.

The record's conversation is rendered with the teacher's own chat template, tokenised with its own
tokenizer, and its `<image>` placeholder is expanded by the teacher's own processor, so `input_ids`
are what the model was trained on. Assistant-response tokens are found by rendering the conversation
up to each assistant turn (with the generation prompt) and up to its end: the characters in between
(the answer and its end-of-turn token, without trailing whitespace) are the response.

Anything wrong with a record raises `Rejected(kind, reason)`; the extractor records it and goes on.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from modkd.store import POSITION_KINDS, POSITION_MODES, ImageRef

from .records import RawRecord

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_PLACEHOLDER = "<image>"  # LLaVA's data convention, whatever the teacher's own image token is
INTERNAL_ERROR = "internal_error"  # an unexpected exception on one record: rejected, and the exit status is non-zero
RESPONSE, INSTRUCTION, IMAGE = POSITION_KINDS["response"], POSITION_KINDS["instruction"], POSITION_KINDS["image"]


class Rejected(Exception):
    """A bad input record: `kind` is a short stable tag for counting, `reason` says what is wrong."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason

    def __reduce__(self):  # comes back whole from an encoding worker process
        return Rejected, (self.kind, self.reason)


@dataclass
class Encoded:
    sample_id: str
    input_ids: list[int]  # (T,) with image placeholders expanded
    token_kinds: np.ndarray  # (T,) int8: RESPONSE / INSTRUCTION / IMAGE per token
    model_inputs: dict[str, torch.Tensor]  # image tensors from the processor, batch dim 1 (empty if text-only)
    image: ImageRef | None
    num_image_tokens: int
    pil: Image.Image | None = None  # the decoded image: vLLM takes it with one placeholder and expands it itself


class Encoder:
    """Encodes records for one teacher. `processor` is None for a text-only teacher."""

    def __init__(self, tokenizer, processor, image_root: Path | None, max_length: int):
        self.tokenizer = tokenizer
        self.processor = processor
        self.image_root = image_root.resolve() if image_root is not None else None
        self.max_length = max_length
        self.image_token_id = processor.image_token_id if processor is not None else None
        self.template = processor if processor is not None else tokenizer

    def encode(self, raw: RawRecord) -> Encoded:
        if raw.error is not None:
            raise Rejected(raw.error_kind, raw.error)
        rec = raw.data
        if rec.get("video") is not None:  # LLaVA-Video's field: frames need the video processor, never run here
            raise Rejected("video", "video records are not supported (images only): the record has a 'video' field")
        messages = self._messages(rec)
        image, image_ref = self._image(rec)
        full = self._render(messages)
        spans = self._response_spans(messages, full)
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        kinds = np.full(len(ids), INSTRUCTION, dtype=np.int8)  # (T0,) before image expansion
        for i, (start, end) in enumerate(offsets):
            if any(start < e and end > s for s, e in spans):
                kinds[i] = RESPONSE
        model_inputs, n_img = {}, 0
        if image is not None:
            ids, kinds, model_inputs, n_img = self._expand_image(full, ids, kinds, image)
        if len(ids) > self.max_length:
            raise Rejected("too_long", f"{len(ids)} tokens after image expansion exceed --max-length {self.max_length}")
        if not (kinds == RESPONSE).any():
            raise Rejected("empty_response", "no assistant-response token survived tokenisation")
        return Encoded(raw.sample_id, ids, kinds, model_inputs, image_ref, n_img, image)

    def _messages(self, rec: dict) -> list[dict]:
        turns = rec.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise Rejected("missing_field", "no 'conversations' list (a preference record needs the preference extractor)")
        messages, placeholders = self._turns(turns)
        if isinstance(rec.get("image"), list):  # LLaVA-OneVision / Interleave data may list several images
            raise Rejected("image_field", f"the record lists {len(rec['image'])} images; multi-image records are not "
                                          "supported (the cache holds one image per record)")
        if placeholders != int(rec.get("image") is not None):
            raise Rejected("image_placeholders", f"found {placeholders} <image> placeholders, expected {int(rec.get('image') is not None)}")
        if not any(m["role"] == "assistant" for m in messages):
            raise Rejected("empty_response", "no gpt turn to distil")
        return messages

    def _turns(self, turns: list) -> tuple[list[dict], int]:
        """Chat messages of LLaVA turns, and how many <image> placeholders they hold."""
        messages, placeholders = [], 0
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise Rejected("missing_field", f"turn {i} has no string 'value'")
            role = ROLES.get(turn.get("from"))
            if role is None:
                raise Rejected("unknown_role", f"turn {i} has unknown role {turn.get('from')!r}; expected human, gpt or system")
            value = turn["value"]
            n = value.count(IMAGE_PLACEHOLDER)
            if n and role != "user":
                raise Rejected("image_placeholders", f"turn {i} ({turn['from']}) holds an <image> placeholder; only human turns may")
            if role == "assistant" and not value.strip():
                raise Rejected("empty_response", f"turn {i} (gpt) is empty")
            placeholders += n
            messages.append({"role": role, "content": self._content(value)})
        first = next((m["role"] for m in messages if m["role"] != "system"), None)
        if first != "user":
            raise Rejected("first_turn", f"the conversation starts with a {'gpt' if first else 'system'} turn; "
                                         "it must start with a human turn (after an optional system turn)")
        return messages, placeholders

    def _content(self, value: str):
        """Multimodal chat templates take a list of typed parts; text-only ones take a string."""
        if self.processor is None:
            return value
        parts = []
        for j, text in enumerate(value.split(IMAGE_PLACEHOLDER)):
            if j > 0:
                parts.append({"type": "image"})
                text = text.removeprefix("\n")  # LLaVA's "<image>\n": the template adds its own separator
            if j < value.count(IMAGE_PLACEHOLDER):
                text = text.removesuffix("\n")
            if text:
                parts.append({"type": "text", "text": text})
        return parts

    def _image(self, rec: dict) -> tuple[Image.Image | None, ImageRef | None]:
        name = rec.get("image")
        if name is None:
            return None, None
        if not isinstance(name, str):
            raise Rejected("image_field", f"'image' must be one path string, got {type(name).__name__}")
        if self.processor is None:
            raise Rejected("no_vision_tower", "record has an image but the teacher is text-only")
        if self.image_root is None:
            raise Rejected("image_missing", f"record has image {name!r} but no --image-root was given")
        path = (self.image_root / name).resolve()
        if not path.is_relative_to(self.image_root):
            raise Rejected("image_outside_root", f"image path {name!r} resolves outside --image-root")
        if not path.is_file():
            raise Rejected("image_missing", f"image {name!r} not found under --image-root")
        data = path.read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as im:
                image = im.convert("RGB")
        except Exception as e:  # PIL raises many types for bad files; all mean "cannot decode"
            raise Rejected("image_corrupt", f"image {name!r} cannot be decoded: {e}") from None
        return image, ImageRef(path.relative_to(self.image_root).as_posix(), hashlib.sha256(data).hexdigest())

    def _render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        try:
            return self.template.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja's TemplateError, a template's raise_exception(...), ...: this record only
            raise Rejected("template", f"the chat template refused the conversation: {type(e).__name__}: {e}") from None

    def _response_spans(self, messages: list[dict], full: str) -> list[tuple[int, int]]:
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._render(messages[:i], generation_prompt=True)
            through = self._render(messages[: i + 1]).rstrip()
            if not (full.startswith(before) and full.startswith(through) and through.startswith(before)):
                raise Rejected("template", f"the chat template does not render turn {i} as a prefix of the whole conversation")
            spans.append((len(before), len(through)))
        return spans

    def _expand_image(self, full: str, ids: list[int], kinds: np.ndarray, image: Image.Image):
        out = self.processor(images=[image], text=[full], add_special_tokens=False, return_tensors="pt")
        expanded = out["input_ids"][0].tolist()
        n_img = expanded.count(self.image_token_id)
        j = ids.index(self.image_token_id)
        if expanded != ids[:j] + [self.image_token_id] * n_img + ids[j + 1 :]:
            raise Rejected("template", "the processor's expansion of <image> does not match the tokenizer's tokens")
        kinds = np.concatenate([kinds[:j], np.full(n_img, IMAGE, np.int8), kinds[j + 1 :]])  # (T,)
        per_token = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")  # the backend rebuilds these
        model_inputs = {k: v for k, v in out.items() if k not in per_token}
        return expanded, kinds, model_inputs, n_img


def select_positions(token_kinds: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Positions t (predicting token t+1) to store, and their kinds, for a `--positions` mode.

    kind(t) = image if token t is an image token, else response if token t+1 is a response token,
    else instruction. The last token predicts nothing and is never stored.
    """
    wanted = [POSITION_KINDS[k] for k in POSITION_MODES[mode]]
    t_kinds = np.where(token_kinds[1:] == RESPONSE, RESPONSE, INSTRUCTION).astype(np.int8)  # (T-1,)
    t_kinds[token_kinds[:-1] == IMAGE] = IMAGE
    positions = np.flatnonzero(np.isin(t_kinds, wanted)).astype(np.int32)  # (P,)
    return positions, t_kinds[positions]
