"""Jobs: submit, read, list, cancel, retry, delete. Never commits: the caller's session does."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row, insert
from sqlalchemy.orm import Session

from app import broker, quotas
from app.artifacts.repository import ids_by_job, still_referenced, storage_keys_of_job
from app.db.session import after_commit, one_writer
from app.db.tables import Job, JobEvent, utcnow
from app.errors import APIError, not_found
from app.idempotency import remember, replay, replaying, request_hash
from app.ids import new_id
from app.jobs import repository, routing
from app.jobs.lifecycle import LIVE, TERMINAL, add_event, transition
from app.jobs.resolver import ResolvedJob, resolve_job
from app.jobs.schemas import JobCreate, JobOut, Progress, ResourcesSpec, WebhookOut, WebhookSpec
from app.pagination import page
from app.storage import get_store, search_trials_key
from app.webhooks import service as webhooks
from app.webhooks.schemas import EndpointCreate

ENDPOINT = "POST /v1/jobs"


def create_job(
    *, session: Session, project_id: str, spec: JobCreate, idempotency_key: str | None
) -> tuple[Job, bool]:
    """Returns (job, created). A replayed Idempotency-Key returns the first job, created=False."""
    body_hash = request_hash(spec.model_dump(mode="json"))
    existing = replay(
        session, project_id=project_id, endpoint=ENDPOINT, key=idempotency_key, body_hash=body_hash
    )
    if existing is not None:
        with replaying(existing):
            return get_job(session=session, project_id=project_id, job_id=existing), False
    resolved = resolve_job(session=session, project_id=project_id, spec=spec)
    route = routing.route(session, resolved.device)
    # Every read is done: from the first write to the commit, as short a transaction as can be.
    one_writer(session)
    quotas.check_new_job(session=session, project_id=project_id)
    job_id = new_id("job")
    winner = remember(
        session,
        project_id=project_id,
        endpoint=ENDPOINT,
        key=idempotency_key,
        body_hash=body_hash,
        resource_id=job_id,
    )
    if winner != job_id:  # a concurrent request with the same key got there first
        return get_job(session=session, project_id=project_id, job_id=winner), False
    job = _insert_queued(
        session, job_id=job_id, project_id=project_id, resolved=resolved, route=route
    )
    if spec.webhook is not None:
        _attach_webhook(session, job=job, spec=spec.webhook)
    # Commit first, then send: a worker must never receive an id the database does not have yet.
    after_commit(session, lambda: broker.send_run_job(job_id, route.queue, resolved.priority))
    return job, True


def _insert_queued(
    session: Session, *, job_id: str, project_id: str, resolved: ResolvedJob, route: routing.Route
) -> Job:
    now = utcnow()
    job = Job(
        id=job_id,
        project_id=project_id,
        model_id=resolved.model.id,
        status="queued",
        recipe=resolved.recipe,
        calibration=resolved.calibration,
        evaluation=resolved.evaluation,
        targets=resolved.targets,
        export=resolved.export,
        device=resolved.device,
        job_metadata=resolved.metadata,
        priority=resolved.priority,
        cache=resolved.cache,
        max_runtime_s=resolved.max_runtime_s,
        max_attempts=resolved.max_attempts,
        attempt=0,
        event_seq=1,  # its first event, written with it (what `add_event` does for later ones)
        progress=Progress(message=route.message).model_dump(mode="json"),
        lease_until=None,
        worker=None,
        fingerprint=None,
        deferred_at=None,
        created_at=now,
        started_at=None,
        finished_at=None,
        updated_at=now,
        enqueued_at=now,
    )
    session.add(job)
    session.flush()
    session.connection().execute(
        _FIRST_EVENT,
        {
            "job_id": job_id,
            "seq": 1,
            "type": "status",
            "level": "info",
            "message": "status: queued",
            "data": {"status": "queued"},
            "created_at": now,
        },
    )
    # No `note_job_event`: on PostgreSQL that NOTIFY would wake no event feed (a stream of this
    # job can only open once the 202 has named it, and reads its first events then), and a
    # transaction that notifies holds the cluster's notify lock through its commit, so every
    # submission would commit one after another.
    return job


_FIRST_EVENT = insert(JobEvent.__table__)  # built once, run on the connection: no ORM work


def _attach_webhook(session: Session, *, job: Job, spec: WebhookSpec) -> None:
    """The job's own `webhook`: an endpoint only this job's events reach. Its secret is shown
    once, in the creation response (`session.info`, read by `to_out`)."""
    endpoint = webhooks.create_endpoint(
        session=session,
        project_id=job.project_id,
        spec=EndpointCreate(url=spec.url, events=spec.events),
        job_id=job.id,
        param="webhook.url",
    )
    job.webhook = {"url": endpoint.url, "events": endpoint.events, "endpoint_id": endpoint.id}
    session.info.setdefault("webhook_secrets", {})[job.id] = endpoint.secret
    session.flush()


def get_job(*, session: Session, project_id: str, job_id: str) -> Job:
    job = repository.get_owned(session=session, project_id=project_id, job_id=job_id)
    if job is None:
        raise not_found("job", job_id)
    return job


def list_jobs(
    *,
    session: Session,
    project_id: str,
    status: str | None,
    model_id: str | None,
    metadata: dict[str, str],
    limit: int,
    after: str | None,
) -> tuple[list[Job], bool]:
    statement = repository.owned(
        project_id,
        statuses=status.split(",") if status else [],
        model_id=model_id,
        metadata=metadata,
    )
    return page(session, statement, id_column=Job.id, limit=limit, after=after)


def list_events(
    *, session: Session, job_id: str, after: int, limit: int
) -> tuple[list[JobEvent], bool]:
    return repository.events_after(session=session, job_id=job_id, after=after, limit=limit)


def cancel_job(*, session: Session, job: Job) -> Job:
    if job.status in ("cancelling", "cancelled"):
        return job
    if job.status in ("succeeded", "failed"):
        raise APIError("conflict", f"Job {job.id} already {job.status}; nothing to cancel")
    # A queued job has no worker to notice: it goes straight through cancelling to cancelled.
    # A running one is told, and its worker stops at the next step and cleans up.
    if transition(
        session, job_id=job.id, to="cancelling", from_=("queued",), message="cancel requested"
    ):
        transition(
            session,
            job_id=job.id,
            to="cancelled",
            from_=("cancelling",),
            message="cancelled before it started",
        )
        job_id = job.id
        after_commit(session, lambda: broker.withdraw_run_job(job_id))  # where the broker can
    elif not transition(
        session,
        job_id=job.id,
        to="cancelling",
        from_=("running",),
        message="cancel requested; the worker stops at the next step",
    ):
        session.refresh(job)
        return cancel_job(session=session, job=job)  # it moved under us: decide again
    session.refresh(job)
    return job


def retry_job(*, session: Session, project_id: str, job: Job) -> Job:
    if job.status not in TERMINAL:
        raise APIError(
            "conflict", f"Job {job.id} is {job.status}; only finished jobs can be retried"
        )
    spec = JobCreate.model_validate(
        {
            "model_id": job.model_id,
            "recipe": job.recipe,
            "calibration": job.calibration,
            "evaluation": job.evaluation,
            "targets": job.targets,
            "export": job.export,
            "resources": {"device": job.device},
            "priority": min(max(job.priority, 0), 9),  # rows from before the 0-9 range
            "cache": job.cache,
            "max_runtime_s": job.max_runtime_s,
            "max_attempts": job.max_attempts,
            "metadata": {**job.job_metadata},
            "webhook": {"url": job.webhook["url"], "events": job.webhook["events"]}
            if job.webhook
            else None,
        }
    )
    new_job, _ = create_job(session=session, project_id=project_id, spec=spec, idempotency_key=None)
    add_event(
        session,
        job_id=new_job.id,
        type="log",
        message=f"retry of {job.id}",
        data={"retry_of": job.id},
    )
    return new_job


def delete_job(*, session: Session, job: Job) -> None:
    """Deletes the job, its rows, its search trials and the stored bytes that no other job's
    artifact rows share (a result-cache hit points at the bytes of the job it reused)."""
    if job.status in LIVE:
        raise APIError("conflict", f"Job {job.id} is {job.status}; cancel it first")
    store = get_store()
    keys = storage_keys_of_job(session=session, job_id=job.id)
    session.delete(job)
    # Delete first, then ask who else points at the bytes: the delete locks the row (PostgreSQL)
    # or the database (SQLite), so a cache hit reusing this job either committed its rows before
    # (and is seen here) or waits and then finds this job gone (workers/result_cache.py).
    session.flush()
    shared = still_referenced(session=session, storage_keys=keys)
    prefix = f"jobs/{job.id}"
    trials = search_trials_key(job.id) if job.targets else None  # a search job's trials

    def remove_files() -> None:
        for key in keys:
            if key not in shared:
                store.delete(key)
        if not any(key.startswith(f"{prefix}/") for key in shared):
            store.delete_prefix(prefix)
        if trials is not None:
            store.delete(trials)

    after_commit(session, remove_files)


def to_out_list(session: Session, jobs: list[Job]) -> list[JobOut]:
    found = ids_by_job(session=session, job_ids=[job.id for job in jobs])
    return [to_out(session, job, artifacts=found[job.id]) for job in jobs]


def to_out(session: Session, job: Job, *, artifacts: list[str] | None = None) -> JobOut:
    if artifacts is None:
        artifacts = ids_by_job(session=session, job_ids=[job.id])[job.id]
    return job_out(
        job, artifacts, webhook_secret=session.info.get("webhook_secrets", {}).get(job.id)
    )


def job_out(
    job: Job | Row[Any], artifacts: list[str], *, webhook_secret: str | None = None
) -> JobOut:
    """The response for a job, from its entity or from the row `repository.read_owned` reads;
    the webhook's secret is only shown in the creation response."""
    return JobOut(
        id=job.id,
        status=job.status,
        model_id=job.model_id,
        recipe=job.recipe,
        calibration=job.calibration,
        evaluation=job.evaluation,
        targets=job.targets,
        export=job.export,
        resources=ResourcesSpec(device=job.device),
        priority=job.priority,
        cache=job.cache,
        max_runtime_s=job.max_runtime_s,
        metadata=job.job_metadata,
        progress=Progress.model_validate(job.progress or {}),
        metrics=job.metrics,
        error=job.error,
        attempt=job.attempt,
        max_attempts=job.max_attempts,
        artifact_ids=artifacts,
        webhook=WebhookOut(**job.webhook, secret=webhook_secret) if job.webhook else None,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        updated_at=job.updated_at,
    )


def job_etag(job: Job | Row[Any]) -> str:
    # event_seq moves with every change the worker or the API makes to the job.
    return f'W/"{job.id}-{job.event_seq}-{job.updated_at.timestamp():.6f}"'
