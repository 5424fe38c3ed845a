"""Fairness: one project cannot take every worker.

The broker orders each queue by the jobs' `priority` (app/broker.py); this is the other half. With
`max_running_per_project` set (`SLIMFORMER_MAX_RUNNING_PER_PROJECT`), a worker claims a job only
while its project has fewer running jobs than the cap: the claim's conditional update counts them
in the same statement, and on PostgreSQL the claim first locks the project's row, so two workers
claiming for one project count one after the other (SQLite has one writer at a time anyway).

A job over the cap is not failed and keeps no worker: it stays `queued`, marked `deferred_at`, with
a progress message saying why, and the worker goes on to the next message. When an attempt of that
project ends, its worker sends the messages of as many deferred jobs as there are free slots
(highest priority, then oldest, first). A worker that defers a job checks for a free slot again
after its commit, so a slot freed meanwhile is not missed. If a worker dies between the two, the
reaper's re-send of queued jobs untouched for `requeue_after_s` brings its deferred jobs back.
"""

from __future__ import annotations

import logging

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session, aliased

from app import broker
from app.db.session import after_commit, session_scope
from app.db.tables import Job, Project, utcnow
from app.jobs import routing
from app.jobs.lifecycle import add_event
from app.settings import get_settings
from app.workers import repository as workers

log = logging.getLogger("slimformer.fairness")

OCCUPYING = ("running", "cancelling")  # a job in these holds a worker


def cap() -> int:
    """The per-project cap on running jobs; 0: none."""
    return get_settings().max_running_per_project


def under_cap(limit: int) -> ColumnElement[bool]:
    """For the claim's conditional update: the job's project runs fewer than `limit` jobs."""
    other = aliased(Job)
    running = (
        select(func.count())
        .select_from(other)
        .where(other.project_id == Job.project_id, other.status.in_(OCCUPYING))
        .scalar_subquery()
    )
    return running < limit


def hold_project(session: Session, job_id: str) -> None:
    """PostgreSQL: lock the row of the job's project until the claim commits, so claims for one
    project are counted one at a time. `FOR NO KEY UPDATE` leaves submissions (whose foreign key
    takes `FOR KEY SHARE`) unblocked."""
    if session.get_bind().dialect.name != "postgresql":
        return
    project = select(Job.project_id).where(Job.id == job_id).scalar_subquery()
    session.execute(select(Project.id).where(Project.id == project).with_for_update(key_share=True))


def running_in(session: Session, project_id: str) -> int:
    return session.scalar(
        select(func.count()).where(Job.project_id == project_id, Job.status.in_(OCCUPYING))
    )


def defer(session: Session, *, job_id: str, limit: int) -> str | None:
    """The claim of `job_id` failed: if that is because of the cap (the job is still queued with
    attempts left), mark it deferred and say so. Returns its project id when it was deferred."""
    job = session.execute(
        select(Job.project_id, Job.progress).where(
            Job.id == job_id, Job.status == "queued", Job.attempt < Job.max_attempts
        )
    ).one_or_none()
    if job is None:
        return None  # someone else has it, or it is finished
    project_id, progress = job
    running = running_in(session, project_id)
    message = (
        f"waiting for a slot: {running} of this project's jobs are running and at most {limit} "
        "may run at once (SLIMFORMER_MAX_RUNNING_PER_PROJECT); it starts when one of them ends"
    )
    now = utcnow()
    stamps = {"deferred_at": now, "enqueued_at": now}
    still_queued = Job.status == "queued"
    if (progress or {}).get("message") == message:  # deferred again (a re-sent message): no event
        session.execute(
            update(Job)
            .where(Job.id == job_id, still_queued)
            .values(**stamps)
            .execution_options(synchronize_session=False)
        )
    else:
        add_event(
            session,
            job_id=job_id,
            type="progress",
            message=message,
            data={"running": running, "max_running_per_project": limit},
            values={
                **stamps,
                "progress": {**(progress or {}), "message": message, "updated_at": now.isoformat()},
            },
            extra_where=still_queued,
        )
    return project_id


def release(project_id: str) -> int:
    """Send the messages of as many of the project's deferred jobs as it has free slots. Returns
    how many were sent. Clearing `deferred_at` by conditional update first means two releasers
    never both send one job (and a job sent once too many is deferred again at its claim). Best
    effort: on a database error the reaper's re-send of waiting jobs is the backstop."""
    limit = cap()
    if not limit:
        return 0
    try:
        return _release(project_id, limit)
    except Exception:  # noqa: BLE001 - the attempt has ended; its slot is found again later
        log.warning("could not release the deferred jobs of %s", project_id, exc_info=True)
        return 0


def _release(project_id: str, limit: int) -> int:
    with session_scope() as session:
        free = limit - running_in(session, project_id)
        if free <= 0:
            return 0
        waiting = session.execute(
            select(Job.id, Job.device, Job.priority, Job.progress)
            .where(
                Job.project_id == project_id,
                Job.status == "queued",
                Job.deferred_at.is_not(None),
            )
            .order_by(Job.priority.desc(), Job.created_at, Job.id)
            .limit(free)
        ).all()
        if not waiting:
            return 0
        live = workers.live_queue_counts(session)
        sent = 0
        for job_id, device, priority, progress in waiting:
            route = routing.choose(device, live)
            now = utcnow()
            if add_event(
                session,
                job_id=job_id,
                type="progress",
                message=f"a slot is free: sent to the {route.queue} queue again",
                values={
                    "deferred_at": None,
                    "enqueued_at": now,
                    "progress": {
                        **(progress or {}),
                        "message": route.message,
                        "updated_at": now.isoformat(),
                    },
                },
                extra_where=(Job.status == "queued") & Job.deferred_at.is_not(None),
            ):
                sent += 1
                after_commit(
                    session,
                    lambda j=job_id, q=route.queue, p=priority: broker.send_run_job(j, q, p),
                )
    if sent:
        log.info("project %s: %d deferred job(s) sent again", project_id, sent)
    return sent
