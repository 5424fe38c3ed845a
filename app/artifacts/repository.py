"""Artifact queries: a project sees its own jobs' artifacts (`app.db.visibility`)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.tables import Artifact
from app.db.visibility import owned_by


def get_owned(*, session: Session, project_id: str, artifact_id: str) -> Artifact | None:
    return session.scalar(
        select(Artifact).where(Artifact.id == artifact_id, owned_by(Artifact, project_id))
    )


def for_job(*, session: Session, job_id: str) -> list[Artifact]:
    return list(
        session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.id))
    )


def ids_by_job(*, session: Session, job_ids: list[str]) -> dict[str, list[str]]:
    """{job id: its artifact ids} in one query, for a single job or a whole page of them."""
    found: dict[str, list[str]] = {job_id: [] for job_id in job_ids}
    rows = session.execute(
        select(Artifact.job_id, Artifact.id)
        .where(Artifact.job_id.in_(job_ids))
        .order_by(Artifact.id)
    )
    for job_id, artifact_id in rows:
        found[job_id].append(artifact_id)
    return found


def storage_keys_of_job(*, session: Session, job_id: str) -> list[str]:
    return list(session.scalars(select(Artifact.storage_key).where(Artifact.job_id == job_id)))


def still_referenced(*, session: Session, storage_keys: list[str]) -> set[str]:
    """Which of these stored objects an artifact row still points at. A result-cache hit's rows
    share the stored bytes of the job it reused (workers/result_cache.py): the bytes go only with
    the last row."""
    if not storage_keys:
        return set()
    return set(
        session.scalars(
            select(Artifact.storage_key).where(Artifact.storage_key.in_(storage_keys)).distinct()
        )
    )
