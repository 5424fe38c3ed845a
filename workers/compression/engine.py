"""The one engine verb: `compress(model, recipe, calibration, progress=...) -> Result`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import workers.compression.methods  # noqa: F401  (registers every method)
from workers.compression.calibration import BlockCheckpoint
from workers.compression.progress import ProgressFn
from workers.compression.recipe import Recipe
from workers.compression.registry import StageContext, method_for
from workers.compression.targets import untie_targeted


@dataclass
class Result:
    model: nn.Module  # the same object that was passed in, changed in place
    stages: list[dict]  # one summary per stage, in recipe order


def compress(
    model: nn.Module,
    recipe: Recipe,
    calibration: list[torch.Tensor] | None = None,
    *,
    progress: ProgressFn | None = None,
    checkpoints: Callable[[int], BlockCheckpoint] | None = None,
) -> Result:
    """Run the recipe's stages in order on `model`, in place.

    `calibration` is a list of [1, seq_len] input_ids tensors for the methods that need them.
    `progress` is called between steps; an exception it raises stops the run and propagates (that
    is how a job is cancelled), leaving the model part-way through the current stage.
    `checkpoints(stage_index)` gives layer-by-layer stages a place to record finished blocks, so a
    rerun after a crash resumes from the last one instead of starting over.
    """
    summaries = []
    for index, stage in enumerate(recipe.stages):
        context = StageContext(
            method=stage.method,
            calibration=calibration,
            stage_index=index,
            num_stages=len(recipe.stages),
            progress=progress,
            checkpoint=checkpoints(index) if checkpoints is not None else None,
        )
        started = time.perf_counter()
        untied = untie_targeted(model, stage)
        summary = method_for(stage)(model, stage, context)
        if untied:
            summary = {**summary, "untied": untied}
        summaries.append(
            {
                "method": stage.method,
                "config": stage.model_dump(mode="json"),
                "seconds": round(time.perf_counter() - started, 3),
                **summary,
            }
        )
    return Result(model=model, stages=summaries)
