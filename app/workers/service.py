"""Workers: the list the API shows. Rows are written by the workers themselves
(`workers.presence`); this only reads them and says which are live."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.db.tables import Worker
from app.pagination import page
from app.workers import repository
from app.workers.schemas import WorkerOut


def list_workers(
    *, session: Session, limit: int, after: str | None
) -> tuple[list[WorkerOut], bool]:
    rows, has_more = page(
        session, repository.listing(), id_column=Worker.id, limit=limit, after=after
    )
    cutoff = repository.live_cutoff()
    busy = repository.busy_hostnames(session)
    out = []
    for row in rows:
        live = row.last_heartbeat_at >= cutoff
        out.append(
            WorkerOut(
                id=row.id,
                hostname=row.hostname,
                device=row.device,
                device_name=row.device_name,
                memory_bytes=row.memory_bytes,
                queues=row.queues,
                status="lost" if not live else "busy" if row.hostname in busy else "idle",
                live=live,
                started_at=row.started_at,
                last_seen_at=row.last_heartbeat_at,
            )
        )
    return out, has_more
