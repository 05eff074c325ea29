"""python -c "import json; from modkd.pipelines.toyworld.report import comparison_table as t; print(t(json.load(open('runs/demo/results.json'))))"

Markdown tables of toy-world evaluation results.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

TASKS = ("count", "colour", "position", "exist", "text", "overall")
POPE_SPLITS = ("random", "popular", "adversarial")


def parameters(model_dir: Path) -> dict:
    """Parameter counts from the safetensors header (no weights loaded). A token activates every dense
    parameter and k of the E experts of each MoE layer."""
    from safetensors import safe_open

    text = json.loads((Path(model_dir) / "config.json").read_text()).get("text_config", {})
    total = experts = 0
    with safe_open(Path(model_dir) / "model.safetensors", framework="numpy") as f:
        for name in f.keys():
            n = 1
            for d in f.get_slice(name).get_shape():
                n *= d
            total += n
            experts += n if ".mlp.experts." in name else 0
    active = total
    if text.get("model_type") == "qwen2_moe":
        active = total - experts + experts * text["num_experts_per_tok"] // text["num_experts"]
    return {"params_total": total, "params_active": active}


def em_standard_error(r: dict) -> float:
    """Binomial standard error of EM overall over the evaluation's QA probes."""
    p, n = r["exact_match"]["overall"], len(r["qa_hits"])
    return math.sqrt(p * (1 - p) / n)


def comparison_table(results: dict[str, dict]) -> str:
    """One row per model. POPE accuracy sits beside F1 because F1 rewards saying "yes": a model that always
    answers yes scores F1 0.667 at accuracy 0.5; object recall and distinct captions sit beside CHAIR because
    a captioner that names one popular object in every caption lowers CHAIR without describing the images."""
    head = ["model", *[f"EM {t}" for t in TASKS[:-1]], "EM overall ± SE", "POPE F1 (mean of 3)", "POPE acc",
            "CHAIR_s", "CHAIR_i", "object recall", "objects / caption", "distinct captions", "params (active)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        se = f" ± {em_standard_error(r):.3f}" if "qa_hits" in r else ""
        distinct = r["chair"].get("distinct")
        cells = [name, *[f"{r['exact_match'].get(t, float('nan')):.3f}" for t in TASKS[:-1]],
                 f"{r['exact_match']['overall']:.3f}{se}", f"{_pope_mean(r, 'f1'):.3f}", f"{_pope_mean(r, 'accuracy'):.3f}",
                 f"{r['chair']['chair_s']:.3f}", f"{r['chair']['chair_i']:.3f}", f"{r['chair']['recall']:.3f}",
                 f"{r['chair']['objects']:.2f}" if "objects" in r["chair"] else "n/a", "n/a" if distinct is None else str(distinct),
                 f"{r['params_total'] / 1e6:.2f}M ({r['params_active'] / 1e6:.2f}M)"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


SEED_COLUMNS = {  # column -> value of one evaluation; POPE values are means over the three splits
    "EM overall": lambda r: r["exact_match"]["overall"],
    "POPE F1": lambda r: _pope_mean(r, "f1"),
    "POPE acc": lambda r: _pope_mean(r, "accuracy"),
    "POPE yes-ratio": lambda r: _pope_mean(r, "yes_ratio"),
    "CHAIR_s": lambda r: r["chair"]["chair_s"],
    "CHAIR_i": lambda r: r["chair"]["chair_i"],
    "object recall": lambda r: r["chair"]["recall"],
    "objects / caption": lambda r: r["chair"].get("objects", float("nan")),
}


def seeds_table(results: dict[str, list[dict]]) -> str:
    """One row per arm: mean +- sample std over its runs (seeds) of each SEED_COLUMNS value, and n."""
    head = ["arm", *SEED_COLUMNS, "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in results.items():
        cells = [name]
        for value in SEED_COLUMNS.values():
            xs = [value(r) for r in runs]
            mean = sum(xs) / len(xs)
            std = (sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
            cells.append(f"{mean:.3f} ± {std:.3f}" if len(xs) > 1 else f"{mean:.3f}")
        lines.append("| " + " | ".join([*cells, str(len(runs))]) + " |")
    return "\n".join(lines)


def _pope_mean(r: dict, key: str) -> float:
    splits = [r["pope"][s][key] for s in POPE_SPLITS if s in r["pope"]]
    return sum(splits) / len(splits)


if __name__ == "__main__":
    import sys

    print(comparison_table(json.loads(Path(sys.argv[1]).read_text())))
