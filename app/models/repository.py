"""Model queries. Visibility (own rows and built-ins, never deleted) comes from `app.db.visibility`."""

from __future__ import annotations

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from app.db.tables import Model
from app.db.visibility import visible_to


def visible(project_id: str) -> Select[tuple[Model]]:
    return select(Model).where(visible_to(Model, project_id))


def get_visible(*, session: Session, project_id: str, model_id: str) -> Model | None:
    return session.scalar(visible(project_id).where(Model.id == model_id))
