"""The reaper: hands back jobs whose worker died, and re-sends messages the broker lost (only
those: a job long queued whose message is still in the broker's queue is merely in line).

It runs as a thread in each worker's main process (several workers may run it at once: every action
is a conditional update, so two reapers cannot both act on the same job). A job it re-queues or
re-sends is routed as at submission (`app.jobs.routing`), with the workers live now; a queued job's
progress message is kept saying whether a worker for its queue is live.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app import broker
from app.db.session import after_commit, session_scope
from app.db.tables import Job, Model, utcnow
from app.idempotency import purge_expired
from app.jobs import routing
from app.jobs.lifecycle import add_event, transition
from app.settings import get_settings
from app.workers import repository as workers
from workers import webhooks
from workers.outage import PassLog

# Lost workers stay listed (as lost) this long, so an operator can see what died, then go.
LOST_WORKERS_KEPT_S = 24 * 3600

log = logging.getLogger("slimformer.reaper")

_stop = threading.Event()
_thread: threading.Thread | None = None


def reap_once() -> dict[str, int]:
    settings = get_settings()
    now = utcnow()
    counts = {
        "requeued": 0,
        "failed": 0,
        "cancelled": 0,
        "resent": 0,
        "in_line": 0,
        "validations_resent": 0,
        "waiting_told": 0,
        "workers_forgotten": 0,
        "webhooks_resent": 0,
    }
    with session_scope() as session:
        live = workers.live_queue_counts(session)
        expired = session.execute(
            select(
                Job.id, Job.status, Job.attempt, Job.max_attempts, Job.device, Job.priority
            ).where(Job.status.in_(("running", "cancelling")), Job.lease_until < now)
        ).all()
    for job_id, status, attempt, max_attempts, device, priority in expired:
        still_expired = Job.lease_until < now
        with session_scope() as session:
            if status == "cancelling":
                if transition(
                    session,
                    job_id=job_id,
                    to="cancelled",
                    from_=("cancelling",),
                    attempt=attempt,
                    extra_where=still_expired,
                    message="worker lost while cancelling; cancelled",
                ):
                    counts["cancelled"] += 1
            elif attempt < max_attempts:
                if transition(
                    session,
                    job_id=job_id,
                    to="queued",
                    from_=("running",),
                    attempt=attempt,
                    extra_where=still_expired,
                    level="warning",
                    values={"lease_until": None, "worker": None, "enqueued_at": now},
                    message=f"worker lost (lease expired); re-queued for attempt "
                    f"{attempt + 1} of {max_attempts}",
                ):
                    counts["requeued"] += 1
                    queue = routing.choose(device, live).queue
                    after_commit(
                        session,
                        lambda j=job_id, q=queue, p=priority: broker.send_run_job(j, q, p),
                    )
            elif transition(
                session,
                job_id=job_id,
                to="failed",
                from_=("running",),
                attempt=attempt,
                extra_where=still_expired,
                level="error",
                values={
                    "error": {
                        "code": "worker_lost",
                        "retryable": True,
                        "message": f"the worker died {attempt} times",
                    }
                },
                message="worker lost and no attempts left",
            ):
                counts["failed"] += 1

    stale = now - timedelta(seconds=settings.requeue_after_s)
    with session_scope() as session:
        touched = _touch_stale(
            session, Job, status="queued", stamp="enqueued_at", stale=stale, now=now
        )
        rows = session.execute(
            select(Job.id, Job.device, Job.priority).where(Job.id.in_(touched))
        ).all()
        routes = {job_id: routing.choose(device, live).queue for job_id, device, _ in rows}
        priorities = {job_id: priority for job_id, _, priority in rows}
        resent = _lost(routes)
        counts["in_line"] = len(touched) - len(resent)
        for job_id in resent:
            queue, priority = routes[job_id], priorities[job_id]
            after_commit(
                session, lambda j=job_id, q=queue, p=priority: broker.send_run_job(j, q, p)
            )
        counts["resent"] = len(resent)
        validating = _touch_stale(
            session, Model, status="validating", stamp="updated_at", stale=stale, now=now
        )
        validations = _lost(dict.fromkeys(validating, broker.VALIDATE_QUEUE))
        for model_id in validations:
            after_commit(session, lambda m=model_id: broker.send_validate_model(m))
        counts["validations_resent"] = len(validations)
        counts["waiting_told"] = _tell_waiting(session, live)
        counts["workers_forgotten"] = workers.prune(
            session, before=now - timedelta(seconds=LOST_WORKERS_KEPT_S)
        )
        purge_expired(session, ttl_s=settings.idempotency_ttl_s)
        counts["webhooks_resent"] = webhooks.sweep(session)
    if any(counts.values()):
        log.info("reaper: %s", counts)
    return counts


def _touch_stale(
    session: Session,
    table: type[Job] | type[Model],
    *,
    status: str,
    stamp: str,
    stale: datetime,
    now: datetime,
) -> list[str]:
    """The rows waiting in `status` since before `stale` that this reaper looks at (their message
    is re-sent unless it is still in line). Touching the stamp with a conditional update first
    means two reapers never both send for one row, and one in line is looked at again only after
    another `requeue_after_s`."""
    column = getattr(table, stamp)
    touched = []
    waiting = session.scalars(select(table.id).where(table.status == status, column < stale)).all()
    for row_id in waiting:
        moved = session.execute(
            update(table)
            .where(table.id == row_id, table.status == status, column < stale)
            .values({stamp: now})
            .execution_options(synchronize_session=False)
        )
        if moved.rowcount:
            touched.append(row_id)
    return touched


def _lost(routes: dict[str, str]) -> list[str]:
    """Of these long-waiting ids (each with the queue it is routed to now), those whose message
    must be sent: it is not in that queue. One merely in line there (behind a running job, or
    with no live worker for the queue) keeps its place, and a second message would only be a
    stale one later; one in another queue (sent to GPU workers that have died since) is re-routed.
    If the broker cannot tell, all of them."""
    if not routes:
        return []
    waiting = broker.waiting_ids(set(routes.values())) or {}
    return [row_id for row_id, queue in routes.items() if row_id not in waiting.get(queue, ())]


def _tell_waiting(session: Session, live: Mapping[str, int]) -> int:
    """Keep each queued job's progress message true: whether a worker for its queue is live
    (a GPU worker may have died since it was submitted, or one may have come up). Written only
    when it changes, fenced on the job's last event so two reapers write it once."""
    told = 0
    queued = session.execute(
        select(Job.id, Job.device, Job.progress, Job.event_seq).where(
            Job.status == "queued",
            Job.deferred_at.is_(None),  # its message says it waits for its project's cap
        )
    ).all()
    for job_id, device, progress, event_seq in queued:
        message = routing.choose(device, live).message
        if (progress or {}).get("message") == message:
            continue
        if add_event(
            session,
            job_id=job_id,
            type="progress",
            message=message,
            values={
                "progress": {
                    **(progress or {}),
                    "message": message,
                    "updated_at": utcnow().isoformat(),
                }
            },
            extra_where=(Job.status == "queued") & (Job.event_seq == event_seq),
        ):
            told += 1
    return told


def _loop(passes: PassLog) -> None:
    interval = get_settings().reaper_interval_s
    while not _stop.wait(interval):
        try:
            reap_once()
        except Exception as exc:  # noqa: BLE001 - a database blip must not kill the loop
            passes.failure(exc, interval)
        else:
            passes.success()


def start_reaper_thread() -> None:
    global _thread
    if _thread is not None and _thread.is_alive():
        return
    _stop.clear()
    passes = PassLog("reaper", log)  # an outage: a line per pass, not a traceback
    try:
        reap_once()  # at start-up: a restarted worker picks up what its predecessor dropped
    except Exception as exc:  # noqa: BLE001
        passes.failure(exc, get_settings().reaper_interval_s)
    _thread = threading.Thread(target=_loop, args=(passes,), name="slimformer-reaper", daemon=True)
    _thread.start()


def stop_reaper_thread() -> None:
    _stop.set()
