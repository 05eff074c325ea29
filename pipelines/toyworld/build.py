"""mod-pipeline toy            # same as: python -c "from modkd.pipelines.toyworld.build import *; build_toy(ToyConfig())"

Build (once, then reuse) the toy world, its tokenizer and the trained toy teacher under $MODKD_HOME.

Everything is deterministic for a given ToyConfig and cached: a second call returns at once. Each
product is written to a temporary directory and renamed into place, so a killed build never leaves
a half-trained teacher where the `toy-teacher` preset looks for it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import AutoModelForImageTextToText

from modkd.extract.run import ExtractConfig, run as extract
from modkd.extract.teacher import LOCAL_PRESETS, modkd_home
from modkd.student.model import save_pretrained

from .models import BIG_TEACHER_LLM, STUDENT_LLM, TEACHER_LLM, build_model, train_tokenizer
from .train import train_sft
from .world import build_world, corpus_texts


@dataclass
class ToyConfig:
    seed: int = 0
    n_train_images: int = 2000  # 12.5k training records: enough for a 4-layer teacher to learn every task
    n_eval_images: int = 200  # 850 QA, 1200 POPE and 200 caption probes: +-3% accuracy resolution
    n_pref: int = 600
    steps: int = 2000  # ~5 epochs of the training set; ~8 min on 2 CPU cores for the teacher
    batch_size: int = 32
    lr: float = 5e-4  # at 2e-3 the model never learns to read the image (loss stalls at the text prior)
    teacher: str = "small"  # "big": the 6 x 192 teacher (BIG below); the small one keeps the demo within minutes


BIG = ToyConfig(teacher="big", steps=3000)  # ~30 min on 2 cores; the SFT baseline of this config also takes 3000 steps


@dataclass
class Toy:
    root: Path
    world: Path
    teacher: Path
    config: ToyConfig


def toy_root(cfg: ToyConfig) -> Path:
    """The default config lives where the `toy-teacher` preset looks; any other config beside it."""
    default = modkd_home() / Path(LOCAL_PRESETS["toy-teacher"]).parent
    return default if cfg == ToyConfig() else default.with_name(f"toy-{_tag(cfg)}")


def _tag(cfg: ToyConfig) -> str:
    return "-".join(f"{v}" for v in asdict(cfg).values())


def build_toy(cfg: ToyConfig, log=print) -> Toy:
    root = toy_root(cfg)
    world = root / "world"
    build_world(world, seed=cfg.seed, n_train_images=cfg.n_train_images, n_eval_images=cfg.n_eval_images, n_pref=cfg.n_pref)
    if cfg.teacher not in ("small", "big"):
        raise ValueError(f"ToyConfig.teacher must be 'small' or 'big', got {cfg.teacher!r}")
    llm = TEACHER_LLM if cfg.teacher == "small" else BIG_TEACHER_LLM
    teacher = trained(root / "teacher", "teacher", llm, world, cfg, log)
    return Toy(root, world, teacher, cfg)


def trained(out: Path, name: str, llm: dict, world: Path, cfg: ToyConfig, log=print) -> Path:
    """A toy LLaVA model of size `llm` trained by plain SFT on the world's training set (cached at `out`)."""
    marker = out / "toy.json"
    # markers written before a ToyConfig field existed hold that field's default
    if marker.is_file() and {**asdict(ToyConfig()), **json.loads(marker.read_text())["config"]} == asdict(cfg):
        log(f"[toy] {name}: reusing {out}")
        return out
    log(f"[toy] {name}: training {cfg.steps} steps on {world / 'train.jsonl'} (cached afterwards in {out})")
    tokenizer = train_tokenizer(corpus_texts(world))
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    init = build_model(tmp / "init", tokenizer, llm, seed=cfg.seed)
    losses = train_sft(init, world / "train.jsonl", world, tmp / "final", cfg.steps, cfg.batch_size, cfg.lr, cfg.seed)
    shutil.rmtree(init)
    final = tmp / "final"
    (final / "toy.json").write_text(json.dumps({"config": asdict(cfg), "llm": llm, "final_loss": losses[-1],
                                                "loss_curve": losses[:: max(1, len(losses) // 100)]}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    final.rename(out)
    shutil.rmtree(tmp)
    return out


def student_init(toy: Toy, log=print) -> Path:
    """The dense student before any training: the student LLM (random, the toy has no pretrained small LLM),
    a fresh projector, and the teacher's trained vision tower, which plays LLaVA-MoD's shared pretrained CLIP."""
    out = toy.root / "student-init"
    if (out / "config.json").is_file():
        return out
    log(f"[toy] student init: student LLM + the teacher's vision tower -> {out}")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_model(tmp, train_tokenizer(corpus_texts(toy.world)), STUDENT_LLM, seed=toy.config.seed)
    student = AutoModelForImageTextToText.from_pretrained(tmp)
    teacher = AutoModelForImageTextToText.from_pretrained(toy.teacher)
    student.model.vision_tower.load_state_dict(teacher.model.vision_tower.state_dict())
    save_pretrained(student, tmp)
    tmp.rename(out)
    return out


def toy_cache(toy: Toy, cache: Path, shards: int = 8, log=print) -> Path:
    """The one extraction every toy pipeline trains from: the teacher's top-20 over every position of the
    training set with its LLaVA-KD relation matrices (--relation logits: 90 B per image record), and its
    reference log-probs of the preference pairs (each part skipped once complete)."""
    settings = dict(teacher=str(toy.teacher), out=cache, image_root=toy.world)
    if not (cache / "manifest.json").is_file():
        log(f"[extract] the teacher's top-20 log-probs over every position of {toy.world / 'train.jsonl'} -> {cache}")
        extract(ExtractConfig(data=toy.world / "train.jsonl", top_k=20, positions="all", relation="logits",
                              shards=shards, **settings))
    if not (cache / "preference" / "manifest.json").is_file():
        log(f"[extract] the teacher's reference log-probs of {toy.world / 'pref.jsonl'} -> {cache / 'preference'}")
        extract(ExtractConfig(data=toy.world / "pref.jsonl", shards=2, **settings))
    return cache
