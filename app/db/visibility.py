"""Which rows a project sees, written once for every repository to filter by.

Models and datasets: the project's own rows and the built-ins (`project_id` NULL, shared by every
project), never soft-deleted ones (finished jobs still name them, so the rows stay). Jobs,
artifacts and webhook endpoints: the project's own rows. Another project's row is simply not found
(API.md: 404, never 403), so a repository that filters by these never leaks that it exists.
"""

from __future__ import annotations

import difflib

from sqlalchemy import ColumnElement, and_, or_, select
from sqlalchemy.orm import Session

from app.db.tables import Artifact, Dataset, Job, Model, WebhookEndpoint


def visible_to(table: type[Model] | type[Dataset], project_id: str) -> ColumnElement[bool]:
    return and_(
        table.deleted_at.is_(None),
        or_(table.project_id == project_id, table.project_id.is_(None)),
    )


def owned_by(
    table: type[Job] | type[Artifact] | type[WebhookEndpoint], project_id: str
) -> ColumnElement[bool]:
    return table.project_id == project_id


def did_you_mean(
    session: Session, table: type[Model] | type[Dataset], project_id: str, given: str
) -> str:
    """For a 404 on an id: ` Did you mean mdl_… (all-MiniLM-L6-v2)?` when `given` is (or looks
    like) the name of a row the project sees — people pass names where ids go — else ''."""
    rows = session.execute(
        select(table.id, table.name).where(visible_to(table, project_id)).limit(1000)
    ).all()
    names = {name: row_id for row_id, name in rows if name}
    exact = [name for name in names if name.casefold() == given.casefold()]
    close = exact or difflib.get_close_matches(given, list(names), n=2, cutoff=0.75)
    if not close:
        return ""
    return " Did you mean " + " or ".join(f"{names[name]} ({name})" for name in close) + "?"
