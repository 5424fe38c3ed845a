"""Celery tasks: thin. A message carries an id; everything else is in the database."""

from __future__ import annotations

from collections.abc import Callable

from celery import Task

from app.broker import DELIVER_WEBHOOK, RUN_JOB, VALIDATE_MODEL
from workers.celery_app import celery_app
from workers.outage import is_transient, task_backoff_s

# max_retries=None: a task that cannot reach the database is retried for as long as it takes.
TASK_OPTIONS = {
    "bind": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "max_retries": None,
}


@celery_app.task(name=RUN_JOB, **TASK_OPTIONS)
def run_job(self: Task, job_id: str) -> None:
    from workers.runner import run_job as run

    _outage_safe(self, run, job_id)


@celery_app.task(name=VALIDATE_MODEL, **TASK_OPTIONS)
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
