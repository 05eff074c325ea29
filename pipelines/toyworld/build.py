"""mod-pipeline toy            # same as: python -c "from modkd.pipelines.toyworld.build import *; build_toy(ToyConfig())"

Build (once, then reuse) the toy world, its tokenizer and the trained toy teacher under $MODKD_HOME.

Everything is deterministic for a given ToyConfig and cached: a second call returns at once. Each
product is written to a temporary directory and renamed into place, so a killed build never leaves
a half-trained teacher where the `toy-teacher` preset looks for it.
"""

from __future__ import annotations

import json
import os
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
    n_eval_images: int = 1000  # 4,250 QA, 6,000 POPE, 1,000 caption probes: EM to +-1.5 points (the papers' effects are 0.5-4.5)
    n_pref: int = 600
    steps: int = 2000  # ~5 epochs of the training set; ~8 min on 2 CPU cores for the teacher
    batch_size: int = 32
    lr: float = 5e-4  # at 2e-3 the model never learns to read the image (loss stalls at the text prior)
    teacher: str = "small"  # "big": the 6 x 192 teacher (BIG below); the small one keeps the demo within minutes
    student_llm_steps: int = 600  # plain-LM steps of the student's LLM (pretrain.py): loss flat by 500; ~2 min on 2 cores


# the fields the teacher depends on: its cache directory and marker compare these only (not n_eval_images: the
# held-out split is never trained on, nor in the tokenizer's corpus)
TEACHER_FIELDS = ("seed", "n_train_images", "n_pref", "steps", "batch_size", "lr", "teacher")


# What every toy model's tokenizer is trained on (world.corpus_texts), recorded in each cached model's marker so a
# model cached with an older tokenizer (once trained on the eval split's text too) is rebuilt, never mixed with new ids.
TOKENIZER = "training side"

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
    return default if _tag(cfg) == _tag(ToyConfig()) else default.with_name(f"toy-{_tag(cfg)}")


def _tag(cfg: ToyConfig) -> str:
    return "-".join(f"{getattr(cfg, f)}" for f in TEACHER_FIELDS)


def _teacher_fields(config: dict) -> dict:
    return {f: config[f] for f in TEACHER_FIELDS}


# The default config's teacher as `mod-pipeline toy --train` writes it (committed: training it takes ~8 min on
# 2 cores, most of the demo's 10-minute budget); tests/test_prebuilt.py rebuilds it and compares evaluations.
PREBUILT = Path(__file__).parent / "prebuilt" / "teacher"


def build_toy(cfg: ToyConfig, log=print, train: bool = False) -> Toy:
    """The world and the trained teacher of `cfg`; the pre-built teacher is copied when it matches `cfg`,
    unless `train` (then it is trained here from the same seed)."""
    root = toy_root(cfg)
    world = root / "world"
    build_world(world, seed=cfg.seed, n_train_images=cfg.n_train_images, n_eval_images=cfg.n_eval_images, n_pref=cfg.n_pref)
    if cfg.teacher not in ("small", "big"):
        raise ValueError(f"ToyConfig.teacher must be 'small' or 'big', got {cfg.teacher!r}")
    llm = TEACHER_LLM if cfg.teacher == "small" else BIG_TEACHER_LLM
    teacher = trained(root / "teacher", "teacher", llm, world, cfg, log, prebuilt=None if train else PREBUILT)
    return Toy(root, world, teacher, cfg)


def _made_with(marker: Path, cfg: ToyConfig, llm: dict) -> bool:
    """Whether a toy.json says its model is `cfg`'s (markers written before a ToyConfig field existed hold that
    field's default)."""
    if not marker.is_file():
        return False
    made = json.loads(marker.read_text())
    return made["llm"] == llm and made.get("tokenizer") == TOKENIZER and _teacher_fields({**asdict(ToyConfig()), **made["config"]}) == _teacher_fields(asdict(cfg))


