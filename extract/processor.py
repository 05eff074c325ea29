"""python -c "from modkd.extract.processor import load_processor; print(load_processor('runs/teacher'))"

A checkpoint's processor, as AutoProcessor loads it; where that fails only because torchvision is missing
and the processor is LLaVA-OneVision's or Qwen2-VL / Qwen2.5-VL's, the same processor without its video processor.
student/processor.py is the same file for students: extract and student never import each other, and store,
which both import, imports no transformers (DESIGN section 2). Change both together.

transformers 5.x has no PIL backend for LlavaOnevisionVideoProcessor, so without torchvision (CPU-only
machines whose torch has no matching torchvision build, like these) AutoProcessor cannot load a OneVision
checkpoint at all, although images need only the image processor (which has a PIL backend) and the
tokenizer. Videos are not extracted (records with a video are rejected), so nothing is lost.
Qwen2-VL's and Qwen2.5-VL's processors are in the same case (Qwen2VLVideoProcessor needs torchvision; their
image processor falls back to its PIL backend, Qwen2VLImageProcessorPil).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoProcessor, LlavaOnevisionProcessor, Qwen2_5_VLProcessor, Qwen2VLProcessor

VIDEO_CONFIG = "video_preprocessor_config.json"  # older checkpoints' file; transformers 5 nests it in processor_config.json


class _ImageOnly:
    """Mixin: no video processor among the attributes; saves as the checkpoint's own processor class, with the
    checkpoint's video processor config (nested, as transformers 5 saves it), so the saved directory loads with
    plain AutoProcessor wherever torchvision is installed."""

    video_config: dict | None = None  # the checkpoint's video processor config, written back by to_dict

    def to_dict(self) -> dict:
        out = {**super().to_dict(), "processor_class": type(self).__mro__[2].__name__}  # (this, mixin, the real class)
        if self.video_config is not None:
            out["video_processor"] = self.video_config
        return out


class ImageOnlyOnevisionProcessor(_ImageOnly, LlavaOnevisionProcessor):
    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None, vision_feature_select_strategy=None,
                 chat_template=None, image_token="<image>", video_token="<video>", vision_aspect_ratio="anyres_max_9",
                 **kwargs):
        LlavaOnevisionProcessor.__init__(self, image_processor, tokenizer, None, num_image_tokens,
                                         vision_feature_select_strategy, chat_template, image_token, video_token,
                                         vision_aspect_ratio, **kwargs)


class ImageOnlyQwen2VLProcessor(_ImageOnly, Qwen2VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        Qwen2VLProcessor.__init__(self, image_processor, tokenizer, None, chat_template, **kwargs)


class ImageOnlyQwen2_5_VLProcessor(_ImageOnly, Qwen2_5_VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        Qwen2_5_VLProcessor.__init__(self, image_processor, tokenizer, None, chat_template, **kwargs)


IMAGE_ONLY = {c.__mro__[2].__name__: c for c in (ImageOnlyOnevisionProcessor, ImageOnlyQwen2VLProcessor,
                                                 ImageOnlyQwen2_5_VLProcessor)}  # processor class name -> image-only


def load_processor(path: str | Path, trust_remote_code: bool = False):
    """AutoProcessor's processor of a local directory or hub id; where it needs torchvision only for videos, images only."""
    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ImportError as e:
        config_file = Path(path) / "processor_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        name = _processor_class(Path(path))
        if "torchvision" not in str(e).lower() or name not in IMAGE_ONLY:
            raise
    processor = IMAGE_ONLY[name].from_pretrained(path)
    video = Path(path) / VIDEO_CONFIG
    processor.video_config = config.get("video_processor") or (json.loads(video.read_text()) if video.is_file() else None)
    return processor


def _processor_class(path: Path) -> str | None:
    """The processor class a checkpoint names: transformers 5 saves it in processor_config.json; the Hub's
    Qwen2-VL and OneVision checkpoints keep it in preprocessor_config.json or tokenizer_config.json."""
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        file = path / name
        if file.is_file():
            found = json.loads(file.read_text()).get("processor_class")
            if found:
                return found
    return None
