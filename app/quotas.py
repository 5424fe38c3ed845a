"""Per-project quotas: how many jobs may be live (queued, running or cancelling) and how many bytes
the project may keep in storage (its uploaded models and datasets, and its jobs' artifacts).

Both are off unless configured (`SLIMFORMER_MAX_LIVE_JOBS_PER_PROJECT`,
`SLIMFORMER_MAX_STORED_BYTES_PER_PROJECT`). A refusal is 409 `quota_exceeded`: the request
conflicts with the project's state, and only a change to that state (a job finishing or cancelled,
something deleted) lets it through; waiting alone may not, so it is not 429, which clients retry
on their own. The error names the limit and the usage in `error.quota`.

Each check runs in the transaction that inserts the new row, with the project locked first, so
concurrent submissions cannot each see room for one more. A job's artifacts are counted once they
exist: a job may take its project past the byte limit, and then new jobs and uploads are refused
until something is deleted.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.db.tables import Artifact, Dataset, Job, Model, Project
from app.errors import APIError
from app.jobs.lifecycle import LIVE
from app.settings import get_settings


def live_jobs(session: Session, project_id: str) -> int:
    return session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.project_id == project_id, Job.status.in_(LIVE))
    )


def stored_bytes(session: Session, project_id: str) -> int:
    """Bytes the project keeps in storage: uploaded models and datasets not deleted, artifacts."""
    total = 0
    for table in (Model, Dataset):
        total += session.scalar(
            select(func.coalesce(func.sum(table.size_bytes), 0)).where(
                table.project_id == project_id,
                table.deleted_at.is_(None),
                table.storage_key.is_not(None),
            )
        )
    total += session.scalar(
        select(func.coalesce(func.sum(Artifact.size_bytes), 0)).where(
            Artifact.project_id == project_id
        )
    )
    return int(total)


def _lock_project(session: Session, project_id: str) -> None:
    """Serialise quota checks of one project until the transaction ends."""
    if session.get_bind().dialect.name == "sqlite":
        # No row locks: a write takes the database's one write lock, held until commit.
        session.execute(update(Project).where(Project.id == project_id).values(name=Project.name))
    else:
        session.execute(
            select(Project.id).where(Project.id == project_id).with_for_update(key_share=True)
        )


def _refuse(name: str, *, limit: int, usage: int, message: str) -> APIError:
    return APIError(
        "quota_exceeded",
        message,
        extra={"quota": {"name": name, "limit": limit, "usage": usage}},
    )


def check_new_job(*, session: Session, project_id: str) -> None:
    """Before a job is inserted: room for one more live job, and storage not already full."""
    settings = get_settings()
    max_jobs = settings.max_live_jobs_per_project
    if not max_jobs and not settings.max_stored_bytes_per_project:
        return
    _lock_project(session, project_id)
    if max_jobs:
        live = live_jobs(session, project_id)
        if live >= max_jobs:
            raise _refuse(
                "live_jobs",
                limit=max_jobs,
                usage=live,
                message=f"Project quota exceeded: {live} live jobs (queued, running or "
                f"cancelling) of at most {max_jobs}; wait for one to finish or cancel one",
            )
    check_storage(session=session, project_id=project_id, adding=0, locked=True)


def check_storage(*, session: Session, project_id: str, adding: int, locked: bool = False) -> None:
    """Before a new stored thing of `adding` bytes (0: not known yet) is inserted: refuse when
    the project is at its byte limit already, or `adding` would take it past."""
    limit = get_settings().max_stored_bytes_per_project
    if not limit:
        return
    if not locked:
        _lock_project(session, project_id)
    usage = stored_bytes(session, project_id)
    if usage >= limit or usage + adding > limit:
        raise _storage_full(usage=usage, limit=limit, adding=adding)


def _storage_full(*, usage: int, limit: int, adding: int) -> APIError:
    adds = f" and this upload's {adding}" if adding else ""
    return _refuse(
        "stored_bytes",
        limit=limit,
        usage=usage,
        message=f"Project quota exceeded: {usage} bytes stored (models, datasets and "
        f"artifacts){adds} against a limit of {limit} bytes; delete something first",
    )


@dataclass(frozen=True)
class Room:
    """What an upload may still store before the byte quota refuses it."""

    bytes: int
    usage: int
    limit: int

    def error(self) -> APIError:
        return _refuse(
            "stored_bytes",
            limit=self.limit,
            usage=self.usage,
            message=f"Project quota exceeded: {self.usage} bytes stored (models, datasets and "
            f"artifacts); this upload is larger than the {self.bytes} bytes left of the limit "
            f"of {self.limit} bytes",
        )


def upload_room(*, session: Session, project_id: str) -> Room | None:
    """Before an upload streams: None without a byte quota, else the room left (refused at 0)."""
    limit = get_settings().max_stored_bytes_per_project
    if not limit:
        return None
    usage = stored_bytes(session, project_id)
    if usage >= limit:
        raise _storage_full(usage=usage, limit=limit, adding=0)
    return Room(bytes=limit - usage, usage=usage, limit=limit)
