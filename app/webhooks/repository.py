"""Webhook queries. Endpoints are the project's own rows (`app.db.visibility.owned_by`)."""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy import Select, or_, select
from sqlalchemy.orm import Session

from app.db.tables import WebhookAttempt, WebhookEndpoint, WebhookMessage
from app.db.visibility import owned_by


def listed(project_id: str) -> Select[tuple[WebhookEndpoint]]:
    """The project's endpoints, without the ones jobs made for their own `webhook`."""
    return select(WebhookEndpoint).where(
        owned_by(WebhookEndpoint, project_id), WebhookEndpoint.job_id.is_(None)
    )


def get_owned(*, session: Session, project_id: str, endpoint_id: str) -> WebhookEndpoint | None:
    return session.scalar(
        select(WebhookEndpoint).where(
            owned_by(WebhookEndpoint, project_id), WebhookEndpoint.id == endpoint_id
        )
    )


def subscribed(
    session: Session, *, project_id: str, event: str, job_id: str | None = None
) -> list[WebhookEndpoint]:
    """Enabled endpoints that want `event`: the project's own, and the job's own webhook."""
    scope = WebhookEndpoint.job_id.is_(None)
    if job_id is not None:
        scope = or_(scope, WebhookEndpoint.job_id == job_id)
    rows = session.scalars(
        select(WebhookEndpoint).where(
            WebhookEndpoint.project_id == project_id,
            WebhookEndpoint.status == "enabled",
            scope,
        )
    )
    return [row for row in rows if event in row.events]


def messages_of(endpoint_id: str) -> Select[tuple[WebhookMessage]]:
    return select(WebhookMessage).where(WebhookMessage.endpoint_id == endpoint_id)


def attempts_by_message(
    *, session: Session, message_ids: list[str]
) -> dict[str, list[WebhookAttempt]]:
    found: dict[str, list[WebhookAttempt]] = defaultdict(list)
    if message_ids:
        rows = session.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.message_id.in_(message_ids))
            .order_by(WebhookAttempt.id)
        )
        for row in rows:
            found[row.message_id].append(row)
    return found
