"""Model queries. Visibility (own rows and built-ins, never deleted) comes from `app.db.visibility`."""

from __future__ import annotations

from sqlalchemy import Select, bindparam, select
from sqlalchemy.orm import Session

from app.db.tables import Model
from app.db.visibility import visible_to


def visible(project_id: str) -> Select[tuple[Model]]:
    return select(Model).where(visible_to(Model, project_id))


# Built once (a job submission looks its model up): a select built per call costs more than it runs.
_VISIBLE_BY_ID = visible(bindparam("project_id")).where(Model.id == bindparam("model_id"))


def get_visible(*, session: Session, project_id: str, model_id: str) -> Model | None:
    return session.scalar(_VISIBLE_BY_ID, {"project_id": project_id, "model_id": model_id})
