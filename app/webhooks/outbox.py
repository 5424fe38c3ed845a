"""The outbox: an event's webhook messages are rows written in the same transaction as the change
they announce (a job's status, a model's validation), so a committed change always has its
messages, and a rolled-back one never does. Sending happens after the commit
(`app.db.session.after_commit`) and is only a nudge: if the message to the delivery queue is lost,
the sweeper (`workers.webhooks.sweep`) finds the row and sends it again."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app import broker
from app.db.session import after_commit
from app.db.tables import Job, Model, WebhookEndpoint, WebhookMessage, utcnow
from app.ids import new_id
from app.settings import get_settings
from app.webhooks import repository

# A job's status -> the event it announces. `running` is announced each time a worker claims it.
JOB_STATUS_EVENTS = {
    "running": "job.started",
    "succeeded": "job.succeeded",
    "failed": "job.failed",
    "cancelled": "job.cancelled",
}
MODEL_STATUS_EVENTS = {"ready": "model.ready", "rejected": "model.rejected"}


def job_status_changed(session: Session, *, job_id: str, status: str) -> None:
    event = JOB_STATUS_EVENTS.get(status)
    if event is None:
        return
    job = session.execute(
        select(Job.project_id, Job.model_id, Job.attempt, Job.error).where(Job.id == job_id)
    ).one()
    data: dict[str, Any] = {"model_id": job.model_id, "attempt": job.attempt}
    if status == "failed" and job.error:
        data["error"] = {"code": job.error.get("code")}
    endpoints = repository.subscribed(
        session, project_id=job.project_id, event=event, job_id=job_id
    )
    _enqueue(session, endpoints, event=event, resource=_job_data(job_id, status, data))


def job_progressed(session: Session, *, job_id: str, progress: dict[str, Any] | None) -> None:
    """`job.progress`, at most once per endpoint per `webhook_progress_interval_s`: the endpoint's
    `last_progress_at` is moved by a conditional update, so concurrent writers send one."""
    project_id = session.scalar(select(Job.project_id).where(Job.id == job_id))
    if project_id is None:
        return
    endpoints = repository.subscribed(
        session, project_id=project_id, event="job.progress", job_id=job_id
    )
    if not endpoints:
        return
    now = utcnow()
    quiet_since = now - timedelta(seconds=get_settings().webhook_progress_interval_s)
    due = []
    for endpoint in endpoints:
        moved = session.execute(
            update(WebhookEndpoint)
            .where(
                WebhookEndpoint.id == endpoint.id,
                or_(
                    WebhookEndpoint.last_progress_at.is_(None),
                    WebhookEndpoint.last_progress_at < quiet_since,
                ),
            )
            .values(last_progress_at=now)
            .execution_options(synchronize_session=False)
        )
        if moved.rowcount:
            due.append(endpoint)
    progress = progress or {}
    data = {
        "progress": {
            key: progress.get(key) for key in ("stage", "stage_index", "num_stages", "fraction")
        }
    }
    _enqueue(session, due, event="job.progress", resource=_job_data(job_id, "running", data))


def model_status_changed(session: Session, *, model_id: str, status: str) -> None:
    event = MODEL_STATUS_EVENTS.get(status)
    if event is None:
        return
    project_id = session.scalar(select(Model.project_id).where(Model.id == model_id))
    if project_id is None:  # a built-in: nobody's
        return
    endpoints = repository.subscribed(session, project_id=project_id, event=event)
    resource = {
        "id": model_id,
        "object": "model",
        "status": status,
        "link": f"{get_settings().public_url}/v1/models/{model_id}",
    }
    _enqueue(session, endpoints, event=event, resource=resource)


def _job_data(job_id: str, status: str, extra: dict[str, Any]) -> dict[str, Any]:
    link = f"{get_settings().public_url}/v1/jobs/{job_id}"
    return {"id": job_id, "object": "job", "status": status, **extra, "link": link}


def _enqueue(
    session: Session, endpoints: list[WebhookEndpoint], *, event: str, resource: dict[str, Any]
) -> None:
    now = utcnow()
    for endpoint in endpoints:
        message_id = new_id("msg")
        session.add(
            WebhookMessage(
                id=message_id,
                endpoint_id=endpoint.id,
                event=event,
                payload={"type": event, "timestamp": now.isoformat(), "data": resource},
                status="pending",
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )
        after_commit(session, lambda m=message_id: broker.send_deliver_webhook(m))
    if endpoints:
        session.flush()
