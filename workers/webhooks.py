"""Webhook delivery: one attempt per task, a retry schedule in the outbox row, a sweeper.

`deliver` claims the message with a conditional update (pending, due, no attempt in flight), so two
copies of its Celery message never send it twice at once; it sends outside any transaction (a slow
receiver holds no lock) and records the attempt. A non-2xx answer or a time-out schedules the next
attempt with exponential backoff and full jitter (AWS's "Exponential Backoff and Jitter", 2015) and
sends the task again with that countdown. Past `webhook_retry_window_s` since the event, the message
fails and its endpoint is disabled with the reason. The `webhook-id` is the message id on every
attempt, so a receiver that de-duplicates on it sees each event once.

`sweep` (run by the reaper) re-sends pending messages that are overdue with no attempt in flight: the
task was lost with a broker restart, or its worker was killed mid-attempt.
"""

from __future__ import annotations

import json
import logging
import random
import time
from datetime import timedelta

import httpx
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app import broker
from app.db.session import after_commit, session_scope
from app.db.tables import WebhookAttempt, WebhookEndpoint, WebhookMessage, utcnow
from app.settings import get_settings
from app.webhooks.signing import headers
from app.webhooks.ssrf import UnsafeDestination, check_url

log = logging.getLogger("slimformer.webhooks")

# An attempt in flight holds the message for the HTTP time-out plus this much (writing the result).
LEASE_MARGIN_S = 5.0


def deliver(message_id: str) -> str:
    """One attempt. Returns what happened: delivered | retrying | failed | skipped."""
    settings = get_settings()
    now = utcnow()
    with session_scope() as session:
        attempt = session.execute(
            update(WebhookMessage)
            .where(
                WebhookMessage.id == message_id,
                WebhookMessage.status == "pending",
                WebhookMessage.next_attempt_at <= now + timedelta(seconds=1),
                or_(WebhookMessage.lease_until.is_(None), WebhookMessage.lease_until < now),
            )
            .values(
                attempts=WebhookMessage.attempts + 1,
                lease_until=now + timedelta(seconds=settings.webhook_timeout_s + LEASE_MARGIN_S),
            )
            .returning(WebhookMessage.attempts)
            .execution_options(synchronize_session=False)
        ).scalar_one_or_none()
        if attempt is None:
            return "skipped"  # delivered, not due yet, or another attempt is in flight
        message = session.get(WebhookMessage, message_id)
        endpoint = session.get(WebhookEndpoint, message.endpoint_id)
        url, secret, payload = endpoint.url, endpoint.secret, message.payload
        created_at, enabled = message.created_at, endpoint.status == "enabled"
    if not enabled:
        with session_scope() as session:
            _record(session, message_id, attempt, None, None, "endpoint disabled")
            _set(session, message_id, status="failed")
        return "failed"
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    status_code, error = None, None
    started = time.perf_counter()
    try:
        check_url(url)  # again: DNS may have changed since the endpoint was created
        response = httpx.post(
            url,
            content=body,
            headers=headers(
                secret=secret, message_id=message_id, timestamp=int(time.time()), body=body
            ),
            timeout=settings.webhook_timeout_s,
            follow_redirects=False,
        )
        status_code = response.status_code
        if not 200 <= status_code < 300:
            error = f"HTTP {status_code}"
    except UnsafeDestination as exc:
        error = str(exc)
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    latency_ms = round((time.perf_counter() - started) * 1000, 2)
    with session_scope() as session:
        _record(session, message_id, attempt, status_code, latency_ms, error)
        if error is None:
            _set(session, message_id, status="delivered", delivered_at=utcnow())
            return "delivered"
        now = utcnow()
        if (now - created_at).total_seconds() >= settings.webhook_retry_window_s:
            _set(session, message_id, status="failed")
            _disable(
                session,
                message_id,
                reason=f"deliveries failed for "
                f"{settings.webhook_retry_window_s:.0f} s; last error: {error}",
            )
            return "failed"
        delay = backoff_s(attempt)
        _set(session, message_id, next_attempt_at=now + timedelta(seconds=delay))
        after_commit(session, lambda: broker.send_deliver_webhook(message_id, countdown=delay))
    log.info("webhook %s attempt %d failed (%s); next in %.1f s", message_id, attempt, error, delay)
    return "retrying"


def backoff_s(attempt: int) -> float:
    """Full jitter: uniform in [cap/2, cap], cap = base * 2^(attempt-1), at most the maximum."""
    settings = get_settings()
    cap = min(settings.webhook_backoff_max_s, settings.webhook_backoff_base_s * 2 ** (attempt - 1))
    return random.uniform(cap / 2, cap)


def sweep(session: Session) -> int:
    """Re-send overdue pending messages with no attempt in flight. The conditional touch of
    `next_attempt_at` means two reapers never both re-send one message."""
    now = utcnow()
    overdue = now - timedelta(seconds=get_settings().webhook_sweep_after_s)
    idle = or_(WebhookMessage.lease_until.is_(None), WebhookMessage.lease_until < now)
    candidates = session.scalars(
        select(WebhookMessage.id).where(
            WebhookMessage.status == "pending", WebhookMessage.next_attempt_at < overdue, idle
        )
    ).all()
    resent = 0
    for message_id in candidates:
        moved = session.execute(
            update(WebhookMessage)
            .where(
                WebhookMessage.id == message_id,
                WebhookMessage.status == "pending",
                WebhookMessage.next_attempt_at < overdue,
                idle,
            )
            .values(next_attempt_at=now)
            .execution_options(synchronize_session=False)
        )
        if moved.rowcount:
            resent += 1
            after_commit(session, lambda m=message_id: broker.send_deliver_webhook(m))
    return resent


def _record(
    session: Session,
    message_id: str,
    attempt: int,
    status_code: int | None,
    latency_ms: float | None,
    error: str | None,
) -> None:
    session.add(
        WebhookAttempt(
            message_id=message_id,
            attempt=attempt,
            status_code=status_code,
            latency_ms=latency_ms,
            error=error[:2000] if error else None,
            created_at=utcnow(),
        )
    )


def _set(session: Session, message_id: str, **values: object) -> None:
    session.execute(
        update(WebhookMessage)
        .where(WebhookMessage.id == message_id)
        .values(lease_until=None, **values)
        .execution_options(synchronize_session=False)
    )


def _disable(session: Session, message_id: str, *, reason: str) -> None:
    endpoint_id = session.scalar(
        select(WebhookMessage.endpoint_id).where(WebhookMessage.id == message_id)
    )
    session.execute(
        update(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.status == "enabled")
        .values(status="disabled", disabled_reason=reason, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    log.warning("webhook endpoint %s disabled: %s", endpoint_id, reason)
