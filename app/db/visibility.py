"""Which rows a project sees, written once for every repository to filter by.

Models and datasets: the project's own rows and the built-ins (`project_id` NULL, shared by every
project), never soft-deleted ones (finished jobs still name them, so the rows stay). Jobs,
artifacts and webhook endpoints: the project's own rows. Another project's row is simply not found
(API.md: 404, never 403), so a repository that filters by these never leaks that it exists.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, and_, or_

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
