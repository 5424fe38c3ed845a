"""Celery tasks: thin. A message carries an id; everything else is in the database.

A message for a job that is no longer queued (cancelled, finished, running elsewhere, deleted), or
for a model no longer validating, is stale: the worker's main process drops it when it arrives,
with one indexed read, before it reaches the pool. So stale messages cost milliseconds each, take
no pool slot and no turn of `worker_max_tasks_per_child` (which would fork a fresh child), and a
real job behind hundreds of them starts at once. Whatever gets past (a job cancelled between this
check and the claim) the claim's conditional update still turns away in the child.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from celery import Task
from celery.worker.request import Request
from sqlalchemy import select

from app.broker import DELIVER_WEBHOOK, RUN_JOB, VALIDATE_MODEL
from app.db.session import session_scope
from app.db.tables import Job, Model
from workers.celery_app import celery_app
from workers.outage import is_transient, task_backoff_s

# max_retries=None: a task that cannot reach the database is retried for as long as it takes.
TASK_OPTIONS = {
    "bind": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "max_retries": None,
}

log = logging.getLogger("slimformer.tasks")

# What each task's resource must still be for its message to mean anything.
WANTED = {RUN_JOB: (Job, "queued"), VALIDATE_MODEL: (Model, "validating")}


def stale_reason(task: str, resource_id: str) -> str | None:
    """Why a message is stale (the resource's status now, or `deleted`), or None when it is
    wanted, or when the database cannot say: then the task runs and meets the outage itself."""
    table, wanted = WANTED[task]
    try:
        with session_scope() as session:
            status = session.scalar(select(table.status).where(table.id == resource_id))
    except Exception:  # noqa: BLE001
        log.warning("could not check %s %s before running it", task, resource_id, exc_info=True)
        return None
    if status == wanted:
        return None
    return status or "deleted"


class DropStale(Request):
    """The task's request in the worker's main process. Celery asks `revoked()` before handing a
    request to the pool; a stale one is answered as revoked: acknowledged and never run."""

    def revoked(self) -> bool:
        if super().revoked():
            return True
        args = self.args
        reason = stale_reason(self.name, args[0]) if args else None
        if reason is None:
            return False
        log.info("dropped a stale message for %s (%s) before the pool", args[0], reason)
        # Celery's own way to discard a revoked request: mark it ready, acknowledge it.
        self._announce_revoked(reason="stale", terminated=False, signum=None, expired=False)
        return True


@celery_app.task(name=RUN_JOB, Request=DropStale, **TASK_OPTIONS)
def run_job(self: Task, job_id: str) -> None:
    from workers.runner import run_job as run

    _outage_safe(self, run, job_id)


@celery_app.task(name=VALIDATE_MODEL, Request=DropStale, **TASK_OPTIONS)
def validate_model(self: Task, model_id: str) -> None:
    from workers.model_files import validate_model as validate

    _outage_safe(self, validate, model_id)


@celery_app.task(name=DELIVER_WEBHOOK, **TASK_OPTIONS)
def deliver_webhook(self: Task, message_id: str) -> None:
    from workers.webhooks import deliver

    _outage_safe(self, deliver, message_id)


def _outage_safe(task: Task, work: Callable[[str], None], resource_id: str) -> None:
    """Run `work`; when it cannot reach the database (or the object store), the message is not
    acked as done: the task is re-sent with exponential backoff and jitter, without limit, and the
    original is acked only once the retry is safely published (`workers.outage`). A job's running
    attempt rides out a blip itself (`workers.attempt`); what reaches here failed before it was
    claimed, or could not record its ending within its lease."""
    try:
        work(resource_id)
    except Exception as exc:
        if not is_transient(exc):
            raise
        countdown = task_backoff_s(task.request.retries)
        raise task.retry(exc=exc, countdown=countdown) from exc
