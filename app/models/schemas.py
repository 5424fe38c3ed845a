from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.responses import RowOut


class PathSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["path"]
    path: str


class HubSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["hub"]
    repo: str = Field(pattern=r"^[\w.\-]+/[\w.\-]+$")
    revision: str = "main"


class ModelRegister(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    source: Annotated[PathSource | HubSource, Field(discriminator="type")]


class ModelProgress(BaseModel):
    """Where validation stands (API-additions.md, "Model.progress"): the phase (`stage`), steps
    within it (MiB, shards), one fraction and one ETA, as a job's progress has them."""

    stage: str
    stage_index: int
    num_stages: int
    step: int
    total_steps: int
    fraction: float
    eta_s: float | None
    label: str
    elapsed_s: float
    updated_at: datetime


class ModelOut(RowOut):
    id: str
    object: Literal["model"] = "model"
    name: str
    status: str
    architecture: str | None
    task: str | None
    parameters: int | None
    size_bytes: int | None
    sha256: str | None
    source: dict[str, Any]
    created_at: datetime
    error: dict[str, Any] | None
    progress: ModelProgress | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]
    has_more: bool
