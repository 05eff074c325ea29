"""pytest tests/test_arch_extract.py tests/test_arch_student.py -q   # tiny copies of the presets' real architectures

Tiny random copies of the two LLaVA-family checkpoints the presets name, built offline and saved with
`save_pretrained` + the processor, exactly like a downloaded checkpoint (test helper, imported by tests):

* `interleave`: `llava-hf/llava-interleave-qwen-7b-hf` (preset `qwen15-7b-llava`; student pair
  `llava-interleave-qwen-0.5b-hf`): `LlavaForConditionalGeneration`, a SigLIP tower without head
  (`siglip_vision_model`, gelu_pytorch_tanh, layer_norm_eps 1e-6), vision_feature_layer -1 and
  vision_feature_select_strategy "full" (every patch is an image token, no CLS: 729 at 384 px / 14 px;
  here 16 at 56 px / 14 px), a Qwen2 LLM (bos <|endoftext|>, eos <|im_end|>, untied lm_head on the 7B,
  tied on the 0.5B), image token "<image>" (151646 in the real vocabulary); `LlavaProcessor` with
  patch_size 14, num_additional_image_tokens 0, a SigLIP image processor (mean = std = 0.5).
* `onevision`: `llava-hf/llava-onevision-qwen2-7b-ov-hf` (preset `llava-onevision-qwen2-7b`; student pair
  `llava-onevision-qwen2-0.5b-ov-hf`): `LlavaOnevisionForConditionalGeneration`, the same SigLIP tower and
  "full" strategy, anyres tiling over `image_grid_pinpoints` (every (i*S, j*S), i, j in 1..6, S the tile
  side: 384 real, 42 here), `vision_aspect_ratio` "anyres_max_9", a learned `image_newline`, "<image>" and
  "<video>" tokens (151646 / 151647 real); `LlavaOnevisionProcessor` with num_image_tokens = tokens per
  tile (729 real, 9 here), so an image expands to base + unpadded tiles + one newline per row: a number of
  tokens that depends on the image's size.

Fields come from the checkpoints' config.json / processor_config.json on the Hub and from transformers'
configuration_llava*.py, processing_llava*.py and convert_llava_onevision_weights_to_hf.py (its chat
template is the OneVision checkpoints' one; the Interleave checkpoints' template is the same ChatML
template without the video clause). Only sizes are shrunk. The tokenizer is the toy world's byte-level
BPE with Qwen's special tokens in Qwen's order, so nothing is downloaded. The image processors are the
PIL backends (transformers' default ones need torchvision, which the main environment does not have);
they compute the same tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaProcessor,
    Qwen2Config,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

from modkd.extract.processor import ImageOnlyOnevisionProcessor
from modkd.pipelines.toyworld.models import train_tokenizer
from modkd.student.model import save_pretrained

ARCHS = ("interleave", "onevision")
PATCH = 14  # both real towers: SigLIP so400m, 14-px patches
INTERLEAVE_IMAGE = 56  # 4x4 patches: 16 image tokens ("full": no CLS to drop)
ONEVISION_TILE = 42  # 3x3 patches per tile: 9 tokens per tile, anyres grids of up to 6x6 tiles
LOGIT_SCALE = 5.0  # as tests/conftest.py: random init gives near-uniform logits; spread them so top-k has no near-ties

# The OneVision checkpoints' chat template (transformers' convert_llava_onevision_weights_to_hf.py): images
# first, then text, ChatML turns; `generation` marks the assistant text.
ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
INTERLEAVE_TEMPLATE = ONEVISION_TEMPLATE.replace(
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}", "")

# (hidden, layers, heads, kv heads, ffn): head_dim 32, which vLLM's CPU attention supports (16 it does not).
TEACHER_LLM = dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256)
STUDENT_LLM = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=128)
# SigLIP so400m without its head, shrunk: hidden 1152 -> 64, 26 layers -> 2, 16 heads -> 2.
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, patch_size=PATCH,
              hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False)


def tokenizer(arch: str, texts):
    """The toy world's BPE with Qwen's special tokens (<|endoftext|>, <|im_start|>, <|im_end|>, <image>[, <video>])."""
    tok = train_tokenizer(texts)
    if arch == "onevision":
        tok.add_special_tokens({"additional_special_tokens": ["<video>"]})
    tok.chat_template = INTERLEAVE_TEMPLATE if arch == "interleave" else ONEVISION_TEMPLATE
    return tok


def grid_pinpoints(tile: int = ONEVISION_TILE) -> list[list[int]]:
    """The real checkpoints' 36 anyres resolutions (384 * (i, j), i, j in 1..6), in units of the tile side."""
    return [[tile * i, tile * j] for i in range(1, 7) for j in range(1, 7)]


