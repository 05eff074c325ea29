"""python -m modkd.pipelines.toyworld.models /tmp/toy-models   # tokenizer + processor + teacher/student configs

Tiny LLaVA models for the toy world, built offline and saved in HF format.

A byte-level BPE tokenizer trained on the toy world's text (with `<|im_start|>`, `<|im_end|>` and
`<image>`, and a ChatML chat template), a CLIP image processor for 48x48 images, and LLaVA configs
(CLIP-style vision tower, 2-layer MLP projector, Qwen2 LLM). Everything is written with
`save_pretrained` and read back with `from_pretrained`, exactly like a downloaded checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from modkd.student.model import save_pretrained

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
VOCAB_SIZE = 384  # the toy world has ~60 words: byte alphabet + merges for whole words, and small logits
IMAGE_SIZE, PATCH = 48, 16  # one 16-px patch per grid cell: 9 image tokens per image

# ChatML, as Qwen uses it. Content is a string (text-only) or a list of typed parts (multimodal);
# an image part renders as LLaVA's "<image>\n".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# (hidden, layers, heads, kv heads, ffn): the teacher is ~4x the student's LLM, as 7B vs 1.8B in LLaVA-MoD.
TEACHER_LLM = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=384)
# A teacher clearly stronger than the student (EM 0.70 vs the small teacher's 0.61), at ~4x the training time.
BIG_TEACHER_LLM = dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2, intermediate_size=576)
STUDENT_LLM = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=192)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=64)


def train_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([*texts, "system\nuser\nassistant\n"], trainer)  # role names from the chat template
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def image_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    return LlavaProcessor(image_processor=image_processor(), tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def llava_config(tokenizer: PreTrainedTokenizerFast, llm: dict, tie: bool = True) -> LlavaConfig:
    """tie=False gives the LLM an lm_head of its own, as most students above ~1.5B (Qwen1.5-1.8B) have."""
    text = Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=tie,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **llm)
    return LlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=text,
                       image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                       vision_feature_select_strategy="default", vision_feature_layer=-1,
                       projector_hidden_act="gelu", tie_word_embeddings=tie)


def build_model(out: Path, tokenizer: PreTrainedTokenizerFast, llm: dict, seed: int, tie: bool = True) -> Path:
    """A randomly initialised LLaVA model plus its processor, saved in HF format under `out`."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(tokenizer, llm, tie))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    save_pretrained(model, out)
    processor(tokenizer).save_pretrained(out)
    return out


if __name__ == "__main__":
    from .world import build_world, corpus_texts

    root = Path(sys.argv[1])
    world = root / "world"
    build_world(world)
    tok = train_tokenizer(corpus_texts(world))
    print(build_model(root / "teacher-init", tok, TEACHER_LLM, seed=0))
    print(build_model(root / "student-init", tok, STUDENT_LLM, seed=0))
