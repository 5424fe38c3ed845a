from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel

from app.responses import RowOut


class ArtifactOut(RowOut):
    id: str
    object: Literal["artifact"] = "artifact"
    job_id: str
    kind: str
    format: str
    filename: str
    size_bytes: int
    sha256: str
    created_at: datetime


class ArtifactList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ArtifactOut]
    has_more: bool
