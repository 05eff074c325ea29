"""Scores for the toy world's eval splits: exact match per task, POPE, CHAIR-style hallucination.

    from modkd.pipelines.toyworld.metrics import exact_match_by_task, pope_scores, chair_scores

`records` are the lines of eval/qa.jsonl, eval/pope.jsonl or eval/caption.jsonl; `predictions` maps a
record's "id" to the model's generated text.
"""

from __future__ import annotations

import re
from collections import defaultdict

from modkd.pipelines.toyworld.world import COLOURS, SHAPES

MENTION = re.compile(r"\b(" + "|".join(sorted(COLOURS)) + r")\s+(" + "|".join(SHAPES) + r")s?\b")


def normalise(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


def exact_match_hits(records: list[dict], predictions: dict[str, str]) -> list[int]:
    """1 where the normalised prediction equals record["answer"], else 0, in record order."""
    return [int(normalise(predictions[record["id"]]) == normalise(record["answer"])) for record in records]


def exact_match_by_task(records: list[dict], predictions: dict[str, str]) -> dict[str, float]:
    """Accuracy of normalised exact match against record["answer"], per record["task"] and "overall"."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for record, hit in zip(records, exact_match_hits(records, predictions)):
        hits[record["task"]].append(bool(hit))
        hits["overall"].append(hit)
    return {task: sum(values) / len(values) for task, values in sorted(hits.items())}


def pope_scores(records: list[dict], predictions: dict[str, str]) -> dict[str, dict[str, float]]:
    """Per record["split"]: F1/precision/recall with "yes" as the positive class, accuracy, share of yes answers."""
    by_split: dict[str, list[tuple[bool, bool]]] = defaultdict(list)  # (said yes, truly yes)
    for record in records:
        said_yes = normalise(predictions[record["id"]]).startswith("yes")
        by_split[record["split"]].append((said_yes, record["answer"] == "yes"))
    scores = {}
    for split, pairs in sorted(by_split.items()):
        true_pos = sum(said and truth for said, truth in pairs)
        said_yes = sum(said for said, _ in pairs)
        truly_yes = sum(truth for _, truth in pairs)
        precision = true_pos / said_yes if said_yes else 0.0
        recall = true_pos / truly_yes if truly_yes else 0.0
        scores[split] = {
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "accuracy": sum(said == truth for said, truth in pairs) / len(pairs),
            "precision": precision,
            "recall": recall,
            "yes_ratio": said_yes / len(pairs),
        }
    return scores


def parse_mentions(caption: str) -> list[tuple[str, str]]:
    """Every "<colour> <shape>" in the text, in order, repeats kept; anything else is ignored."""
    return [(colour, shape) for colour, shape in MENTION.findall(caption.lower())]


def chair_scores(records: list[dict], predictions: dict[str, str]) -> dict[str, float]:
    """CHAIR over object kinds (location ignored); each caption's mentions counted once per kind.

    chair_s: share of captions with at least one hallucinated kind; chair_i: hallucinated mentions over
    all mentions; recall: present kinds mentioned over all present kinds; objects: kinds named per caption
    (a captioner that says less lowers CHAIR without seeing better).
    """
    hallucinating_captions = hallucinated = mentioned = present_mentioned = present_total = 0
    for record in records:
        present = {(colour, shape) for colour, shape, _ in record["objects"]}
        mentions = set(parse_mentions(predictions[record["id"]]))
        invented = mentions - present
        hallucinating_captions += bool(invented)
        hallucinated += len(invented)
        mentioned += len(mentions)
        present_mentioned += len(mentions & present)
        present_total += len(present)
    return {
        "chair_s": hallucinating_captions / len(records),
        "chair_i": hallucinated / mentioned if mentioned else 0.0,
        "recall": present_mentioned / present_total,
        "objects": mentioned / len(records),
    }
