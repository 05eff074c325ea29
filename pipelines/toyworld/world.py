"""Procedural toy world: coloured shapes on a 3x3 grid, as LLaVA-format training, preference and eval data.

    python -m modkd.pipelines.toyworld.world runs/toyworld 0

Each 48x48 image holds 1-4 objects (colour, shape) in distinct 16x16 cells, one vision patch per cell.
Objects are not equally likely and some pairs co-occur often, so POPE's popular and adversarial negatives
differ from random ones and a captioner can learn to hallucinate. Every image-grounded record carries the
scene as "objects": [[colour, shape, cell], ...] in reading order, the ground truth for tests and CHAIR.
The same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 48  # 3x3 cells: small enough for CPU training, big enough for three shapes to be told apart
CELL = 16  # the toy vision tower's patch size: one patch sees exactly one cell
GRID = IMAGE_SIZE // CELL
MAX_OBJECTS = 4  # counting and captioning up to four objects is what separates a 4-layer teacher from a 2-layer student

COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (225, 195, 30),
    "purple": (140, 55, 185),
}
SHAPES = ("circle", "square", "triangle")
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
BACKGROUND = 205  # light grey, far from every object colour
BACKGROUND_JITTER = 8  # per-pixel noise, so no two images share bytes and backgrounds cannot be memorised
MARGINS = (2, 3, 4)  # per-object inset from the cell edge: shapes vary in size instead of being stamped

# A kind is (colour, shape). Listed most popular first; the scene prior is Zipf over this rank.
KINDS_BY_POPULARITY = (
    ("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle"), ("purple", "square"),
    ("green", "circle"), ("red", "square"), ("blue", "triangle"), ("purple", "circle"), ("yellow", "square"),
    ("yellow", "triangle"), ("purple", "triangle"), ("red", "triangle"), ("green", "square"), ("blue", "circle"),
)  # fmt: skip
PRIOR = {kind: 1.0 / (rank + 1) for rank, kind in enumerate(KINDS_BY_POPULARITY)}
COMPANION_SHIFT = 7  # companion 7 ranks down: popular kinds pull in mid-popular ones, so adversarial != popular
COMPANION = {
    kind: KINDS_BY_POPULARITY[(rank + COMPANION_SHIFT) % len(KINDS_BY_POPULARITY)]
    for rank, kind in enumerate(KINDS_BY_POPULARITY)
}
COMPANION_PROB = 0.6  # captioners learn (and hallucinate) the pair, yet the companion is still often absent

CAPTION_PROMPTS = ("describe the image.", "what is in the picture?", "describe the picture briefly.")
EXIST_PROMPTS = ("is there a {colour} {shape}?", "is there a {colour} {shape} in the image?")
POPE_PROMPT = "is there a {colour} {shape} in the image?"
SIDES = {"circle": "zero", "triangle": "three", "square": "four"}
COLOUR_MIXES = {("blue", "yellow"): "green", ("blue", "red"): "purple", ("red", "yellow"): "orange"}
IMAGES_PER_TEXT_RECORD = 4  # one text-only record per four images keeps a language prior without drowning vision
POPE_SPLITS = ("random", "popular", "adversarial")
IMAGE_TASKS = ("caption", "count", "colour", "position", "exist")


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    cell: str


@dataclass
class Scene:
    objects: list[Obj]  # distinct kinds in distinct cells, reading order
    noise_seed: int  # seeds the background noise and shape sizes, so render() is a pure function


def kind_name(kind: tuple[str, str]) -> str:
    return f"{kind[0]} {kind[1]}"


def kinds_of(scene: Scene) -> list[tuple[str, str]]:
    return [(obj.colour, obj.shape) for obj in scene.objects]


def sample_scene(rng: random.Random) -> Scene:
    """1-4 objects: kinds from the Zipf prior or, often, the companion of a kind already drawn."""
    n = rng.randint(1, MAX_OBJECTS)
    kinds: list[tuple[str, str]] = []
    while len(kinds) < n:
        companion = COMPANION[rng.choice(kinds)] if kinds and rng.random() < COMPANION_PROB else None
        if companion is not None and companion not in kinds:
            kinds.append(companion)
            continue
        absent = [kind for kind in KINDS_BY_POPULARITY if kind not in kinds]
        kinds.append(rng.choices(absent, weights=[PRIOR[kind] for kind in absent])[0])
    cells = sorted(rng.sample(range(len(CELLS)), n))
    rng.shuffle(kinds)
    objects = [Obj(colour, shape, CELLS[cell]) for (colour, shape), cell in zip(kinds, cells)]
    return Scene(objects=objects, noise_seed=rng.getrandbits(32))


def render(scene: Scene) -> Image.Image:
    rng = np.random.default_rng(scene.noise_seed)
    noise = rng.integers(-BACKGROUND_JITTER, BACKGROUND_JITTER + 1, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    image = Image.fromarray((BACKGROUND + noise).astype(np.uint8))  # (48, 48, 3) uint8
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        margin = MARGINS[int(rng.integers(len(MARGINS)))]
        row, col = divmod(CELLS.index(obj.cell), GRID)
        x0, y0 = col * CELL + margin, row * CELL + margin
        x1, y1 = (col + 1) * CELL - 1 - margin, (row + 1) * CELL - 1 - margin
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return image


def caption(scene: Scene) -> str:
    ordered = sorted(scene.objects, key=lambda obj: CELLS.index(obj.cell))
    return ", ".join(f"a {obj.colour} {obj.shape} at the {obj.cell}" for obj in ordered) + "."


# Question makers: (scene, rng) -> (question, answer).


def ask_caption(scene: Scene, rng: random.Random) -> tuple[str, str]:
    return rng.choice(CAPTION_PROMPTS), caption(scene)


def ask_count(scene: Scene, rng: random.Random) -> tuple[str, str]:
    about = rng.choice(("objects", "colour", "shape"))
    if about == "objects":
        return "how many objects are there?", NUMBER_WORDS[len(scene.objects)]
    present = rng.random() < 0.8  # mostly ask about something present, so "zero" does not dominate
    if about == "colour":
        colour = rng.choice(scene.objects).colour if present else rng.choice(sorted(COLOURS))
        n = sum(obj.colour == colour for obj in scene.objects)
        return f"how many {colour} objects are there?", NUMBER_WORDS[n]
    shape = rng.choice(scene.objects).shape if present else rng.choice(SHAPES)
    n = sum(obj.shape == shape for obj in scene.objects)
    return f"how many {shape}s are there?", NUMBER_WORDS[n]


def ask_colour(scene: Scene, rng: random.Random) -> tuple[str, str]:
    obj = rng.choice(scene.objects)
    return f"what color is the {obj.shape} at the {obj.cell}?", obj.colour


def ask_position(scene: Scene, rng: random.Random) -> tuple[str, str]:
    obj = rng.choice(scene.objects)
    return f"where is the {obj.colour} {obj.shape}?", obj.cell


def ask_exist(scene: Scene, rng: random.Random, yes: bool) -> tuple[str, str]:
    present = kinds_of(scene)
    if yes:
        colour, shape = rng.choice(present)
    else:
        colour, shape = rng.choice([kind for kind in KINDS_BY_POPULARITY if kind not in present])
    return rng.choice(EXIST_PROMPTS).format(colour=colour, shape=shape), "yes" if yes else "no"


def ask(task: str, scene: Scene, rng: random.Random) -> tuple[str, str]:
    if task == "caption":
        return ask_caption(scene, rng)
    if task == "count":
        return ask_count(scene, rng)
    if task == "colour":
        return ask_colour(scene, rng)
    if task == "position":
        return ask_position(scene, rng)
    return ask_exist(scene, rng, yes=rng.random() < 0.5)


def ask_text(rng: random.Random) -> tuple[str, str]:
    """Text-only facts within the world's vocabulary."""
    template = rng.choice(("sides", "shape", "plus", "minus", "mix"))
    if template == "sides":
        shape = rng.choice(SHAPES)
        return f"how many {rng.choice(('sides', 'corners'))} does a {shape} have?", SIDES[shape]
    if template == "shape":
        shape = rng.choice(("triangle", "square"))
        return f"what shape has {SIDES[shape]} sides?", shape
    if template == "plus":
        a = rng.randint(0, len(NUMBER_WORDS) - 1)
        b = rng.randint(0, len(NUMBER_WORDS) - 1 - a)
        return f"what is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?", NUMBER_WORDS[a + b]
    if template == "minus":
        a = rng.randint(0, len(NUMBER_WORDS) - 1)
        b = rng.randint(0, a)
        return f"what is {NUMBER_WORDS[a]} minus {NUMBER_WORDS[b]}?", NUMBER_WORDS[a - b]
    pair = rng.choice(sorted(COLOUR_MIXES))
    first, second = rng.sample(pair, 2)
    return f"which color is {first} mixed with {second}?", COLOUR_MIXES[pair]