def trained(out: Path, name: str, llm: dict, world: Path, cfg: ToyConfig, log=print, prebuilt: Path | None = None) -> Path:
    """A toy LLaVA model of size `llm` trained by plain SFT on the world's training set (cached at `out`); a copy
    of `prebuilt` when that was made with the same config."""
    if _made_with(out / "toy.json", cfg, llm):
        log(f"[toy] {name}: reusing {out}")
        return out
    if prebuilt is not None and _made_with(prebuilt / "toy.json", cfg, llm):
        log(f"[toy] {name}: copying the pre-built one ({prebuilt}; `mod-pipeline toy --train` trains it here) -> {out}")
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(prebuilt, tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        return out
    log(f"[toy] {name}: training {cfg.steps} steps on {world / 'train.jsonl'} (cached afterwards in {out})")
    tokenizer = train_tokenizer(corpus_texts(world))
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    init = build_model(tmp / "init", tokenizer, llm, seed=cfg.seed)
    losses = train_sft(init, world / "train.jsonl", world, tmp / "final", cfg.steps, cfg.batch_size, cfg.lr, cfg.seed)
    shutil.rmtree(init)
    final = tmp / "final"
    (final / "toy.json").write_text(json.dumps({"config": asdict(cfg), "llm": llm, "tokenizer": TOKENIZER, "final_loss": losses[-1],
                                                "loss_curve": losses[:: max(1, len(losses) // 100)]}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    final.rename(out)
    shutil.rmtree(tmp)
    return out


STUDENT_LLMS = ("pretrained", "random")  # pretrained: as every paper student; random: the control


def pretrained_llm(world: Path, out: Path, steps: int, seed: int = 0, log=print) -> Path:
    """The student-sized LLaVA model after plain LM on the world's text only (pretrain.py), cached at `out`."""
    from .pretrain import text_corpus

    made = json.loads((out / "toy.json").read_text()) if (out / "toy.json").is_file() else {}
    if made.get("steps") == steps and made.get("tokenizer") == TOKENIZER:
        log(f"[toy] student LLM: reusing {out}")
        return out
    log(f"[toy] student LLM: plain LM on the world's text, {steps} steps (no images; cached afterwards in {out})")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    corpus = text_corpus(tmp / "text.jsonl", seed=seed)
    init = build_model(tmp / "init", train_tokenizer(corpus_texts(world)), STUDENT_LLM, seed=seed)
    losses = train_sft(init, corpus, world, tmp / "final", steps, seed=seed, all_tokens=True)
    (tmp / "final" / "toy.json").write_text(json.dumps({"steps": steps, "seed": seed, "tokenizer": TOKENIZER, "final_loss": losses[-1],
                                                        "loss_curve": losses[:: max(1, len(losses) // 100)]}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    (tmp / "final").rename(out)
    shutil.rmtree(tmp)
    return out


def student_init(toy: Toy, llm: str = "pretrained", log=print) -> Path:
    """The dense student before any training: the student LLM (pretrained on the world's text, as every paper
    student's LLM is, or random with llm="random"), a fresh projector, and the teacher's trained vision tower,
    which plays LLaVA-MoD's shared pretrained CLIP."""
    if llm not in STUDENT_LLMS:
        raise ValueError(f"llm must be one of {', '.join(STUDENT_LLMS)}, got {llm!r}")
    out = toy.root / f"student-init-{llm}"  # a name of its own: an older cache (random LLM) is never taken for it
    made = {"llm": llm, "tokenizer": TOKENIZER, "student_llm_steps": toy.config.student_llm_steps if llm == "pretrained" else None}
    if (out / "student_init.json").is_file() and json.loads((out / "student_init.json").read_text()) == made:
        return out
    language = None
    if llm == "pretrained":
        language = pretrained_llm(toy.world, toy.root / "student-llm", toy.config.student_llm_steps, toy.config.seed, log)
    log(f"[toy] student init: {llm} student LLM + a fresh projector + the teacher's vision tower -> {out}")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_model(tmp, train_tokenizer(corpus_texts(toy.world)), STUDENT_LLM, seed=toy.config.seed)
    student = AutoModelForImageTextToText.from_pretrained(tmp)
    if language is not None:  # the LLM and lm_head only: the projector stays fresh (init trains it)
        pretrained = AutoModelForImageTextToText.from_pretrained(language)
        student.model.language_model.load_state_dict(pretrained.model.language_model.state_dict())
        student.lm_head.load_state_dict(pretrained.lm_head.state_dict())
    teacher = AutoModelForImageTextToText.from_pretrained(toy.teacher)
    student.model.vision_tower.load_state_dict(teacher.model.vision_tower.state_dict())
    save_pretrained(student, tmp)
    (tmp / "student_init.json").write_text(json.dumps(made))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def transfer_set(world: Path, n_images: int | None) -> Path:
    """The students' transfer set: the training records of the first `n_images` training images and the
    text-only records in proportion (one per four images), in the training file's order; None: all of it.
    The teacher is trained on the whole training set, as a 7B teacher has seen more than the distillation
    data (LLaVA-MoD distils on a subset of the data its teacher was trained on)."""
    train = world / "train.jsonl"
    if n_images is None:
        return train
    out = world / f"transfer-{n_images}.jsonl"
    if not out.is_file():
        keep = []
        for line in train.read_text().splitlines():
            kind, index = json.loads(line)["id"].rsplit("-", 1)
            if int(index) < (n_images // 4 if kind == "text" else n_images):
                keep.append(line + "\n")
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # jobs side by side may each write it
        tmp.write_text("".join(keep))
        tmp.rename(out)
    return out


def preference_set(world: Path) -> Path:
    """The preference pairs pd trains on: the world's pairs whose rejected caption replaces an object, not those
    that add one. An added object makes the rejected caption longer, so with those pairs "hallucination" and
    "names more objects" coincide and KTO learns to name fewer objects (measured: README, "The demo"); real
    preference pairs (RLAIF-V) are two answers of the same model, with no such length gap. (pref.jsonl keeps every
    pair: the tokenizer is trained on it.)"""
    out = world / "pref-replace.jsonl"
    if not out.is_file():
        keep = [line + "\n" for line in (world / "pref.jsonl").read_text().splitlines() if json.loads(line)["edit"] == "replace"]
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # jobs side by side may each write it
        tmp.write_text("".join(keep))
        tmp.rename(out)
    return out


def toy_cache(toy: Toy, cache: Path, shards: int = 8, data: Path | None = None, log=print) -> Path:
    """The one extraction every toy pipeline trains from: the teacher's top-20 over every position of the
    training set (or of `data`, a transfer set) with its LLaVA-KD relation matrices (--relation logits: 90 B per
    image record), and its reference log-probs of the preference pairs (preference_set; each part skipped once
    complete)."""
    settings = dict(teacher=str(toy.teacher), out=cache, image_root=toy.world)
    data = data or toy.world / "train.jsonl"
    if not (cache / "manifest.json").is_file():
        log(f"[extract] the teacher's top-20 log-probs over every position of {data} -> {cache}")
        extract(ExtractConfig(data=data, top_k=20, positions="all", relation="logits", shards=shards, **settings))
    if not (cache / "preference" / "manifest.json").is_file():
        pairs = preference_set(toy.world)
        log(f"[extract] the teacher's reference log-probs of {pairs} -> {cache / 'preference'}")
        extract(ExtractConfig(data=pairs, shards=2, **settings))
    return cache
