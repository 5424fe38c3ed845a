"""The baseline cache: the original model's metrics, measured once and reused by the project's
later jobs that measure it the same way.

Measuring the original is often most of a job (18 of 33 minutes for SmolLM2 on a busy CPU), and it
does not depend on the recipe. Its numbers depend on (`baseline_inputs`, hashed into the key as
`workers.result_cache` hashes a job's inputs): the model's bytes (sha256), the resolved evaluation
settings and the task, the evaluation data's sha256, the device class and whether the model runs
streamed block by block, the versions of torch, transformers, compressed-tensors and slimformer,
and a digest of the code that loads and measures a model (`EVALUATION_SOURCES`; an edit there
measures again, an edit to a compression method does not).

**Latency is never cached**: it is measured beside the compressed model in the same process, so
the two numbers come from the same machine in the same state (the peak memory measured with it
likewise). A hit still loads the model, measures its latency, and reads everything else from here.

Besides numbers, the compressed model's `embedding_cosine` and `accuracy` need what the baseline
left in the evaluator: its sentence embeddings and the probe fitted on them
(`Evaluator.baseline_state`). They are kept in storage, keyed, next to the row.

Entries are per project (a job id from another project is never named), written by the first
job that measures (even one that later fails: the baseline was right), never updated; the first
writer wins a race. `cache: false` on a job measures afresh and records nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.db.session import session_scope
from app.db.tables import BaselineMetrics
from app.storage import get_store
from workers.result_cache import LIBRARIES, source_digest, versions

log = logging.getLogger("slimformer.baseline_cache")

# The code a baseline's numbers depend on: how a model is loaded and measured, and the settings'
# defaults (an engine method's source is not among them).
EVALUATION_SOURCES = (
    "compression/evaluation.py",
    "compression/data.py",
    "compression/loading.py",
    "compression/streaming.py",
    "compression/recipe.py",
    "compression/formats",
)
# What `Evaluator._latency` reports: measured by every job, never read from the cache.
LATENCY_KEYS = ("latency", "latency_reason", "tokens_per_s", "peak_memory_bytes")


@dataclass
class CachedBaseline:
    metrics: dict  # without latency
    job_id: str  # the job that measured them
    state: dict[str, Any]  # the evaluator's baseline state (tensors), see module docstring


def baseline_inputs(
    *, model_sha256: str, evaluator: Any, dataset_sha256: str, device_class: str, streamed: bool
) -> dict:
    # Latency is measured by every job, so neither asking for it nor its settings change the key.
    settings = evaluator.settings.model_dump(mode="json", exclude={"latency", "metrics"})
    return {
        "model_sha256": model_sha256,
        "task": evaluator.task,
        "metrics": sorted(metric for metric in evaluator.metrics if metric != "latency"),
        "settings": settings,
        "dataset_sha256": dataset_sha256,
        "device": device_class,
        "streamed": streamed,
        "versions": {name: versions()[name] for name in LIBRARIES},
        "evaluation_code": evaluation_digest(),
    }


def evaluation_digest() -> str:
    """sha256 over `EVALUATION_SOURCES`, named and in a fixed order."""
    return source_digest(EVALUATION_SOURCES)


def without_latency(metrics: dict) -> dict:
    return {
        key: value
        for key, value in metrics.items()
        if key not in LATENCY_KEYS and not key.startswith("latency_")
    }


def lookup(*, project_id: str, key: str) -> CachedBaseline | None:
    """The project's entry for `key`, or None (none, its stored state is gone, or it cannot be
    read now: the cache only saves time, so a database or storage blip measures afresh)."""
    try:
        return _lookup(project_id, key)
    except Exception:  # noqa: BLE001 - see the docstring
        log.warning("baseline cache unreadable; measuring the original model", exc_info=True)
        return None


def _lookup(project_id: str, key: str) -> CachedBaseline | None:
    with session_scope() as session:
        row = session.get(BaselineMetrics, (project_id, key))
        if row is None:
            return None
        metrics, job_id, state_key = row.metrics, row.job_id, row.state_key
    state: dict[str, Any] = {}
    if state_key is not None:
        import safetensors.torch

        store = get_store()
        if not store.exists(state_key):
            return None
        with store.open(state_key) as stream:
            state = safetensors.torch.load(stream.read())
    return CachedBaseline(metrics=metrics, job_id=job_id, state=state)


def remember(
    *, project_id: str, key: str, inputs: dict, job_id: str, metrics: dict, state: dict
) -> None:
    """Record a measured baseline (latency left out); the first entry for a key stays. Never
    fails the job: what cannot be recorded now is measured again by a later job."""
    try:
        _remember(project_id, key, inputs, job_id, metrics, state)
    except Exception:  # noqa: BLE001 - see the docstring
        log.warning("baseline not recorded in the cache", exc_info=True)


def _remember(
    project_id: str, key: str, inputs: dict, job_id: str, metrics: dict, state: dict
) -> None:
    state_key = None
    if state:
        import safetensors.torch

        state_key = f"baseline-cache/{project_id}/{key}.safetensors"
        get_store().put_bytes(state_key, safetensors.torch.save(state))
    try:
        with session_scope() as session:
            exists = session.scalar(
                select(BaselineMetrics.job_id).where(
                    BaselineMetrics.project_id == project_id, BaselineMetrics.fingerprint == key
                )
            )
            if exists is None:
                session.add(
                    BaselineMetrics(
                        project_id=project_id,
                        fingerprint=key,
                        job_id=job_id,
                        metrics=without_latency(metrics),
                        inputs=inputs,
                        state_key=state_key,
                    )
                )
    except IntegrityError:
        pass  # another job of the project recorded the same baseline first: the same numbers
