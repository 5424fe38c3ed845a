"""The one engine verb: `compress(model, recipe, calibration, progress=...) -> Result`."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import workers.compression.methods  # noqa: F401  (registers every method)
from workers.compression.calibration import BlockCheckpoint
from workers.compression.layer_selection import untie_targeted
from workers.compression.progress import ProgressFn
from workers.compression.recipe import Recipe
from workers.compression.registry import StageContext, StageResources, method_for


@dataclass
class Result:
    # The object that was passed in, changed in place -- except after a `distill` stage whose
    # student is another model: then that model.
    model: nn.Module
    stages: list[dict]  # one summary per stage, in recipe order


def compress(
    model: nn.Module,
    recipe: Recipe,
    calibration: list[torch.Tensor] | None = None,
    *,
    progress: ProgressFn | None = None,
    checkpoints: Callable[[int], BlockCheckpoint] | None = None,
    resources: StageResources | None = None,
    after_stage: Callable[[int, nn.Module], dict] | None = None,
) -> Result:
    """Run the recipe's stages in order on `model`, in place.

    `calibration` is a list of [1, seq_len] input_ids tensors for the stages that need them
    (`needs_calibration`); without it such a recipe is refused before its first stage runs.
    `progress` is called between steps; an exception it raises stops the run and propagates (that
    is how a job is cancelled), leaving the model part-way through the current stage.
    `checkpoints(stage_index)` gives layer-by-layer stages a place to record finished blocks, so a
    rerun after a crash resumes from the last one instead of starting over (training stages keep
    their step checkpoints there too). `resources` gives training stages their text and other
    models. `after_stage(index, model)` runs after every stage but the last; what it returns (the
    job measures quality there) is kept in that stage's summary as `metrics`.
    """
    if not calibration:
        # Refused before any stage runs, so the model is left as it came.
        needing = next((stage for stage in recipe.stages if stage.needs_calibration), None)
        if needing is not None:
            raise ValueError(f"{needing.method} needs calibration data")
    summaries = []
    needs_original = any(stage.needs_original() for stage in recipe.stages)
    original = copy.deepcopy(model) if needs_original else None
    for index, stage in enumerate(recipe.stages):
        context = StageContext(
            method=stage.method,
            calibration=calibration,
            stage_index=index,
            num_stages=len(recipe.stages),
            progress=progress,
            checkpoint=checkpoints(index) if checkpoints is not None else None,
            resources=resources,
            original=original,
        )
        started = time.perf_counter()
        untied = untie_targeted(model, stage)
        summary = method_for(stage)(model, stage, context)
        if untied:
            summary = {**summary, "untied": untied}
        if context.replaced_by is not None:
            model = context.replaced_by
        summary = {
            "method": stage.method,
            "config": stage.model_dump(mode="json"),
            "seconds": round(time.perf_counter() - started, 3),
            **summary,
        }
        if after_stage is not None and index < len(recipe.stages) - 1:
            summary["metrics"] = after_stage(index, model)
        summaries.append(summary)
    return Result(model=model, stages=summaries)
