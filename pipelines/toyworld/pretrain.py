"""python -m modkd.pipelines.toyworld.pretrain WORLD_DIR OUT_DIR [--steps 1500]   # the toy student's pretrained LLM

The toy's stand-in for the pretrained LLM every paper student starts from (LLaVA-MoD: Qwen-1.5 1.8B /
Qwen-2 0.5B; LLaVA-KD: Qwen-1.5): the student-sized LLaVA model trained by plain language modelling on
the toy world's *text*, never on an image. Each document is a ChatML conversation whose first user turn
describes a scene in words (its objects in random order) and asks about it; the other turns ask more
questions about the same scene (the world's caption, count, colour, position and existence questions),
and one document in five is a text-only fact (sides, sums, colour mixes). The scenes are sampled from
the world's own prior on their own random stream (no training or evaluation image is described), so
the LLM learns the language, the answer formats, the object prior and reasoning over a described scene:
what a text LLM knows before LLaVA's projector ever shows it a picture. The loss covers every token
(plain LM), the vision tower and projector get no gradient (no image is seen), and `student_init` later
replaces both (the teacher's tower, a fresh projector).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from .world import IMAGE_TASKS, Obj, Scene, ask, ask_text, llava_record, sample_scene, write_jsonl

N_SCENES = 8000  # 4x the training images: text is cheap, and a pretrained LLM has read more than its vision data
TEXT_EVERY = 4  # one text-only fact per four scene documents, as the world's training set mixes them


def describe(scene: Scene, rng: random.Random) -> str:
    """The scene in words, objects in random order (the caption task then asks for the reading order)."""
    objects: list[Obj] = rng.sample(scene.objects, len(scene.objects))
    return ", ".join(f"a {o.colour} {o.shape} at the {o.cell}" for o in objects) + "."


def text_corpus(out: Path, seed: int = 0, n_scenes: int = N_SCENES) -> Path:
    """Writes the pretraining documents (LLaVA-format text-only records) to `out`; same seed, same bytes."""
    rng = random.Random(f"toyworld-pretrain-text-{seed}")  # its own stream: no training or evaluation scene
    records = []
    for index in range(n_scenes):
        scene = sample_scene(rng)
        tasks = rng.sample(IMAGE_TASKS, rng.choice((2, 3)))
        turns = [ask(task, scene, rng) for task in tasks]
        turns[0] = (f"{describe(scene, rng)}\n{turns[0][0]}", turns[0][1])
        records.append(llava_record(f"pretext-{index:06d}", "scene-text", None, None, turns))
        if index % TEXT_EVERY == 0:
            records.append(llava_record(f"pretext-fact-{index:06d}", "text", None, None, [ask_text(rng)]))
    write_jsonl(out, records)
    return out


if __name__ == "__main__":
    from .build import pretrained_llm

    ap = argparse.ArgumentParser()
    ap.add_argument("world", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(pretrained_llm(a.world, a.out, a.steps, a.seed))
