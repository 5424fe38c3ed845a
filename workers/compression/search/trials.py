"""Trials: every candidate the search evaluated, as the job reports them, and where they are kept
so that a search resumed after a crash does not evaluate them again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

TRIAL_KINDS = ("ladder", "mixed", "repair", "basic")


class TrialStore(Protocol):
    """Finished trials, in order, kept across attempts of one job."""

    def load(self) -> list[dict]: ...
    def save(self, trials: list[dict]) -> None: ...


class MemoryTrialStore:
    def __init__(self) -> None:
        self.trials: list[dict] = []

    def load(self) -> list[dict]:
        return [dict(trial) for trial in self.trials]

    def save(self, trials: list[dict]) -> None:
        self.trials = [dict(trial) for trial in trials]


class FileTrialStore:
    """One JSON file, replaced whole after each trial (a crash leaves the previous list)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> list[dict]:
        if not self.path.exists():
            return []
        return json.loads(self.path.read_text(encoding="utf-8"))

    def save(self, trials: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(trials, sort_keys=True), encoding="utf-8")
        partial.replace(self.path)


def mark_pareto(trials: list[dict], objective_key: str, *, quality_key: str = "usage") -> None:
    """Set `pareto` on each trial: no other trial is at least as good on both quality (lower
    `quality_key`) and the objective, and strictly better on one."""
    for trial in trials:
        q, o = trial[quality_key], trial[objective_key]
        trial["pareto"] = not any(
            other is not trial
            and other[quality_key] <= q
            and other[objective_key] <= o
            and (other[quality_key] < q or other[objective_key] < o)
            for other in trials
        )
