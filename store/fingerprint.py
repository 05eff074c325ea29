"""python -c "from transformers import AutoTokenizer as T; from modkd.store.fingerprint import tokenizer_sha256; print(tokenizer_sha256(T.from_pretrained('DIR')))"

Fingerprints that tie a cache to the teacher, tokenizer, image processor and data that made it.

Both sides compute them with these functions: the extractor writes them into the manifest, the trainer
recomputes the tokenizer's from the student and refuses a cache whose value differs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt")
VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_commit_hash")


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_sha256(tokenizer, chat_template: str | None = None) -> str:
    """Vocabulary, merges, normalisation, added/special tokens and chat template, as one hash."""
    template = chat_template if chat_template is not None else tokenizer.chat_template
    parts = {
        "backend": json.loads(tokenizer.backend_tokenizer.to_str()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": template,
    }
    return _sha256_text(json.dumps(parts, sort_keys=True))


def image_processor_sha256(image_processor) -> str | None:
    if image_processor is None:
        return None
    config = image_processor.to_dict()
    config.pop("processor_class", None)  # set by whoever saved it, not a property of the pixels
    # the backend that computes the pixels: without torchvision transformers falls back to a PIL class (e.g.
    # CLIPImageProcessorPil) whose resizing differs by up to one 8-bit level, yet to_dict names the same type
    config["backend_class"] = type(image_processor).__name__
    return _sha256_text(json.dumps(config, sort_keys=True, default=str))


def config_sha256(config) -> str:
    d = config.to_dict()
    for key in VOLATILE_CONFIG_KEYS:
        d.pop(key, None)
    for sub in d.values():
        if isinstance(sub, dict):
            for key in VOLATILE_CONFIG_KEYS:
                sub.pop(key, None)
    return _sha256_text(json.dumps(d, sort_keys=True, default=str))


def weights_sha256(files: list[Path]) -> str:
    """sha256 over the weight files' bytes, in name order (hashes ~1 GB/s: a 7B teacher takes ~15 s)."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 24):
                h.update(block)
    return h.hexdigest()
