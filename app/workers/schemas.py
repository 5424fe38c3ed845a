from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel


class WorkerOut(BaseModel):
    id: str
    object: Literal["worker"] = "worker"
    hostname: str  # the Celery node name, e.g. gpu0@host-3
    device: Literal["cpu", "gpu"]
    device_name: str | None  # the GPU's name, or the CPU's
    memory_bytes: int | None  # the GPU's memory, or the host's (its cgroup limit when smaller)
    queues: list[str]
    status: Literal["idle", "busy", "lost"]
    live: bool
    started_at: datetime
    last_seen_at: datetime


class WorkerList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WorkerOut]
    has_more: bool
