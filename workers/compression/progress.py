"""Progress reports from the engine to whoever runs it.

The callback is also the cancellation point: the job runner raises from it when a job is being
cancelled, and the engine lets that exception propagate, so work stops between two steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ProgressUpdate:
    stage: str  # the stage's method name, e.g. "dynamic_int8"
    stage_index: int  # 0-based position of the stage in the recipe
    num_stages: int
    step: int  # steps finished within the stage
    total_steps: int
    message: str
    data: dict[str, Any] | None = None  # numbers behind the message (a training step's loss, ...)
    unit: str = "step"  # what a step is, as a person counts it: "block", "layer", "step"


ProgressFn = Callable[[ProgressUpdate], None]
