"""What a search must hold and what it minimises: the job's `targets`, read once.

Every target is turned into one number per measurement, its *usage*: the share of the allowed loss
the candidate spends (0: as good as the original, 1: exactly on the limit). A candidate holds when
every usage is at most 1; the largest usage is what the search predicts from the sensitivities and
repairs when it is over 1. The direction of each metric is fixed here: perplexity is better low, the
others high.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

HIGHER_IS_BETTER = frozenset({"embedding_cosine", "accuracy", "tokens_per_s"})
# The metrics a target may name, per model task (what the evaluator measures on that task).
TASK_METRICS = {
    "causal-lm": frozenset({"perplexity"}),
    "feature-extraction": frozenset({"embedding_cosine"}),
}
OBJECTIVES = ("size", "bits_per_weight", "latency")
DEFAULT_MAX_TRIALS = 16


@dataclass(frozen=True)
class Targets:
    max_metric_drop: dict[str, float] = field(default_factory=dict)  # relative, per metric
    min_metric: dict[str, float] = field(default_factory=dict)  # worst acceptable absolute value
    objective: str = "size"
    max_trials: int = DEFAULT_MAX_TRIALS
    max_seconds: float | None = None

    @classmethod
    def from_spec(cls, spec: dict, *, max_runtime_s: float | None = None) -> Targets:
        budget = spec.get("budget") or {}
        return cls(
            max_metric_drop=dict(spec.get("max_metric_drop") or {}),
            min_metric=dict(spec.get("min_metric") or {}),
            objective=spec.get("objective") or "size",
            max_trials=budget.get("max_trials") or DEFAULT_MAX_TRIALS,
            max_seconds=budget.get("max_seconds") or max_runtime_s,
        )

    @property
    def metrics(self) -> list[str]:
        return sorted(set(self.max_metric_drop) | set(self.min_metric))

    def usage(self, baseline: dict, measured: dict) -> dict[str, float]:
        """{target name: share of its allowed loss spent}; inf where nothing is allowed or the
        metric is missing."""
        usage = {}
        for metric, drop in self.max_metric_drop.items():
            usage[f"max_metric_drop.{metric}"] = _spent(
                metric,
                baseline.get(metric),
                measured.get(metric),
                allowed=abs(baseline.get(metric) or 0) * drop,
            )
        for metric, floor in self.min_metric.items():
            before = baseline.get(metric)
            allowed = (
                None
                if before is None
                else (before - floor if metric in HIGHER_IS_BETTER else floor - before)
            )
            usage[f"min_metric.{metric}"] = _spent(metric, before, measured.get(metric), allowed)
        return usage

    def worst_usage(self, baseline: dict, measured: dict) -> float:
        return max(self.usage(baseline, measured).values(), default=0.0)

    def to_dict(self) -> dict:
        return {
            "max_metric_drop": self.max_metric_drop,
            "min_metric": self.min_metric,
            "objective": self.objective,
            "budget": {"max_trials": self.max_trials, "max_seconds": self.max_seconds},
        }


def loss(metric: str, before: float, after: float) -> float:
    """How much worse `after` is than `before`, in the metric's own units (negative: better)."""
    return before - after if metric in HIGHER_IS_BETTER else after - before


def _spent(metric: str, before, after, allowed) -> float:
    if not _number(before) or not _number(after) or allowed is None:
        return math.inf
    lost = loss(metric, before, after)
    if allowed <= 0:
        return 0.0 if lost <= 0 else math.inf
    return max(lost, 0.0) / allowed


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