def processor(arch: str, tok):
    if arch == "interleave":
        images = SiglipImageProcessorPil(size={"height": INTERLEAVE_IMAGE, "width": INTERLEAVE_IMAGE})
        return LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="full",
                              num_additional_image_tokens=0, chat_template=INTERLEAVE_TEMPLATE)
    images = LlavaOnevisionImageProcessorPil(size={"height": ONEVISION_TILE, "width": ONEVISION_TILE},
                                             image_grid_pinpoints=grid_pinpoints())
    return ImageOnlyOnevisionProcessor(image_processor=images, tokenizer=tok, num_image_tokens=(ONEVISION_TILE // PATCH) ** 2,
                                       vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                                       chat_template=ONEVISION_TEMPLATE)


def write_video_processor_config(out: Path) -> None:
    """The checkpoints' video processor config (frames at the tile size), nested in processor_config.json as
    transformers 5 saves it: building LlavaOnevisionVideoProcessor needs torchvision, which this environment
    lacks. With torchvision, AutoProcessor loads the full processor from these files; without it, modkd's
    loaders fall back to the image-only one (extract/processor.py), which saves this config back."""
    path = out / "processor_config.json"
    saved = json.loads(path.read_text())
    saved.setdefault("video_processor", {"video_processor_type": "LlavaOnevisionVideoProcessor",
                                         "size": {"height": ONEVISION_TILE, "width": ONEVISION_TILE}})
    path.write_text(json.dumps(saved, indent=2) + "\n")


def config(arch: str, tok, llm: dict, tie: bool):
    text = Qwen2Config(vocab_size=len(tok), max_position_embeddings=4096, tie_word_embeddings=tie,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                       bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, **llm)
    image_token = tok.convert_tokens_to_ids("<image>")
    if arch == "interleave":
        return LlavaConfig(vision_config=SiglipVisionConfig(image_size=INTERLEAVE_IMAGE, **VISION), text_config=text,
                           image_token_index=image_token, projector_hidden_act="gelu", vision_feature_layer=-1,
                           vision_feature_select_strategy="full", image_seq_length=(INTERLEAVE_IMAGE // PATCH) ** 2,
                           tie_word_embeddings=tie)
    return LlavaOnevisionConfig(vision_config=SiglipVisionConfig(image_size=ONEVISION_TILE, **VISION), text_config=text,
                                image_token_index=image_token, video_token_index=tok.convert_tokens_to_ids("<video>"),
                                projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="full",
                                vision_aspect_ratio="anyres_max_9", image_grid_pinpoints=grid_pinpoints(),
                                tie_word_embeddings=tie)


def build(out: Path, arch: str, tok, llm: dict, seed: int, tie: bool) -> Path:
    """A random model of `arch` (lm_head scaled by LOGIT_SCALE) plus its processor, saved in HF format."""
    torch.manual_seed(seed)
    cls = LlavaForConditionalGeneration if arch == "interleave" else LlavaOnevisionForConditionalGeneration
    model = cls(config(arch, tok, llm, tie))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(LOGIT_SCALE)  # tied: the embeddings too, as the toy fixtures do
        if arch == "onevision":
            model.model.image_newline.normal_(0.0, 1.0)  # the real one is trained; the init is zeros-like small
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    save_pretrained(model, out)
    processor(arch, tok).save_pretrained(out)
    if arch == "onevision":
        write_video_processor_config(out)
    return out


def teacher(out: Path, arch: str, tok) -> Path:
    """The 7B's shape: untied lm_head, the wider LLM."""
    return build(out, arch, tok, TEACHER_LLM, seed=0, tie=False)


def student(out: Path, arch: str, tok, seed: int = 1) -> Path:
    """The 0.5B's shape: tied embeddings, the narrower LLM; same tokenizer, processor and vision tower shape."""
    return build(out, arch, tok, STUDENT_LLM, seed=seed, tie=True)


ONEVISION_SIZES = [(48, 48), (96, 48), (48, 96), (60, 130), (130, 40), (90, 90)]  # (W, H): square, wide, tall, ...


def write_images(world: Path, out: Path, records: list[dict], sizes: list[tuple[int, int]]) -> list[dict]:
    """Copies of the records whose images are resized to `sizes` in turn (anyres: token counts differ), written
    under `out`; returns the records pointing to them (paths relative to `out`)."""
    moved = []
    for i, rec in enumerate(records):
        if "image" not in rec:
            moved.append(rec)
            continue
        w, h = sizes[i % len(sizes)]
        name = f"{Path(rec['image']).stem}-{w}x{h}.png"
        Image.open(world / rec["image"]).convert("RGB").resize((w, h), Image.BICUBIC).save(out / name)
        moved.append({**rec, "image": name})
    return moved
