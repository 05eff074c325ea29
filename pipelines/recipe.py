"""python -c "from modkd.pipelines.recipe import recipe; print(recipe('d2s'))"   # a stage's defaults

Stage recipes: pipelines/recipes/STAGE.yaml holds each stage's LLaVA-MoD Table 10 values and its loss
weights. Every way of starting a run (the CLI, the toy pipelines) starts from the recipe.
"""

from __future__ import annotations

from importlib import resources

import yaml

from modkd.student.config import STAGES, TrainConfig


def recipe(stage: str) -> dict:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    return yaml.safe_load(resources.files("modkd.pipelines").joinpath(f"recipes/{stage}.yaml").read_text())


def stage_config(stage: str, **values) -> TrainConfig:
    """The recipe of `stage` with `values` (paths and overrides) on top."""
    return TrainConfig(stage=stage, **{**recipe(stage), **values})