def hallucinated_kind(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """An absent kind a biased captioner would invent: a present kind's companion, else a popular one."""
    present = kinds_of(scene)
    companions = sorted({COMPANION[kind] for kind in present} - set(present))
    if companions and rng.random() < 0.5:
        return rng.choice(companions)
    absent = [kind for kind in KINDS_BY_POPULARITY if kind not in present]
    return rng.choices(absent, weights=[PRIOR[kind] for kind in absent])[0]


# Records.


def objects_field(scene: Scene) -> list[list[str]]:
    return [[obj.colour, obj.shape, obj.cell] for obj in scene.objects]


def llava_record(
    record_id: str, task: str, scene: Scene | None, image: str | None, turns: list[tuple[str, str]]
) -> dict:
    conversations = []
    for i, (question, answer) in enumerate(turns):
        prefix = "<image>\n" if i == 0 and image is not None else ""
        conversations += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    record: dict = {"id": record_id, "task": task}
    if image is not None:
        record["image"] = image
        record["objects"] = objects_field(scene)
    record["conversations"] = conversations
    return record


def eval_record(
    record_id: str, task: str, scene: Scene | None, image: str | None, question: str, answer: str
) -> dict:
    record = llava_record(record_id, task, scene, image, [(question, answer)])
    record["question"] = question
    record["answer"] = answer
    return record


def training_records(index: int, scene: Scene, image: str, rng: random.Random) -> list[dict]:
    """One record per image task plus one 2-3 turn conversation, all about this image."""
    records = [
        llava_record(f"cap-{index:06d}", "caption", scene, image, [ask_caption(scene, rng)]),
        llava_record(f"count-{index:06d}", "count", scene, image, [ask_count(scene, rng)]),
        llava_record(f"colour-{index:06d}", "colour", scene, image, [ask_colour(scene, rng)]),
        llava_record(f"position-{index:06d}", "position", scene, image, [ask_position(scene, rng)]),
        llava_record(f"exist-{index:06d}", "exist", scene, image, [ask_exist(scene, rng, yes=index % 2 == 0)]),
    ]
    tasks = rng.sample(IMAGE_TASKS, rng.choice((2, 3)))
    turns = [ask(task, scene, rng) for task in tasks]
    records.append(llava_record(f"conv-{index:06d}", "conversation", scene, image, turns))
    return records


def preference_record(index: int, scene: Scene, image: str, rng: random.Random) -> dict:
    """Chosen: the true caption. Rejected: the caption with one object replaced or added by a hallucination."""
    invented = hallucinated_kind(scene, rng)
    objects = list(scene.objects)
    edit = rng.choice(("replace", "add"))
    if edit == "replace":
        slot = rng.randrange(len(objects))
        objects[slot] = Obj(invented[0], invented[1], objects[slot].cell)
    else:
        empty = [cell for cell in CELLS if cell not in {obj.cell for obj in objects}]
        objects.append(Obj(invented[0], invented[1], rng.choice(empty)))
    return {
        "id": f"pref-{index:06d}",
        "image": image,
        "task": "caption",
        "edit": edit,
        "objects": objects_field(scene),
        "question": rng.choice(CAPTION_PROMPTS),
        "chosen": caption(scene),
        "rejected": caption(Scene(objects=objects, noise_seed=scene.noise_seed)),
    }


def kind_statistics(scenes: list[Scene]) -> tuple[Counter, dict[tuple[str, str], Counter]]:
    """How many training images hold each kind, and each pair of kinds."""
    frequency: Counter = Counter()
    cooccurrence: dict[tuple[str, str], Counter] = {kind: Counter() for kind in KINDS_BY_POPULARITY}
    for scene in scenes:
        kinds = kinds_of(scene)
        frequency.update(kinds)
        for a in kinds:
            cooccurrence[a].update(b for b in kinds if b != a)
    return frequency, cooccurrence


def pope_negative(
    split: str, scene: Scene, rng: random.Random, frequency: Counter, cooccurrence: dict[tuple[str, str], Counter]
) -> tuple[str, str]:
    """POPE's three ways to choose an absent kind: uniformly, most frequent, most co-occurring with the present."""
    present = kinds_of(scene)
    absent = [kind for kind in KINDS_BY_POPULARITY if kind not in present]
    if split == "random":
        return rng.choice(absent)
    if split == "popular":
        return max(absent, key=lambda kind: frequency[kind])  # ties: the earlier (more popular by prior) kind
    return max(absent, key=lambda kind: (sum(cooccurrence[p][kind] for p in present), frequency[kind]))


def pope_records(
    index: int, scene: Scene, image: str, rng: random.Random, frequency: Counter, cooccurrence: dict
) -> list[dict]:
    """Per split one yes probe (the same present kind in all splits) and one no probe."""
    yes_kind = rng.choice(kinds_of(scene))
    records = []
    for split in POPE_SPLITS:
        no_kind = pope_negative(split, scene, rng, frequency, cooccurrence)
        for answer, (colour, shape) in (("yes", yes_kind), ("no", no_kind)):
            question = POPE_PROMPT.format(colour=colour, shape=shape)
            record = eval_record(f"pope-{split}-{index:06d}-{answer}", "pope", scene, image, question, answer)
            record["split"] = split
            records.append(record)
    return records


def eval_qa_records(index: int, scene: Scene, image: str, rng: random.Random) -> list[dict]:
    exist = ask_exist(scene, rng, yes=index % 2 == 0)
    return [
        eval_record(f"qa-count-{index:06d}", "count", scene, image, *ask_count(scene, rng)),
        eval_record(f"qa-colour-{index:06d}", "colour", scene, image, *ask_colour(scene, rng)),
        eval_record(f"qa-position-{index:06d}", "position", scene, image, *ask_position(scene, rng)),
        eval_record(f"qa-exist-{index:06d}", "exist", scene, image, *exist),
    ]


# Files.


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=True) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_png(image: Image.Image, path: Path) -> None:
    image.save(path, format="PNG", compress_level=6)  # PIL writes no timestamp: same pixels, same bytes


