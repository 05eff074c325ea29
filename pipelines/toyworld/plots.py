"""python -m modkd.pipelines.toyworld.plots OUT.png RUN_DIR [RUN_DIR ...]   # loss curves of training runs

PNG plots of training curves from each run's OUT/metrics.jsonl (the points the trainer also sends to
TensorBoard): one panel per scalar that any of the runs logged, one line per run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

SCALARS = ("loss/kd", "loss/lm", "loss/pd", "rewards/margins", "z")  # plotted when logged and not constant 0


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def training_curves(runs: dict[str, Path], out: Path, title: str = "") -> Path | None:
    """Writes `out` with a panel per scalar of SCALARS that some run logged; None when no run logged any."""
    series = {label: read_metrics(run) for label, run in runs.items()}
    keys = [k for k in SCALARS if any(any(row.get(k) for row in rows) for rows in series.values())]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, rows in series.items():
            points = [(row["step"], row[key]) for row in rows if key in row]
            if points:
                ax.plot(*zip(*points), label=label, linewidth=1.2)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(training_curves({Path(p).name: Path(p) for p in sys.argv[2:]}, Path(sys.argv[1])))
