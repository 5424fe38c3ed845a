from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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


class TargetsSpec(Strict):
    max_metric_drop: dict[str, float] = Field(default_factory=dict)


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
    recipe: Recipe
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
