"""Dataset queries. Visibility (own rows and built-ins, never deleted) comes from
`app.db.visibility`; the built-in set that fits a model's task is chosen here, and only here."""

from __future__ import annotations

from typing import Literal

from sqlalchemy import Select, bindparam, select
from sqlalchemy.orm import Session

from app.db.tables import Dataset
from app.db.visibility import visible_to

Purpose = Literal["calibration", "evaluation"]

# The built-in text that fits a task: held-out Wikipedia articles for causal LMs (calibration and
# evaluation split by article, so the model is never measured on what it was calibrated on), the
# news sentences for everything else.
DEFAULT_BUILTIN: dict[Purpose, dict[str, str]] = {
    "calibration": {"causal-lm": "enwiki-calibration"},
    "evaluation": {"causal-lm": "enwiki-evaluation"},
}
FALLBACK_BUILTIN = "lee-sentences"


def visible(project_id: str) -> Select[tuple[Dataset]]:
    return select(Dataset).where(visible_to(Dataset, project_id))


# Built once (every job submission checks its datasets): a select built per call costs more than it
# runs.
_VISIBLE_BY_ID = visible(bindparam("project_id")).where(Dataset.id == bindparam("dataset_id"))
_BUILTIN_NAMED = select(Dataset.id).where(
    Dataset.project_id.is_(None),
    Dataset.deleted_at.is_(None),
    Dataset.status == "ready",
    Dataset.name == bindparam("name"),
)


def get_visible(*, session: Session, project_id: str, dataset_id: str) -> Dataset | None:
    return session.scalar(_VISIBLE_BY_ID, {"project_id": project_id, "dataset_id": dataset_id})


def default_builtin_name(*, task: str, purpose: Purpose) -> str:
    return DEFAULT_BUILTIN[purpose].get(task, FALLBACK_BUILTIN)


def default_dataset_id(*, session: Session, task: str, purpose: Purpose) -> str | None:
    """The ready built-in dataset for `purpose` on a model of `task`; None where this install has
    none (the `examples` extra is missing)."""
    return session.scalar(
        _BUILTIN_NAMED, {"name": default_builtin_name(task=task, purpose=purpose)}
    )