def task_counts(records: list[dict], field: str = "task") -> dict[str, int]:
    return dict(sorted(Counter(record[field] for record in records).items()))


def world_paths(out_dir: Path) -> dict[str, Path]:
    return {
        "images": out_dir / "images",
        "train": out_dir / "train.jsonl",
        "captions": out_dir / "captions.jsonl",
        "pref": out_dir / "pref.jsonl",
        "eval_qa": out_dir / "eval" / "qa.jsonl",
        "eval_pope": out_dir / "eval" / "pope.jsonl",
        "eval_caption": out_dir / "eval" / "caption.jsonl",
        "world": out_dir / "world.json",
    }


def build_world(
    out_dir: Path, seed: int = 0, n_train_images: int = 2000, n_eval_images: int = 200, n_pref: int = 600
) -> dict[str, Path]:
    """Write the whole world under out_dir and return its paths; a no-op if world.json has the same parameters.

    Defaults: 2000 training images (12.5k records) are what a toy teacher can fit in minutes on 2 CPU cores;
    200 eval images resolve accuracy to a few points per task (the toy pipelines ask for 1,000: build.ToyConfig);
    600 preference pairs fill a short DPO/KTO stage.
    """
    out_dir = Path(out_dir)
    paths = world_paths(out_dir)
    parameters = {"seed": seed, "n_train_images": n_train_images, "n_eval_images": n_eval_images, "n_pref": n_pref}
    if paths["world"].exists() and json.loads(paths["world"].read_text())["parameters"] == parameters:
        return paths
    paths["world"].unlink(missing_ok=True)  # a build that dies midway leaves no world.json claiming it is complete
    paths["images"].mkdir(parents=True, exist_ok=True)

    train_rng = random.Random(f"toyworld-train-{seed}")  # string seeds hash with sha512: stable across processes
    train_scenes = [sample_scene(train_rng) for _ in range(n_train_images)]
    train_images = [f"images/{index:06d}.png" for index in range(n_train_images)]
    train, captions = [], []
    for index, (scene, image) in enumerate(zip(train_scenes, train_images)):
        write_png(render(scene), out_dir / image)
        records = training_records(index, scene, image, train_rng)
        train += records
        captions.append(records[0])
    for index in range(n_train_images // IMAGES_PER_TEXT_RECORD):
        train.append(llava_record(f"text-{index:06d}", "text", None, None, [ask_text(train_rng)]))
    train_rng.shuffle(train)
    pref = [
        preference_record(index, train_scenes[index % n_train_images], train_images[index % n_train_images], train_rng)
        for index in range(n_pref)
    ]

    frequency, cooccurrence = kind_statistics(train_scenes)
    eval_rng = random.Random(f"toyworld-eval-{seed}")  # its own stream: held-out scenes never replay training ones
    qa, pope, caption_eval = [], [], []
    for index in range(n_eval_images):
        scene = sample_scene(eval_rng)
        image = f"images/eval-{index:06d}.png"
        write_png(render(scene), out_dir / image)
        qa += eval_qa_records(index, scene, image, eval_rng)
        pope += pope_records(index, scene, image, eval_rng, frequency, cooccurrence)
        prompt = CAPTION_PROMPTS[0]
        caption_eval.append(eval_record(f"evalcap-{index:06d}", "caption", scene, image, prompt, caption(scene)))
    for index in range(n_eval_images // IMAGES_PER_TEXT_RECORD):
        qa.append(eval_record(f"qa-text-{index:06d}", "text", None, None, *ask_text(eval_rng)))

    for name, records in (("train", train), ("captions", captions), ("pref", pref)):
        write_jsonl(paths[name], records)
    for name, records in (("eval_qa", qa), ("eval_pope", pope), ("eval_caption", caption_eval)):
        write_jsonl(paths[name], records)
    world = {
        "parameters": parameters,
        "image_size": IMAGE_SIZE,
        "cell": CELL,
        "counts": {
            "train": task_counts(train),
            "captions": len(captions),
            "pref": task_counts(pref, "edit"),
            "eval/qa": task_counts(qa),
            "eval/pope": task_counts(pope, "split"),
            "eval/caption": len(caption_eval),
        },
        "object_frequency": {kind_name(kind): frequency[kind] for kind in KINDS_BY_POPULARITY},
        "cooccurrence": {
            kind_name(a): {kind_name(b): cooccurrence[a][b] for b in KINDS_BY_POPULARITY if b != a}
            for a in KINDS_BY_POPULARITY
        },
    }
    paths["world"].write_text(json.dumps(world, indent=2) + "\n")
    return paths


def corpus_texts(out_dir: Path) -> Iterator[str]:
    """Every question and answer string of the training side (training records and preference pairs;
    placeholders removed), for training a tokenizer. Never the eval split's: the held-out set can grow without
    changing the tokenizer (and with it every model's token ids)."""
    paths = world_paths(Path(out_dir))
    for name in ("train",):
        for record in read_jsonl(paths[name]):
            for turn in record["conversations"]:
                yield turn["value"].replace("<image>\n", "")
    for record in read_jsonl(paths["pref"]):
        yield record["question"]
        yield record["chosen"]
        yield record["rejected"]


if __name__ == "__main__":
    built = build_world(Path(sys.argv[1]), seed=int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    print(json.dumps(json.loads(built["world"].read_text())["counts"], indent=2))
