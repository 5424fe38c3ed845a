"""A job's progress as one fraction and one ETA, from the phases it will go through.

A job is a fixed list of phases (load, measure the original, each recipe stage, export, measure
the result, package), each reporting `step` of `total_steps` as it works. Before anything has run,
the only knowledge of how long a phase takes is a rough size of its work (`Phase.weight`: about a
thousand tokens through the model per unit, see `workers.runner.job_phases`); the weights give the
overall fraction, which therefore only moves forward.

The ETA is measured, not assumed: the phase under way is extrapolated from its own pace so far
(the time it has run over the share of its steps done; blended, early in the phase, with its
weight at the job's pace), and the phases still to come from the seconds per weight unit
observed on the whole job so far. It is recomputed at every update, so it
follows a phase that turns out slower or faster than its weight said. Nothing is promised before
a little of the job has been seen (`MIN_OBSERVED`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

# Share of the job's weight, and seconds, to have seen before an ETA is given: an ETA from the
# first fraction of a percent is a guess that jumps, and users learn to ignore jumping ETAs.
MIN_OBSERVED = 0.01
MIN_OBSERVED_S = 1.0


@dataclass(frozen=True)
class Phase:
    name: str  # what `progress.stage` reports: "load", "baseline", a method, "export", ...
    label: str  # how a person reads it: "measuring the original", "stage 1 of 2 · gptq"
    weight: float  # rough size of its work, relative to the other phases (> 0)
    recipe_stage: int | None = None  # its 0-based position in the recipe, for recipe stages


@dataclass(frozen=True)
class Estimate:
    fraction: float  # of the whole job, never lower than an earlier estimate's
    eta_s: float | None  # seconds left, None until enough has been observed


class ProgressPlan:
    def __init__(self, phases: list[Phase], *, clock: Callable[[], float] = time.monotonic):
        if not phases or any(phase.weight <= 0 for phase in phases):
            raise ValueError("a plan needs phases, each with a positive weight")
        self.phases = phases
        self.clock = clock
        self.started = clock()
        self.total = sum(phase.weight for phase in phases)
        self._before = [sum(phase.weight for phase in phases[:i]) for i in range(len(phases))]
        self._phase: int = 0
        self._phase_started = self.started
        self._last_update = self.started
        self._fraction = 0.0

    def reweigh(self, weights: list[float]) -> None:
        """New weights for the same phases, once more is known of their work (the fraction so
        far is kept: it never moves back)."""
        if len(weights) != len(self.phases) or any(weight <= 0 for weight in weights):
            raise ValueError("one positive weight per phase")
        self.phases = [
            Phase(phase.name, phase.label, weight, phase.recipe_stage)
            for phase, weight in zip(self.phases, weights, strict=True)
        ]
        self.total = sum(weights)
        self._before = [sum(weights[:i]) for i in range(len(weights))]

    def update(self, index: int, step: int, total_steps: int) -> Estimate:
        """Phase `index` has done `step` of `total_steps`; the job's fraction and ETA now."""
        now = self.clock()
        if index > self._phase:
            # A later phase began, at the latest report of the one before (which ends on a
            # report of its last step), not at its own first report, which may come a step late.
            self._phase, self._phase_started = index, self._last_update
        self._last_update = now
        late = index < self._phase  # a late report from an earlier phase: this one, at step 0
        index = self._phase
        within = 0.0 if late or not total_steps else min(1.0, step / total_steps)
        done = self._before[index] + self.phases[index].weight * within
        self._fraction = max(self._fraction, min(1.0, done / self.total))
        return Estimate(fraction=self._fraction, eta_s=self._eta(now, index, within, done))

    def _eta(self, now: float, index: int, within: float, done: float) -> float | None:
        elapsed = now - self.started
        if done / self.total < MIN_OBSERVED or elapsed < MIN_OBSERVED_S:
            return None
        seconds_per_weight = elapsed / done
        phase_elapsed = now - self._phase_started
        # The phase under way: its weight at the job's pace so far, and its own pace, trusted
        # more as more of it is done (its first step is often its slowest: caches, warm-up).
        expected = self.phases[index].weight * seconds_per_weight
        if within > 0:
            own_pace = phase_elapsed * (1 - within) / within
            current = within * own_pace + (1 - within) * expected * (1 - within)
        else:
            current = max(0.0, expected - phase_elapsed)
        later = self.total - self._before[index] - self.phases[index].weight
        return round(current + later * seconds_per_weight, 1)

    @property
    def recipe_stages(self) -> int:
        return sum(phase.recipe_stage is not None for phase in self.phases)

    def label(self, index: int, detail: str | None = None) -> str:
        """`stage 1 of 2 · gptq · block 12/30`, `measuring the original · window 7/20`."""
        base = self.phases[index].label
        return f"{base} · {detail}" if detail else base
