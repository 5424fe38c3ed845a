"""The job state machine. `transition` is the only writer of `jobs.status`.

It is a conditional update (`… WHERE id = :id AND status IN (legal sources) [AND attempt = :attempt]`),
so two writers racing for the same job cannot both win, on SQLite or PostgreSQL, without explicit
locks: the loser sees zero rows and learns someone else moved the job first. The winner writes the
status event, and the webhook outbox rows that announce it (`app.webhooks.outbox`), in the same
transaction.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, insert, update
from sqlalchemy.orm import Session

from app.db.tables import Job, JobEvent, utcnow
from app.webhooks import outbox

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
LIVE = frozenset({"queued", "running", "cancelling"})

# from-status -> the statuses it may move to. Terminal states move nowhere.
ALLOWED: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelling", "failed"}),
    "running": frozenset({"succeeded", "failed", "cancelling", "queued"}),
    "cancelling": frozenset({"cancelled", "failed"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}


class IllegalTransition(Exception):
    pass


def sources_of(target: str) -> list[str]:
    return [source for source, targets in ALLOWED.items() if target in targets]


def transition(
    session: Session,
    *,
    job_id: str,
    to: str,
    from_: tuple[str, ...] | None = None,
    attempt: int | None = None,
    values: dict[str, Any] | None = None,
    message: str | None = None,
    data: dict[str, Any] | None = None,
    level: str = "info",
    extra_where: ColumnElement[bool] | None = None,
) -> bool:
    """Move job `job_id` to `to` if that is legal from its current status (and from `from_`, when
    given; and only for `attempt`, when given — a fencing token so a worker that lost its lease cannot
    touch the job again). Returns whether it moved."""
    sources = sources_of(to)
    if from_ is not None:
        illegal = set(from_) - set(sources)
        if illegal:
            raise IllegalTransition(f"{sorted(illegal)} -> {to} is not a legal transition")
        sources = list(from_)
    now = utcnow()
    row_values: dict[str, Any] = {"status": to, "updated_at": now, "event_seq": Job.event_seq + 1}
    if to in TERMINAL:
        row_values["finished_at"] = now
        row_values["lease_until"] = None
    row_values.update(values or {})
    statement = (
        update(Job)
        .where(Job.id == job_id, Job.status.in_(sources))
        .values(**row_values)
        .returning(Job.event_seq)
        .execution_options(synchronize_session=False)
    )
    if attempt is not None:
        statement = statement.where(Job.attempt == attempt)
    if extra_where is not None:
        statement = statement.where(extra_where)
    seq = session.execute(statement).scalar_one_or_none()
    if seq is None:
        return False
    session.execute(
        insert(JobEvent).values(
            job_id=job_id,
            seq=seq,
            type="status",
            level=level,
            created_at=now,
            message=message or f"status: {to}",
            data={"status": to, **(data or {})},
        )
    )
    outbox.job_status_changed(session, job_id=job_id, status=to)
    _expire(session, job_id)
    return True


def add_event(
    session: Session,
    *,
    job_id: str,
    type: str,
    message: str,
    data: dict[str, Any] | None = None,
    level: str = "info",
    values: dict[str, Any] | None = None,
    attempt: int | None = None,
    extra_where: ColumnElement[bool] | None = None,
) -> int | None:
    """Append an event (and optionally update non-status columns such as `progress`) atomically.
    Returns the event's seq, or None when the fencing `attempt` (or `extra_where`, e.g. "still
    queued") no longer holds."""
    if "status" in (values or {}):
        raise IllegalTransition("status is written only by transition()")
    now = utcnow()
    statement = (
        update(Job)
        .where(Job.id == job_id)
        .values(event_seq=Job.event_seq + 1, updated_at=now, **(values or {}))
        .returning(Job.event_seq)
        .execution_options(synchronize_session=False)
    )
    if attempt is not None:
        statement = statement.where(
            Job.attempt == attempt, Job.status.in_(("running", "cancelling"))
        )
    if extra_where is not None:
        statement = statement.where(extra_where)
    seq = session.execute(statement).scalar_one_or_none()
    if seq is None:
        return None
    session.execute(
        insert(JobEvent).values(
            job_id=job_id,
            seq=seq,
            type=type,
            level=level,
            message=message,
            data=data,
            created_at=now,
        )
    )
    if type == "progress" and attempt is not None:  # a worker's progress, not the reaper's notes
        outbox.job_progressed(session, job_id=job_id, progress=(values or {}).get("progress"))
    _expire(session, job_id)
    return seq


def _expire(session: Session, job_id: str) -> None:
    """The update bypassed the ORM: make a loaded Job re-read its row on next access."""
    job = session.identity_map.get(session.identity_key(Job, job_id))
    if job is not None:
        session.expire(job)


def lease_deadline(lease_s: float) -> datetime:
    return utcnow() + timedelta(seconds=lease_s)
