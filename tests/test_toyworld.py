"""Toy world: determinism, record validity, answers true to the scene, POPE negatives, metric golden values.

    pytest tests/test_toyworld.py -q
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modkd.pipelines.toyworld.metrics import (
    chair_scores,
    exact_match_by_task,
    normalise,
    parse_mentions,
    pope_scores,
)
from modkd.pipelines.toyworld.world import (
    BACKGROUND,
    BACKGROUND_JITTER,
    CELL,
    CELLS,
    COLOURS,
    IMAGE_SIZE,
    KINDS_BY_POPULARITY,
    NUMBER_WORDS,
    Obj,
    Scene,
    build_world,
    caption,
    corpus_texts,
    read_jsonl,
    render,
)

SIZES = {"n_train_images": 60, "n_eval_images": 24, "n_pref": 40}  # every task and split appears, builds in < 1 s


def digest(out_dir: Path) -> dict[str, str]:
    return {
        str(path.relative_to(out_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(out_dir.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("world")
    build_world(out_dir, seed=0, **SIZES)
    return out_dir


def all_records(world: Path) -> dict[str, list[dict]]:
    names = ("train.jsonl", "captions.jsonl", "eval/qa.jsonl", "eval/pope.jsonl", "eval/caption.jsonl")
    return {name: read_jsonl(world / name) for name in names}


def test_same_seed_same_bytes_other_seed_other_bytes(world, tmp_path):
    build_world(tmp_path / "again", seed=0, **SIZES)
    build_world(tmp_path / "other", seed=1, **SIZES)
    assert digest(tmp_path / "again") == digest(world)
    other = digest(tmp_path / "other")
    assert other.keys() == digest(world).keys()
    assert all(other[name] != digest(world)[name] for name in ("train.jsonl", "pref.jsonl", "images/000000.png"))


def test_build_is_idempotent_and_rebuilds_on_new_parameters(tmp_path):
    paths = build_world(tmp_path, seed=0, **SIZES)
    stamp = paths["world"].stat().st_mtime_ns
    assert build_world(tmp_path, seed=0, **SIZES) == paths
    assert paths["world"].stat().st_mtime_ns == stamp
    build_world(tmp_path, seed=0, n_train_images=61, n_eval_images=24, n_pref=40)
    assert json.loads(paths["world"].read_text())["parameters"]["n_train_images"] == 61


def test_a_larger_eval_split_keeps_the_training_side_and_the_tokenizer(tmp_path):
    from modkd.pipelines.toyworld.models import train_tokenizer
    from modkd.pipelines.toyworld.world import corpus_texts

    small = build_world(tmp_path / "small", seed=0, **SIZES)
    large = build_world(tmp_path / "large", seed=0, **{**SIZES, "n_eval_images": 3 * SIZES["n_eval_images"]})
    for name in ("train", "pref"):
        assert small[name].read_bytes() == large[name].read_bytes()
    first = read_jsonl(small["eval_caption"])
    assert read_jsonl(large["eval_caption"])[: len(first)] == first  # the held-out images only grow
    vocab = lambda w: json.loads(train_tokenizer(corpus_texts(w["world"].parent)).backend_tokenizer.to_str())["model"]  # noqa: E731
    assert vocab(small) == vocab(large)


def test_layout_and_counts(world):
    meta = json.loads((world / "world.json").read_text())
    counts = meta["counts"]
    n_train, n_eval = SIZES["n_train_images"], SIZES["n_eval_images"]
    for task in ("caption", "count", "colour", "position", "exist", "conversation"):
        assert counts["train"][task] == n_train
    assert counts["train"]["text"] == n_train // 4
    assert counts["captions"] == n_train
    assert sum(counts["pref"].values()) == SIZES["n_pref"]
    assert counts["eval/pope"] == {split: 2 * n_eval for split in ("adversarial", "popular", "random")}
    assert len(list((world / "images").glob("*.png"))) == n_train + n_eval
    assert sum(meta["object_frequency"].values()) == sum(
        len(r["objects"]) for r in read_jsonl(world / "captions.jsonl")
    )
    image = Image.open(world / "images" / "000000.png")
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"


def test_records_are_valid_llava(world):
    ids = []
    for name, records in all_records(world).items():
        for record in records:
            ids.append((name, record["id"]))
            turns = record["conversations"]
            assert [turn["from"] for turn in turns] == ["human", "gpt"] * (len(turns) // 2) and turns
            assert all(turn["value"].strip() for turn in turns)
            placeholders = [turn["value"].count("<image>") for turn in turns]
            if "image" in record:
                assert turns[0]["value"].startswith("<image>\n") and placeholders == [1] + [0] * (len(turns) - 1)
                assert (world / record["image"]).is_file()
            else:
                assert sum(placeholders) == 0 and record["task"] == "text"
            if record["task"] == "conversation":
                assert len(turns) in (4, 6)
    assert len(set(ids)) == len(ids)
    train_images = {r["image"] for r in read_jsonl(world / "train.jsonl") if "image" in r}
    eval_images = {r["image"] for r in read_jsonl(world / "eval/qa.jsonl") if "image" in r}
    assert not train_images & eval_images


def check_answer(question: str, answer: str, objects: list[list[str]]) -> None:
    """Recompute the answer from the scene, for every question template of the world."""
    kinds = {(colour, shape) for colour, shape, _ in objects}
    if question in ("describe the image.", "what is in the picture?", "describe the picture briefly."):
        assert answer == caption(Scene([Obj(*obj) for obj in objects], noise_seed=0))
    elif match := re.fullmatch(r"how many (\w+) objects are there\?", question):
        assert answer == NUMBER_WORDS[sum(obj[0] == match[1] for obj in objects)]
    elif question == "how many objects are there?":
        assert answer == NUMBER_WORDS[len(objects)]
    elif match := re.fullmatch(r"how many (\w+)s are there\?", question):
        assert answer == NUMBER_WORDS[sum(obj[1] == match[1] for obj in objects)]
    elif match := re.fullmatch(r"what color is the (\w+) at the ([\w ]+)\?", question):
        assert [match[1], match[2]] in [obj[1:] for obj in objects]
        assert [answer, match[1], match[2]] in objects
    elif match := re.fullmatch(r"where is the (\w+) (\w+)\?", question):
        assert [match[1], match[2], answer] in objects
    elif match := re.fullmatch(r"is there a (\w+) (\w+)( in the image)?\?", question):
        assert answer == ("yes" if (match[1], match[2]) in kinds else "no")
    else:
        raise AssertionError(f"unknown question {question!r}")


def check_text_answer(question: str, answer: str) -> None:
    words = {word: n for n, word in enumerate(NUMBER_WORDS)}
    if match := re.fullmatch(r"what is (\w+) (plus|minus) (\w+)\?", question):
        a, b = words[match[1]], words[match[3]]
        assert words[answer] == (a + b if match[2] == "plus" else a - b)
    elif match := re.fullmatch(r"how many (sides|corners) does a (\w+) have\?", question):
        assert answer == {"circle": "zero", "triangle": "three", "square": "four"}[match[2]]
    elif match := re.fullmatch(r"what shape has (\w+) sides\?", question):
        assert answer == {"three": "triangle", "four": "square"}[match[1]]
    elif match := re.fullmatch(r"which color is (\w+) mixed with (\w+)\?", question):
        assert answer == {("blue", "yellow"): "green", ("blue", "red"): "purple", ("red", "yellow"): "orange"}[
            tuple(sorted((match[1], match[2])))
        ]
    else:
        raise AssertionError(f"unknown text question {question!r}")


def test_answers_are_true_to_the_scene(world):
    for records in all_records(world).values():
        for record in records:
            turns = record["conversations"]
            for human, gpt in zip(turns[::2], turns[1::2]):
                question = human["value"].removeprefix("<image>\n")
                if "image" in record:
                    check_answer(question, gpt["value"], record["objects"])
                else:
                    check_text_answer(question, gpt["value"])
            if "answer" in record:
                assert record["answer"] == turns[-1]["value"]


def test_exist_answers_are_balanced(world):
    exist = [r for r in read_jsonl(world / "train.jsonl") if r["task"] == "exist"]
    yes = sum(r["conversations"][1]["value"] == "yes" for r in exist)
    assert abs(2 * yes - len(exist)) <= 1


def test_images_show_the_objects(world):
    """The cell centre has the object's colour; an empty cell centre is background grey."""
    for record in read_jsonl(world / "captions.jsonl")[:20]:
        pixels = np.asarray(Image.open(world / record["image"]), dtype=int)  # (48, 48, 3)
        colour_at = {obj[2]: obj[0] for obj in record["objects"]}
        for index, cell in enumerate(CELLS):
            row, col = divmod(index, 3)
            centre = pixels[row * CELL + CELL // 2, col * CELL + CELL // 2]
            if cell in colour_at:
                assert tuple(centre) == COLOURS[colour_at[cell]]
            else:
                assert np.all(np.abs(centre - BACKGROUND) <= BACKGROUND_JITTER)


def test_render_draws_distinct_shapes():
    shapes = ("circle", "square", "triangle")
    images = [np.asarray(render(Scene([Obj("red", shape, "center")], noise_seed=3))) for shape in shapes]
    red = [np.all(image == COLOURS["red"], axis=-1).sum() for image in images]
    assert red[1] > red[0] > red[2] > 0  # square > circle > triangle in area


def test_preferences_reject_a_hallucination(world):
    records = read_jsonl(world / "pref.jsonl")
    assert {r["edit"] for r in records} == {"replace", "add"}
    for record in records:
        present = {(colour, shape) for colour, shape, _ in record["objects"]}
        assert set(parse_mentions(record["chosen"])) <= present
        assert set(parse_mentions(record["rejected"])) - present
        assert record["chosen"] == caption(Scene([Obj(*obj) for obj in record["objects"]], noise_seed=0))
        assert "<image>" not in record["question"]


def test_pope_negatives_are_absent_and_chosen_as_specified(world):
    meta = json.loads((world / "world.json").read_text())
    frequency, cooccurrence = meta["object_frequency"], meta["cooccurrence"]
    kinds = [f"{colour} {shape}" for colour, shape in KINDS_BY_POPULARITY]
    records = read_jsonl(world / "eval/pope.jsonl")
    for split in ("random", "popular", "adversarial"):
        answers = [r["answer"] for r in records if r["split"] == split]
        assert answers.count("yes") == answers.count("no")
    for record in records:
        asked = re.fullmatch(r"is there a (\w+ \w+) in the image\?", record["question"])[1]
        present = [f"{colour} {shape}" for colour, shape, _ in record["objects"]]
        assert (asked in present) == (record["answer"] == "yes")
        if record["answer"] == "yes":
            continue
        absent = [kind for kind in kinds if kind not in present]
        if record["split"] == "popular":
            assert frequency[asked] == max(frequency[kind] for kind in absent)
        if record["split"] == "adversarial":

            def score(kind):
                return sum(cooccurrence[p][kind] for p in present), frequency[kind]

            assert score(asked) == max(score(kind) for kind in absent)


def test_prior_is_skewed_and_pairs_cooccur(world):
    meta = json.loads((world / "world.json").read_text())
    frequency = meta["object_frequency"]
    assert frequency["red circle"] > 3 * frequency["blue circle"]
    cooccurrence = meta["cooccurrence"]["red circle"]
    assert max(cooccurrence, key=cooccurrence.get) == "blue triangle"  # red circle's companion


def test_corpus_texts_cover_questions_and_answers(world):
    texts = set(corpus_texts(world))
    assert "describe the image." in texts and "yes" in texts and "no" in texts
    assert not any("<image>" in text for text in texts)


def test_normalise():
    assert normalise("  Yes.  ") == "yes"
    assert normalise("A red circle at the top.") == "a red circle at the top"


def test_exact_match_by_task():
    records = [
        {"id": "a", "task": "count", "answer": "two"},
        {"id": "b", "task": "count", "answer": "three"},
        {"id": "c", "task": "colour", "answer": "red"},
        {"id": "d", "task": "text", "answer": "four"},
    ]
    perfect = {r["id"]: r["answer"] for r in records}
    assert exact_match_by_task(records, perfect) == {"colour": 1.0, "count": 1.0, "overall": 1.0, "text": 1.0}
    predictions = {"a": "Two.", "b": "four", "c": "blue", "d": "four"}
    assert exact_match_by_task(records, predictions) == {"colour": 0.0, "count": 0.5, "overall": 0.5, "text": 1.0}


def test_pope_scores():
    records = [
        {"id": str(i), "split": "random", "answer": answer}
        for i, answer in enumerate(["yes", "yes", "yes", "no", "no", "no"])
    ]
    perfect = {r["id"]: r["answer"] for r in records}
    assert pope_scores(records, perfect)["random"] == {
        "f1": 1.0, "accuracy": 1.0, "precision": 1.0, "recall": 1.0, "yes_ratio": 0.5,
    }  # fmt: skip
    # truth: yes yes yes no no no; said: yes yes no yes no no -> tp 2, fp 1, fn 1
    predictions = dict(zip(perfect, ["Yes, there is.", "yes", "no", "yes.", "nope", "No"]))
    scores = pope_scores(records, predictions)["random"]
    assert scores == pytest.approx(
        {"f1": 2 / 3, "accuracy": 4 / 6, "precision": 2 / 3, "recall": 2 / 3, "yes_ratio": 0.5}
    )


def test_parse_mentions_is_robust():
    assert parse_mentions("a Red circle at the top, two blue squares; greenish triangle, red red circle.") == [
        ("red", "circle"),
        ("blue", "square"),
        ("red", "circle"),
    ]
    assert parse_mentions("<unk>%% circle red ,,") == []
    assert parse_mentions("") == []


def test_chair_scores():
    records = [
        {"id": "a", "objects": [["red", "circle", "top left"], ["blue", "square", "center"]]},
        {"id": "b", "objects": [["green", "triangle", "top"]]},
    ]
    perfect = {"a": "a red circle at the top left, a blue square at the center.", "b": "a green triangle at the top."}
    assert chair_scores(records, perfect) == {"chair_s": 0.0, "chair_i": 0.0, "recall": 1.0, "objects": 1.5}
    # a: mentions red circle (true) and yellow circle (invented); b: green triangle twice (counted once), true
    predictions = {
        "a": "a red circle at the top left, a yellow circle at the right.",
        "b": "a green triangle at the top, a green triangle.",
    }
    assert chair_scores(records, predictions) == pytest.approx({"chair_s": 0.5, "chair_i": 1 / 3, "recall": 2 / 3,
                                                                   "objects": 1.5})
    assert chair_scores(records, {"a": "a red circle.", "b": "nothing."})["objects"] == 0.5  # saying less


def test_pretraining_text_has_no_image_and_no_training_scene(world, tmp_path):
    from modkd.pipelines.toyworld.pretrain import text_corpus
    from modkd.pipelines.toyworld.world import read_jsonl

    a, b = text_corpus(tmp_path / "a.jsonl", n_scenes=200), text_corpus(tmp_path / "b.jsonl", n_scenes=200)
    assert a.read_bytes() == b.read_bytes()  # same seed, same bytes
    docs = read_jsonl(a)
    assert len(docs) == 200 + 50 and not any("image" in d or "<image>" in json.dumps(d) for d in docs)
    train_captions = {r["conversations"][1]["value"] for r in read_jsonl(world / "captions.jsonl")}
    described = [d["conversations"][0]["value"].split("\n")[0] for d in docs if d["task"] == "scene-text"]
    assert all(text.endswith(".") and " at the " in text for text in described)
    caption_answers = [t["value"] for d in docs for t in d["conversations"] if t["from"] == "gpt" and " at the " in t["value"]]
    assert caption_answers and len(set(caption_answers) & train_captions) < len(caption_answers)  # its own scenes


def test_transfer_set_is_the_first_images_records(tmp_path):
    from modkd.pipelines.toyworld.build import transfer_set
    from modkd.pipelines.toyworld.world import read_jsonl

    world = tmp_path / "world"  # its own: the subset file is written beside train.jsonl
    build_world(world, seed=0, **SIZES)
    assert transfer_set(world, None) == world / "train.jsonl"
    subset = read_jsonl(transfer_set(world, 8))
    everything = read_jsonl(world / "train.jsonl")
    assert len(subset) == 8 * 6 + 2 and all(r in everything for r in subset)
    assert {r["image"] for r in subset if "image" in r} == {f"images/{i:06d}.png" for i in range(8)}
