from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.responses import RowOut
from app.webhooks.schemas import EventName
from workers.compression.recipe import EvaluationSettings, Recipe


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CalibrationSpec(Strict):
    dataset_id: str | None = None  # None: the built-in calibration set that fits the model's task
    num_samples: int = Field(default=128, ge=1, le=100_000)
    seq_len: int = Field(default=512, ge=8, le=32_768)
    seed: int = Field(default=0, ge=0)


class EvaluationSpec(EvaluationSettings):
    dataset_id: str | None = None  # None: the built-in that fits the model's task


# The metrics a search can hold (workers/compression/search/targets.py knows their direction);
# which of them fit the model's task is checked at submission (app/jobs/resolver.py).
TargetMetric = Literal["perplexity", "embedding_cosine"]


class BudgetSpec(Strict):
    max_trials: int = Field(default=16, ge=1, le=256)
    max_seconds: int | None = Field(default=None, ge=10, le=7 * 24 * 3600)  # None: max_runtime_s


class TargetsSpec(Strict):
    """An accuracy-aware search: the smallest model (by `objective`) that holds every target."""

    max_metric_drop: dict[TargetMetric, float] = Field(default_factory=dict)  # relative
    min_metric: dict[TargetMetric, float] = Field(default_factory=dict)  # worst acceptable value
    objective: Literal["size", "bits_per_weight", "latency"] = "size"
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    # What takes one precision in a mixed pick: a block's layers together, or each layer alone
    # (more sensitivities to measure, finer picks: bench/results/search.md).
    granularity: Literal["block", "layer"] = "block"

    @field_validator("max_metric_drop")
    @classmethod
    def _drops_are_fractions(cls, value: dict[str, float]) -> dict[str, float]:
        for metric, drop in value.items():
            if not 0 <= drop <= 10:
                raise ValueError(f"max_metric_drop.{metric} is a fraction: 0 to 10, got {drop}")
        return value

    @field_validator("min_metric")
    @classmethod
    def _finite(cls, value: dict[str, float]) -> dict[str, float]:
        for metric, floor in value.items():
            if not math.isfinite(floor):
                raise ValueError(f"min_metric.{metric} must be a finite number")
        return value

    @model_validator(mode="after")
    def _something_to_hold(self) -> TargetsSpec:
        if not self.max_metric_drop and not self.min_metric:
            raise ValueError("targets needs max_metric_drop or min_metric: what must hold")
        return self


class ExportSpec(Strict):
    formats: list[Literal["safetensors"]] = Field(
        default_factory=lambda: ["safetensors"], min_length=1
    )


class ResourcesSpec(Strict):
    # cpu | gpu: only a worker of that class runs the job; any: routed by app.jobs.routing.
    device: Literal["cpu", "gpu", "any"] = "any"


class WebhookSpec(Strict):
    url: str = Field(min_length=1, max_length=2000)
    events: list[EventName] = Field(
        default_factory=lambda: ["job.succeeded", "job.failed"], min_length=1
    )


class WebhookOut(BaseModel):
    url: str
    events: list[str]
    endpoint_id: str
    secret: str | None = None  # only in the creation response


class JobCreate(Strict):
    model_id: str
    # None: only with `targets`, which then search the default space for the model's task and the
    # job's device (workers/compression/search/defaults.py; app/jobs/resolver.py fills it in).
    recipe: Recipe | None = None
    calibration: CalibrationSpec | None = None
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    targets: TargetsSpec | None = None
    export: ExportSpec = Field(default_factory=ExportSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    # Higher first; orders the job's queue on both brokers (app/broker.py).
    priority: int = Field(default=0, ge=0, le=9)
    # False: run even when an earlier succeeded job had the same inputs (workers/result_cache.py).
    cache: bool = True
    max_runtime_s: int | None = Field(default=None, ge=10, le=7 * 24 * 3600)
    max_attempts: int | None = Field(default=None, ge=1, le=10)
    metadata: dict[str, str] = Field(default_factory=dict, max_length=32)
    webhook: WebhookSpec | None = None

    @field_validator("metadata")
    @classmethod
    def _short_values(cls, value: dict[str, str]) -> dict[str, str]:
        for key, item in value.items():
            if len(key) > 64 or len(item) > 512:
                raise ValueError("metadata keys are at most 64 characters, values at most 512")
        return value


class Progress(BaseModel):
    stage: str | None = None
    stage_index: int | None = None
    num_stages: int | None = None
    step: int | None = None
    total_steps: int | None = None
    fraction: float = 0.0
    eta_s: float | None = None
    message: str | None = None
    updated_at: datetime | None = None
    # Additions (API-additions.md, "progress"): what a person reads, the recipe's numbering.
    label: str | None = None
    recipe_stage_index: int | None = None
    recipe_num_stages: int | None = None
    elapsed_s: float | None = None


class JobError(BaseModel):
    code: str
    message: str
    retryable: bool = False


class JobOut(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: str
    model_id: str
    recipe: dict[str, Any]
    calibration: dict[str, Any] | None
    evaluation: dict[str, Any] | None
    targets: dict[str, Any] | None
    export: dict[str, Any]
    resources: ResourcesSpec
    priority: int
    cache: bool = True
    max_runtime_s: int
    metadata: dict[str, Any]
    progress: Progress
    metrics: dict[str, Any] | None
    error: JobError | None
    attempt: int
    max_attempts: int
    artifact_ids: list[str]
    webhook: WebhookOut | None = None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


class JobEventOut(RowOut):
    seq: int
    type: str
    level: str
    message: str
    data: dict[str, Any] | None
    created_at: datetime


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobOut]
    has_more: bool


class JobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEventOut]
    has_more: bool
