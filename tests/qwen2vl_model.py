"""python tests/qwen2vl_model.py /tmp/tiny-qwen2vl [qwen2_vl|qwen2_5_vl]   # builds one tiny random teacher

Tiny random Qwen2-VL / Qwen2.5-VL teachers, built offline and saved with `save_pretrained`, mirroring the real
checkpoints (`Qwen/Qwen2-VL-7B-Instruct`, `Qwen/Qwen2.5-VL-7B-Instruct`) in everything but size:

- the same classes (`Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration`, `Qwen2VLProcessor` /
  `Qwen2_5_VLProcessor` with `Qwen2VLImageProcessor`), model_type, M-RoPE (`mrope_section` scaled to the head
  size: [16, 24, 24] of 64 -> [4, 6, 6] of 16), vision tower layout (patch 14, temporal patch 2, spatial merge 2),
  untied lm_head (the 7B models), the checkpoints' special tokens (<|endoftext|> ... <|video_pad|>, appended after
  the BPE vocabulary as in Qwen's tokenizer) and their chat template, copied from the checkpoints'
  chat_template.json (default system prompt, <|vision_start|><|image_pad|><|vision_end|> per image);
- shrunk: a BPE vocabulary trained on the given texts (the lm_head has exactly len(tokenizer) rows), 2 LLM
  layers of width 64 (head_dim 32, which vLLM's CPU attention supports), a 2-block vision tower of width 32,
  and max_pixels = 16 merged tokens (28x28 px each), so an image gives 4 to 16 placeholder tokens; min_pixels
  stays the checkpoints' 56*56.

Nothing is downloaded. Fields come from transformers' configuration/processing/image_processing_qwen2_vl.py
(5.24) and the checkpoints' config.json, preprocessor_config.json, tokenizer_config.json, chat_template.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
)

# Qwen2-VL's added tokens, in the order (and so the relative ids) of tokenizer_config.json: 151643 ... 151656.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
BPE_VOCAB = 320  # byte alphabet + merges for the test texts' words: small logits rows, as the toy tokenizer
LOGIT_SCALE = 5.0  # random init gives near-uniform logits; spread them so top-k has no near-ties (tests/conftest.py)

# The checkpoints' chat_template.json (Qwen2-VL-2B/7B-Instruct; Qwen2.5-VL-Instruct carries the same one).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

PATCH, MERGE, TEMPORAL = 14, 2, 2  # the checkpoints' patch_size, merge_size, temporal_patch_size
MIN_PIXELS = 56 * 56  # the checkpoints' min_pixels (3136)
MAX_PIXELS = 16 * (PATCH * MERGE) ** 2  # shrunk from 12,845,056: at most 16 image tokens per image
LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
MROPE_SECTION = [4, 6, 6]  # the checkpoints' [16, 24, 24] over head_dim 128, scaled to head_dim 32 (sums to 32 / 2)

FAMILIES = {  # name: (config class, model class, processor class)
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor),
}


def tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE on the texts, then Qwen2-VL's special tokens appended (ids after the BPE vocabulary)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([*texts, "system\nuser\nassistant\nYou are a helpful assistant."], trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)  # in order, after the BPE vocabulary
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:], errors="replace",
                                   clean_up_tokenization_spaces=False, split_special_tokens=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def image_processor() -> Qwen2VLImageProcessor:
    return Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=PATCH,
                                 temporal_patch_size=TEMPORAL, merge_size=MERGE)


VIDEO_PROCESSOR = dict(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}, patch_size=PATCH,
                       temporal_patch_size=TEMPORAL, merge_size=MERGE)


def video_processor():
    """A processor part transformers requires (it imports torchvision); videos are never extracted."""
    from transformers import Qwen2VLVideoProcessor

    return Qwen2VLVideoProcessor(**VIDEO_PROCESSOR)


def config(family: str, tok: PreTrainedTokenizerFast):
    ids = {name: tok.convert_tokens_to_ids(f"<|{name}|>") for name in
           ("image_pad", "video_pad", "vision_start", "vision_end", "endoftext", "im_end")}
    text = dict(vocab_size=len(tok), max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu",
                rope_scaling={"type": "mrope", "mrope_section": MROPE_SECTION}, rope_theta=1000000.0,
                use_sliding_window=False, sliding_window=32768, max_window_layers=LLM["num_hidden_layers"],
                bos_token_id=ids["endoftext"], eos_token_id=ids["im_end"], pad_token_id=ids["endoftext"], **LLM)
    vision = dict(depth=2, num_heads=2, in_channels=3, patch_size=PATCH, spatial_merge_size=MERGE,
                  temporal_patch_size=TEMPORAL)
    if family == "qwen2_vl":  # 7B: embed_dim 1280, mlp_ratio 4, hidden_size = the LLM's width (the merger's output)
        vision.update(embed_dim=32, mlp_ratio=4, hidden_size=LLM["hidden_size"], hidden_act="quick_gelu")
    else:  # 7B: hidden_size 1280, intermediate 3420, out_hidden_size = the LLM's, full attention every 8th block
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=LLM["hidden_size"], hidden_act="silu",
                      window_size=112, fullatt_block_indexes=[1], tokens_per_second=2)
    return FAMILIES[family][0](text_config=text, vision_config=vision, image_token_id=ids["image_pad"],
                               video_token_id=ids["video_pad"], vision_start_token_id=ids["vision_start"],
                               vision_end_token_id=ids["vision_end"], tie_word_embeddings=False)


def build(out: Path, texts: Iterable[str], family: str = "qwen2_vl", seed: int = 0) -> Path:
    """A random tiny teacher of `family` plus its processor, saved in HF format under `out`."""
    model_cls = FAMILIES[family][1]
    tok = tokenizer(texts)
    torch.manual_seed(seed)
    model = model_cls(config(family, tok)).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(LOGIT_SCALE)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    proc = processor(family, tok)
    proc.save_pretrained(out)
    if getattr(proc, "video_processor", None) is None:  # the video processor's config, as transformers saves it
        saved = json.loads((out / "processor_config.json").read_text())
        saved["video_processor"] = {"video_processor_type": "Qwen2VLVideoProcessor", **VIDEO_PROCESSOR}
        (out / "processor_config.json").write_text(json.dumps(saved, indent=2) + "\n")
    return out


def processor(family: str, tok: PreTrainedTokenizerFast):
    """The family's processor; without torchvision (the main environment), the same one without its video
    processor, which transformers cannot build there (extract/processor.py; it saves as the checkpoint's own)."""
    try:
        return FAMILIES[family][2](image_processor=image_processor(), tokenizer=tok, video_processor=video_processor(),
                                   chat_template=CHAT_TEMPLATE)
    except ImportError:
        from modkd.extract.processor import IMAGE_ONLY

        return IMAGE_ONLY[FAMILIES[family][2].__name__](image_processor=image_processor(), tokenizer=tok,
                                                        chat_template=CHAT_TEMPLATE)


if __name__ == "__main__":
    words = "a red square and a blue circle on a white ground what is in the picture describe it".split()
    print(build(Path(sys.argv[1]), [" ".join(words)] * 4, sys.argv[2] if len(sys.argv) > 2 else "qwen2_vl"))
