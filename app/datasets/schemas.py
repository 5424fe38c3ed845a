from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel

from app.responses import RowOut


class DatasetOut(RowOut):
    id: str
    object: Literal["dataset"] = "dataset"
    name: str
    status: str
    format: str
    num_records: int | None
    size_bytes: int | None
    sha256: str | None
    source: dict[str, Any]
    created_at: datetime


class DatasetList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DatasetOut]
    has_more: bool
