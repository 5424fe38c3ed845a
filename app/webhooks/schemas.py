from __future__ import annotations

from datetime import datetime
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

EventName = Literal[
    "job.started",
    "job.progress",
    "job.succeeded",
    "job.failed",
    "job.cancelled",
    "model.ready",
    "model.rejected",
]
EVENTS: tuple[str, ...] = get_args(EventName)


class EndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2000)
    events: list[EventName] = Field(default_factory=lambda: list(EVENTS), min_length=1)
    description: str | None = Field(default=None, max_length=500)

    @field_validator("events")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


class EndpointOut(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    events: list[str]
    description: str | None
    status: Literal["enabled", "disabled"]
    disabled_reason: str | None
    created_at: datetime
    updated_at: datetime
    secret: str | None = None  # only in the creation and rotate-secret responses


class EndpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EndpointOut]
    has_more: bool


class AttemptOut(BaseModel):
    attempt: int
    status_code: int | None
    latency_ms: float | None
    error: str | None
    created_at: datetime


class DeliveryOut(BaseModel):
    id: str  # the webhook-id header, the same on every attempt
    object: Literal["webhook_delivery"] = "webhook_delivery"
    endpoint_id: str
    event: str
    status: Literal["pending", "delivered", "failed"]
    attempts: list[AttemptOut]
    next_attempt_at: datetime | None
    created_at: datetime
    delivered_at: datetime | None


class DeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DeliveryOut]
    has_more: bool
