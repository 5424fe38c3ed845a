"""Worker registry queries. A worker writes its own row (`register`, `beat`, `remove`, from
`workers.presence`); everyone else reads. Liveness is one rule, `live_cutoff`: a row refreshed
within `worker_lost_after_beats` heartbeats is a live worker, anything older is lost.

Install-wide: workers belong to no project, so nothing here filters by visibility, and nothing
here may say which project's job a worker runs.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta

from sqlalchemy import Select, bindparam, delete, select, update
from sqlalchemy.orm import Session

from app.db.tables import Job, Worker, utcnow
from app.ids import new_id
from app.settings import get_settings


def live_cutoff(now: datetime | None = None) -> datetime:
    """Rows whose last heartbeat is older than this are lost workers."""
    return (now or utcnow()) - timedelta(seconds=get_settings().worker_lost_after_s)


def register(
    session: Session,
    *,
    hostname: str,
    device: str,
    device_name: str | None,
    memory_bytes: int | None,
    queues: list[str],
) -> None:
    """Insert this worker's row, or take over the row of a previous process with the same node
    name (a restarted worker)."""
    now = utcnow()
    values = {
        "device": device,
        "device_name": device_name,
        "memory_bytes": memory_bytes,
        "queues": queues,
        "started_at": now,
        "last_heartbeat_at": now,
    }
    taken = session.execute(
        update(Worker)
        .where(Worker.hostname == hostname)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if not taken.rowcount:
        session.add(Worker(id=new_id("wkr"), hostname=hostname, **values))


def beat(session: Session, *, hostname: str) -> bool:
    """Refresh the heartbeat; False when the row is gone (pruned): register again."""
    return bool(
        session.execute(
            update(Worker)
            .where(Worker.hostname == hostname)
            .values(last_heartbeat_at=utcnow())
            .execution_options(synchronize_session=False)
        ).rowcount
    )


def remove(session: Session, *, hostname: str) -> None:
    session.execute(delete(Worker).where(Worker.hostname == hostname))


def prune(session: Session, *, before: datetime) -> int:
    """Forget workers lost since before `before` (they stay listed as lost until then)."""
    return session.execute(delete(Worker).where(Worker.last_heartbeat_at < before)).rowcount


def listing() -> Select[tuple[Worker]]:
    return select(Worker)


def live_workers(session: Session) -> list[Worker]:
    return list(session.scalars(select(Worker).where(Worker.last_heartbeat_at >= live_cutoff())))


# Built once: a job submission routes by it.
_LIVE_QUEUES = select(Worker.queues).where(Worker.last_heartbeat_at >= bindparam("cutoff"))


def live_queue_counts(session: Session) -> Counter[str]:
    """Live workers per logical queue (cpu, gpu, validate)."""
    rows = session.connection().execute(_LIVE_QUEUES, {"cutoff": live_cutoff()}).scalars()
    return Counter(queue for queues in rows for queue in queues)


def live_device_counts(session: Session) -> Counter[str]:
    return Counter(worker.device for worker in live_workers(session))


def busy_hostnames(session: Session) -> set[str]:
    """Node names running a job now. A running job's `worker` is `<node name>:<pid>`
    (`workers.attempt.worker_name`)."""
    running = session.scalars(
        select(Job.worker).where(Job.status.in_(("running", "cancelling")), Job.worker.is_not(None))
    )
    return {name.rsplit(":", 1)[0] for name in running if name}
