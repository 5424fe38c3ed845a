"""Webhook endpoints and their deliveries. Never commits: the caller's session does."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app import broker
from app.db.session import after_commit
from app.db.tables import WebhookEndpoint, WebhookMessage, utcnow
from app.errors import APIError, not_found
from app.ids import new_id
from app.pagination import page
from app.webhooks import repository
from app.webhooks.schemas import AttemptOut, DeliveryOut, EndpointCreate, EndpointOut
from app.webhooks.signing import new_secret
from app.webhooks.ssrf import UnsafeDestination, check_url


def create_endpoint(
    *,
    session: Session,
    project_id: str,
    spec: EndpointCreate,
    job_id: str | None = None,
    param: str = "url",
) -> WebhookEndpoint:
    """A new endpoint with a fresh secret; `job_id` makes it that job's own webhook."""
    try:
        check_url(spec.url)
    except UnsafeDestination as exc:
        raise APIError("invalid_request", str(exc), param=param) from exc
    now = utcnow()
    endpoint = WebhookEndpoint(
        id=new_id("whk"),
        project_id=project_id,
        job_id=job_id,
        url=spec.url,
        events=list(spec.events),
        description=spec.description,
        secret=new_secret(),
        status="enabled",
        created_at=now,
        updated_at=now,
    )
    session.add(endpoint)
    session.flush()
    return endpoint


def get_endpoint(*, session: Session, project_id: str, endpoint_id: str) -> WebhookEndpoint:
    endpoint = repository.get_owned(session=session, project_id=project_id, endpoint_id=endpoint_id)
    if endpoint is None:
        raise not_found("webhook endpoint", endpoint_id)
    return endpoint


def list_endpoints(
    *, session: Session, project_id: str, limit: int, after: str | None
) -> tuple[list[WebhookEndpoint], bool]:
    return page(
        session,
        repository.listed(project_id),
        id_column=WebhookEndpoint.id,
        limit=limit,
        after=after,
    )


def delete_endpoint(*, session: Session, endpoint: WebhookEndpoint) -> None:
    session.delete(endpoint)  # its pending messages go with it: nothing is sent any more


def rotate_secret(*, session: Session, endpoint: WebhookEndpoint) -> WebhookEndpoint:
    """The old secret stops signing at once: deliveries from now on use the new one."""
    endpoint.secret = new_secret()
    endpoint.updated_at = utcnow()
    session.flush()
    return endpoint


def list_deliveries(
    *, session: Session, endpoint: WebhookEndpoint, limit: int, after: str | None
) -> tuple[list[DeliveryOut], bool]:
    rows, has_more = page(
        session,
        repository.messages_of(endpoint.id),
        id_column=WebhookMessage.id,
        limit=limit,
        after=after,
    )
    attempts = repository.attempts_by_message(session=session, message_ids=[row.id for row in rows])
    return [delivery_out(row, attempts[row.id]) for row in rows], has_more


def redeliver(*, session: Session, endpoint: WebhookEndpoint, delivery_id: str) -> DeliveryOut:
    """Send a delivery again, with the same webhook-id (receivers de-duplicate on it)."""
    message = session.get(WebhookMessage, delivery_id)
    if message is None or message.endpoint_id != endpoint.id:
        raise not_found("webhook delivery", delivery_id)
    if endpoint.status != "enabled":
        raise APIError(
            "conflict", f"Webhook endpoint {endpoint.id} is disabled: {endpoint.disabled_reason}"
        )
    message.status = "pending"
    message.next_attempt_at = utcnow()
    message.lease_until = None
    message.delivered_at = None
    session.flush()
    after_commit(session, lambda: broker.send_deliver_webhook(delivery_id))
    attempts = repository.attempts_by_message(session=session, message_ids=[message.id])
    return delivery_out(message, attempts[message.id])


def to_out(endpoint: WebhookEndpoint, *, with_secret: bool = False) -> EndpointOut:
    return EndpointOut(
        id=endpoint.id,
        url=endpoint.url,
        events=endpoint.events,
        description=endpoint.description,
        status=endpoint.status,
        disabled_reason=endpoint.disabled_reason,
        created_at=endpoint.created_at,
        updated_at=endpoint.updated_at,
        secret=endpoint.secret if with_secret else None,
    )


def delivery_out(message: WebhookMessage, attempts: list) -> DeliveryOut:
    return DeliveryOut(
        id=message.id,
        endpoint_id=message.endpoint_id,
        event=message.event,
        status=message.status,
        attempts=[
            AttemptOut(
                attempt=row.attempt,
                status_code=row.status_code,
                latency_ms=row.latency_ms,
                error=row.error,
                created_at=row.created_at,
            )
            for row in attempts
        ],
        next_attempt_at=message.next_attempt_at if message.status == "pending" else None,
        created_at=message.created_at,
        delivered_at=message.delivered_at,
    )
