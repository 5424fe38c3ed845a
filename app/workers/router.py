from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.auth import CallerDep, SessionDep
from app.workers import service
from app.workers.schemas import WorkerList

router = APIRouter(prefix="/v1/workers", tags=["workers"])


@router.get("", response_model=WorkerList)
def list_workers(
    _caller: CallerDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> WorkerList:
    """Every registered worker of the install, live or lost (any project may list them)."""
    rows, has_more = service.list_workers(session=session, limit=limit, after=after)
    return WorkerList(data=rows, has_more=has_more)
