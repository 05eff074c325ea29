"""The committed toy teacher (pipelines/toyworld/prebuilt/teacher) is what `mod-pipeline toy --train` makes.

    pytest tests/test_prebuilt.py -q                      # the copy is taken for the default config only
    MODKD_SLOW_TESTS=1 pytest tests/test_prebuilt.py -q   # + retrain it from its seed and compare (19 min on 2 shared cores)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import pytest

from modkd.pipelines.toyworld.build import PREBUILT, TEACHER_FIELDS, ToyConfig, build_toy
from modkd.pipelines.toyworld.models import TEACHER_LLM


def test_the_prebuilt_teacher_is_the_default_configs_and_is_copied_not_trained(tmp_path, monkeypatch):
    made = json.loads((PREBUILT / "toy.json").read_text())
    assert made["llm"] == TEACHER_LLM
    assert {f: made["config"][f] for f in TEACHER_FIELDS} == {f: asdict(ToyConfig())[f] for f in TEACHER_FIELDS}
    monkeypatch.setenv("MODKD_HOME", str(tmp_path))
    messages = []
    toy = build_toy(ToyConfig(), log=messages.append)
    assert any("copying the pre-built one" in m for m in messages) and not any("training" in m for m in messages)
    assert (toy.teacher / "model.safetensors").read_bytes() == (PREBUILT / "model.safetensors").read_bytes()
    messages.clear()
    build_toy(ToyConfig(), log=messages.append)
    assert any("teacher: reusing" in m for m in messages)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MODKD_SLOW_TESTS"), reason="retrains the toy teacher (19 min on 2 shared cores): "
                                                                   "set MODKD_SLOW_TESTS=1")
def test_retraining_from_the_same_seed_reproduces_the_prebuilt_evaluation(tmp_path, monkeypatch):
    from modkd.pipelines.toyworld.evaluate import evaluate

    monkeypatch.setenv("MODKD_HOME", str(tmp_path))
    toy = build_toy(ToyConfig(), train=True)
    ours, shipped = evaluate(toy.teacher, toy.world), evaluate(PREBUILT, toy.world)
    n = len(ours["qa_hits"])
    for task in ("overall", "count", "colour", "position", "exist"):
        a, b = ours["exact_match"][task], shipped["exact_match"][task]
        m = n if task == "overall" else n * 4 // 17  # 4 of every 17 probes per image task (one text probe per 4 images)
        se = math.sqrt(max(a * (1 - a), b * (1 - b), 0.05) * 2 / m)  # the difference of two binomial estimates
        assert abs(a - b) <= 3 * se, (task, a, b)
    assert abs(ours["chair"]["chair_s"] - shipped["chair"]["chair_s"]) <= 3 * math.sqrt(0.5 / ToyConfig().n_eval_images)
