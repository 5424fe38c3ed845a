"""Celery tasks: thin. A message carries an id; everything else is in the database."""

from __future__ import annotations

from app.broker import DELIVER_WEBHOOK, RUN_JOB, VALIDATE_MODEL
from workers.celery_app import celery_app


@celery_app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: str) -> None:
    from workers.runner import run_job as run

    run(job_id)


@celery_app.task(name=VALIDATE_MODEL, acks_late=True, reject_on_worker_lost=True)
def validate_model(model_id: str) -> None:
    from workers.model_files import validate_model as validate

    validate(model_id)


@celery_app.task(name=DELIVER_WEBHOOK, acks_late=True, reject_on_worker_lost=True)
def deliver_webhook(message_id: str) -> None:
    from workers.webhooks import deliver

    deliver(message_id)
