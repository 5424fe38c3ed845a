"""The reaper: hands back jobs whose worker died, and re-sends messages the broker lost.

It runs as a thread in each worker's main process (several workers may run it at once: every action
is a conditional update, so two reapers cannot both act on the same job).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app import broker
from app.db.session import after_commit, session_scope
from app.db.tables import Job, Model, utcnow
from app.idempotency import purge_expired
from app.jobs.lifecycle import transition
from app.settings import get_settings

log = logging.getLogger("slimformer.reaper")

_stop = threading.Event()
_thread: threading.Thread | None = None


def reap_once() -> dict[str, int]:
    settings = get_settings()
    now = utcnow()
    counts = {"requeued": 0, "failed": 0, "cancelled": 0, "resent": 0, "validations_resent": 0}
    with session_scope() as session:
        expired = session.execute(
            select(Job.id, Job.status, Job.attempt, Job.max_attempts).where(
                Job.status.in_(("running", "cancelling")), Job.lease_until < now
            )
        ).all()
    for job_id, status, attempt, max_attempts in expired:
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
                    after_commit(session, lambda job_id=job_id: broker.send_run_job(job_id))
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
        counts["resent"] = _resend_stale(
            session,
            Job,
            status="queued",
            stamp="enqueued_at",
            stale=stale,
            now=now,
            send=broker.send_run_job,
        )
        counts["validations_resent"] = _resend_stale(
            session,
            Model,
            status="validating",
            stamp="updated_at",
            stale=stale,
            now=now,
            send=broker.send_validate_model,
        )
        purge_expired(session, ttl_s=settings.idempotency_ttl_s)
    if any(counts.values()):
        log.info("reaper: %s", counts)
    return counts


def _resend_stale(
    session: Session,
    table: type[Job] | type[Model],
    *,
    status: str,
    stamp: str,
    stale: datetime,
    now: datetime,
    send: Callable[[str], bool],
) -> int:
    """Re-send the message of every row waiting in `status` since before `stale`. Touching the
    stamp with a conditional update first means two reapers never both send for one row."""
    column = getattr(table, stamp)
    sent = 0
    for row_id in session.scalars(select(table.id).where(table.status == status, column < stale)):
        touched = session.execute(
            update(table)
            .where(table.id == row_id, table.status == status, column < stale)
            .values({stamp: now})
            .execution_options(synchronize_session=False)
        )
        if touched.rowcount:
            sent += 1
            after_commit(session, lambda row_id=row_id: send(row_id))
    return sent


def _loop() -> None:
    interval = get_settings().reaper_interval_s
    while not _stop.wait(interval):
        try:
            reap_once()
        except Exception:  # noqa: BLE001 - a database blip must not kill the loop
            log.exception("reaper pass failed; trying again in %.0f s", interval)


def start_reaper_thread() -> None:
    global _thread
    if _thread is not None and _thread.is_alive():
        return
    _stop.clear()
    try:
        reap_once()  # at start-up: a restarted worker picks up what its predecessor dropped
    except Exception:  # noqa: BLE001
        log.exception("first reaper pass failed")
    _thread = threading.Thread(target=_loop, name="slimformer-reaper", daemon=True)
    _thread.start()


def stop_reaper_thread() -> None:
    _stop.set()
