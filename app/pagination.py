"""Cursor pagination, newest first. Ids are time-sortable, so the cursor is just the last id seen."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute, Session


def page(
    session: Session,
    statement: Select[Any],
    *,
    id_column: InstrumentedAttribute[str],
    limit: int,
    after: str | None,
) -> tuple[list[Any], bool]:
    if after:
        statement = statement.where(id_column < after)
    rows = list(session.scalars(statement.order_by(id_column.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
