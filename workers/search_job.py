"""A job with `targets`: the accuracy-aware search in place of the single `compress` call.

`workers.runner.execute` branches here; this module connects the engine's `search` to the job:
the search split (evaluation texts the reported evaluation never reads), trials streamed as
`metric` events and kept in storage under the job's id (a rerun after a crash does not evaluate
them again; kept after the search, so a retry after a later step fails reuses them too), and
the sensitivity cache in storage keyed by (model sha256, options, data sha256),
shared by every job on the same model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from app.storage import get_store, search_trials_key
from workers.attempt import JobContext, JobFailure

SEARCH_SETTINGS = {"seq_len": 256, "max_windows": 8, "max_samples": 64}


class StorageTrialStore:
    def __init__(self, key: str) -> None:
        self.store, self.key = get_store(), key

    def load(self) -> list[dict]:
        if not self.store.exists(self.key):
            return []
        with self.store.open(self.key) as handle:
            return json.loads(handle.read())

    def save(self, trials: list[dict]) -> None:
        self.store.put_bytes(self.key, json.dumps(trials, sort_keys=True).encode())


class StorageSensitivityCache:
    def __init__(self) -> None:
        self.store = get_store()

    def get(self, key: str) -> dict | None:
        name = f"search/sensitivity/{key}.json"
        if not self.store.exists(name):
            return None
        with self.store.open(name) as handle:
            return json.loads(handle.read())

    def put(self, key: str, value: dict) -> None:
        self.store.put_bytes(
            f"search/sensitivity/{key}.json", json.dumps(value, sort_keys=True).encode()
        )


@dataclass
class Found:
    result: Any  # engine Result: the chosen model and its stage summaries
    recipe: dict  # the chosen recipe, per-layer modules included
    metrics: dict  # {"trials": [...], "search": {...}}


def run_search(
    context: JobContext, job: Any, loaded: Any, inputs: Any, calibration: Any, device: Any
) -> Found:
    from workers.compression.engine import Result
    from workers.compression.recipe import EvaluationSettings, Recipe
    from workers.compression.search import SearchSplitError, Targets, search, search_split
    from workers.compression.streaming import store_of

    if store_of(loaded.model) is not None:
        raise JobFailure(
            "invalid_request", "a search needs the model whole in memory; this one is streamed"
        )

    evaluation = {k: v for k, v in (job.evaluation or {}).items() if k != "dataset_id"}
    reported = EvaluationSettings.model_validate(evaluation)
    try:
        records, split = search_split(
            inputs.evaluation_records, reported, loaded.tokenizer, loaded.task
        )
    except SearchSplitError as exc:
        raise JobFailure("invalid_request", str(exc)) from exc
    targets = Targets.from_spec(job.targets, max_runtime_s=job.max_runtime_s)
    store = StorageTrialStore(search_trials_key(context.job_id))
    search_index = 2  # the "search" stage of context.stage_names

    def on_trial(trial: dict) -> None:
        held = "holds" if trial["held"] else "misses"
        context.log(
            f"trial {trial['index']} ({trial['kind']}): {trial['bits_per_weight']:.2f} bits/weight, "
            f"{held} the targets",
            {"trial": trial},
            type="metric",
        )

    found = search(
        loaded.model,
        task=loaded.task,
        tokenizer=loaded.tokenizer,
        targets=targets,
        recipe=Recipe.model_validate(job.recipe),
        calibration=calibration,
        search_records=records,
        settings=EvaluationSettings(**SEARCH_SETTINGS),
        device=device,
        model_sha=inputs.model_row.sha256 or inputs.model_row.id,
        cache=StorageSensitivityCache(),
        trial_store=store,
        progress=lambda message: context.progress(search_index, 0, 1, message, force=True),
        on_trial=on_trial,
        on_step=context.check,
        granularity=(job.targets or {}).get("granularity") or "block",
    )
    context.progress(search_index, 1, 1, found.message, force=True)
    if not found.targets_met:
        context.log(found.message, level="warning")
    stages = [{"method": "search", "message": found.message, "trials": len(found.trials)}]
    return Found(
        result=Result(model=found.model, stages=stages),
        recipe=found.recipe.model_dump(mode="json"),
        metrics={
            "trials": found.trials,
            "search": {
                **found.report,
                "search_split": split,
                "held_on_search_split": found.targets_met,
                "message": found.message,
            },
        },
    )
