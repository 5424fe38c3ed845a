"""Job queries: a project sees its own jobs (`app.db.visibility`); and the one answer to "which
live jobs read this model or dataset", which the model and dataset deletes ask before removing
anything."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import Row, Select, String, bindparam, cast, or_, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from app.db.tables import Artifact, Job, JobEvent
from app.db.visibility import owned_by
from app.jobs.lifecycle import LIVE
from workers.compression.recipe import Stage

_STAGE = TypeAdapter(Stage)


def get_owned(*, session: Session, project_id: str, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id, owned_by(Job, project_id)))


# What `GET /v1/jobs/{id}` reads (`service.to_out` and `service.job_etag` take the row as they take a
# Job), as statements built once and run on a plain connection: building an ORM select and loading
# an entity cost several times the query on this hot path.
_OUT_COLUMNS = (
    "id", "status", "model_id", "recipe", "calibration", "evaluation", "targets", "export",
    "device", "priority", "cache", "max_runtime_s", "job_metadata", "progress", "metrics",
    "error", "attempt", "max_attempts", "webhook", "event_seq", "created_at", "started_at",
    "finished_at", "updated_at",
)  # fmt: skip
_OWNED_JOB = select(*(getattr(Job, name).label(name) for name in _OUT_COLUMNS)).where(
    Job.id == bindparam("job_id"), Job.project_id == bindparam("project_id")
)
_ARTIFACT_IDS = (
    select(Artifact.id).where(Artifact.job_id == bindparam("job_id")).order_by(Artifact.id)
)


def read_owned(
    connection: Connection, *, project_id: str, job_id: str
) -> tuple[Row[Any], list[str]] | None:
    """The job's columns for a response and its artifact ids, or None when the project has no
    such job (the same rows as `get_owned` and `ids_by_job`)."""
    params = {"job_id": job_id, "project_id": project_id}
    row = connection.execute(_OWNED_JOB, params).first()
    if row is None:
        return None
    return row, list(connection.execute(_ARTIFACT_IDS, params).scalars())


def owned(
    project_id: str, *, statuses: list[str], model_id: str | None, metadata: dict[str, str]
) -> Select[tuple[Job]]:
    """The project's jobs, filtered by status (any of), model and metadata values (all of)."""
    statement = select(Job).where(owned_by(Job, project_id))
    if statuses:
        statement = statement.where(Job.status.in_(statuses))
    if model_id:
        statement = statement.where(Job.model_id == model_id)
    for key, value in metadata.items():
        statement = statement.where(Job.job_metadata[key].as_string() == value)
    return statement


def events_after(
    *, session: Session, job_id: str, after: int, limit: int
) -> tuple[list[JobEvent], bool]:
    rows = list(
        session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.seq > after)
            .order_by(JobEvent.seq)
            .limit(limit + 1)
        )
    )
    return rows[:limit], len(rows) > limit


def live_jobs_referencing(
    *, session: Session, model_id: str | None = None, dataset_id: str | None = None
) -> list[str]:
    """Ids of the live (not finished) jobs that read the model or the dataset: as the job's model,
    its calibration or evaluation set, or inside a recipe stage (a distillation's student model and
    training text), so neither can be deleted under a job that still needs it."""
    wanted = [found for found in (model_id, dataset_id) if found is not None]
    if not wanted:
        return []
    # The SQL narrows the live jobs to those whose row mentions an id at all (the stages are JSON,
    # which SQLite and PostgreSQL query differently); reading the stages below decides.
    mentions = [
        condition
        for value in wanted
        for condition in (
            Job.model_id == value,
            cast(Job.calibration, String).contains(value, autoescape=True),
            cast(Job.evaluation, String).contains(value, autoescape=True),
            cast(Job.recipe, String).contains(value, autoescape=True),
        )
    ]
    rows = session.execute(
        select(Job.id, Job.model_id, Job.calibration, Job.evaluation, Job.recipe)
        .where(Job.status.in_(LIVE), or_(*mentions))
        .order_by(Job.id)
    )
    found = []
    for job_id, job_model_id, calibration, evaluation, recipe in rows:
        model_ids, dataset_ids = _references(job_model_id, calibration, evaluation, recipe)
        if model_id in model_ids or dataset_id in dataset_ids:
            found.append(job_id)
    return found


def _references(
    model_id: str, calibration: dict | None, evaluation: dict | None, recipe: dict[str, Any]
) -> tuple[set[str], set[str]]:
    """(model ids, dataset ids) a stored job reads. Each stage says what it references itself
    (`StageConfig.referenced_ids`), so a new method that reads another model needs nothing here."""
    model_ids = {model_id}
    dataset_ids = {
        block["dataset_id"]
        for block in (calibration, evaluation)
        if block and block.get("dataset_id")
    }
    for stored in recipe.get("stages", []):
        references = _STAGE.validate_python(stored).referenced_ids()
        model_ids.update(references["model_ids"])
        dataset_ids.update(references["dataset_ids"])
    return model_ids, dataset_ids
