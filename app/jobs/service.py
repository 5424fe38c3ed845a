"""Jobs: submit, read, list, cancel, retry, delete. Never commits: the caller's session does."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import broker
from app.datasets.service import dataset_visible_to
from app.db.session import after_commit
from app.db.tables import Artifact, Dataset, Job, JobEvent, utcnow
from app.errors import APIError, not_found
from app.idempotency import remember, replay, request_hash
from app.ids import new_id
from app.jobs.lifecycle import LIVE, TERMINAL, add_event, transition
from app.jobs.schemas import CalibrationSpec, JobCreate, JobOut, Progress
from app.models.service import model_visible_to
from app.pagination import page
from app.settings import get_settings
from app.storage import get_store
from workers.compression.recipe import (  # validation specs only
    group_size_conflicts,
    shapes_after,
)

DEFAULT_EVALUATION_DATASET = {"causal-lm": "enwiki-evaluation"}
DEFAULT_CALIBRATION_DATASET = {"causal-lm": "enwiki-calibration"}
FALLBACK_EVALUATION_DATASET = "lee-sentences"
ENDPOINT = "POST /v1/jobs"


def create_job(
    *, session: Session, project_id: str, spec: JobCreate, idempotency_key: str | None
) -> tuple[Job, bool]:
    """Returns (job, created). A replayed Idempotency-Key returns the first job, created=False."""
    body = spec.model_dump(mode="json")
    body_hash = request_hash(body)
    existing = replay(
        session, project_id=project_id, endpoint=ENDPOINT, key=idempotency_key, body_hash=body_hash
    )
    if existing is not None:
        return get_job(session=session, project_id=project_id, job_id=existing), False

    model = model_visible_to(session=session, project_id=project_id, model_id=spec.model_id)
    if model is None:
        raise APIError("not_found", f"No model with id {spec.model_id!r}", param="model_id")
    if model.status == "rejected":
        raise APIError(
            "conflict",
            f"Model {model.id} was rejected: {(model.error or {}).get('message', 'see the model')}",
            param="model_id",
        )
    _check_recipe_against_shapes(spec, (model.details or {}).get("linear_shapes"))
    evaluation = spec.evaluation.model_dump(mode="json")
    if evaluation["dataset_id"] is None and model.task is not None:
        evaluation["dataset_id"] = _builtin_dataset_id(
            session, default_evaluation_dataset(model.task)
        )
    calibration = body["calibration"]
    if calibration is None and spec.recipe.needs_calibration:
        calibration = CalibrationSpec().model_dump(mode="json")
    if calibration is not None and calibration["dataset_id"] is None:
        if model.task is None:
            raise APIError(
                "invalid_request",
                "This recipe needs calibration data: give calibration.dataset_id",
                param="calibration.dataset_id",
            )
        calibration["dataset_id"] = (
            _builtin_dataset_id(session, default_calibration_dataset(model.task)) or ""
        )
    datasets = [
        ("calibration.dataset_id", (calibration or {}).get("dataset_id")),
        ("evaluation.dataset_id", evaluation["dataset_id"]),
    ]
    for index, stage in enumerate(body["recipe"]["stages"]):
        if stage["method"] != "distill":
            continue
        if stage["dataset_id"] is None and model.task is not None:
            # Resolved now, so the job (and its resume fingerprint) names the text it trains on.
            stage["dataset_id"] = _builtin_dataset_id(
                session, default_calibration_dataset(model.task)
            )
        if stage["dataset_id"] is None:
            raise APIError(
                "invalid_request",
                "distill trains on text: give its dataset_id",
                param=f"recipe.stages[{index}].dataset_id",
            )
        datasets.append((f"recipe.stages[{index}].dataset_id", stage["dataset_id"]))
        student_id = (stage.get("student") or {}).get("model_id")
        if student_id is not None:
            student = model_visible_to(session=session, project_id=project_id, model_id=student_id)
            if student is None:
                raise APIError(
                    "not_found",
                    f"No model with id {student_id!r}",
                    param=f"recipe.stages[{index}].student.model_id",
                )
            if student.status == "rejected":
                raise APIError(
                    "conflict",
                    f"Model {student.id} was rejected and cannot be a student",
                    param=f"recipe.stages[{index}].student.model_id",
                )
            if model.task is not None and student.task not in (None, model.task):
                raise APIError(
                    "invalid_request",
                    f"the student {student.id} is a {student.task} model and the teacher a "
                    f"{model.task}: distillation needs the same kind of model",
                    param=f"recipe.stages[{index}].student.model_id",
                )
    for param, dataset_id in datasets:
        if dataset_id is None:
            continue
        dataset = dataset_visible_to(session=session, project_id=project_id, dataset_id=dataset_id)
        if dataset is None:
            raise APIError("not_found", f"No dataset with id {dataset_id!r}", param=param)
        if dataset.status != "ready":
            raise APIError("conflict", f"Dataset {dataset_id} is {dataset.status}", param=param)

    settings = get_settings()
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

    now = utcnow()
    job = Job(
        id=job_id,
        project_id=project_id,
        model_id=model.id,
        status="queued",
        recipe=body["recipe"],
        calibration=calibration,
        evaluation=evaluation,
        targets=body["targets"],
        export=body["export"],
        job_metadata=body["metadata"],
        priority=spec.priority,
        max_runtime_s=spec.max_runtime_s or settings.default_max_runtime_s,
        max_attempts=spec.max_attempts or settings.default_max_attempts,
        attempt=0,
        event_seq=0,
        progress=Progress(message="waiting for a worker").model_dump(mode="json"),
        created_at=now,
        updated_at=now,
        enqueued_at=now,
    )
    session.add(job)
    session.flush()
    add_event(
        session, job_id=job.id, type="status", message="status: queued", data={"status": "queued"}
    )
    # Commit first, then send: a worker must never receive an id the database does not have yet.
    after_commit(session, lambda: broker.send_run_job(job_id))
    return job, True


def _check_recipe_against_shapes(spec: JobCreate, linear_shapes: dict | None) -> None:
    """The model's shapes are known at submission: refuse a recipe that cannot apply to them."""
    if not linear_shapes:
        return
    for index, stage in enumerate(spec.recipe.stages):
        if stage.method == "distill" and stage.student and stage.student.model_id:
            break  # later stages work on the student, whose shapes are its own
        conflicts = group_size_conflicts(stage, linear_shapes)
        linear_shapes = shapes_after(stage, linear_shapes)  # what the next stage sees
        if conflicts:
            widths = sorted({linear_shapes[name][1] for name in conflicts})
            shown = ", ".join(conflicts[:4]) + (
                f" and {len(conflicts) - 4} more" if len(conflicts) > 4 else ""
            )
            raise APIError(
                "invalid_request",
                f"group_size {stage.group_size} does not divide the input width "
                f"({', '.join(map(str, widths))}) of {shown}; choose a divisor, -1 for per "
                "channel, or leave those layers out with `ignore`",
                param=f"recipe.stages[{index}].group_size",
            )


def default_calibration_dataset(task: str) -> str:
    return DEFAULT_CALIBRATION_DATASET.get(task, FALLBACK_EVALUATION_DATASET)


def default_evaluation_dataset(task: str) -> str:
    return DEFAULT_EVALUATION_DATASET.get(task, FALLBACK_EVALUATION_DATASET)


def _builtin_dataset_id(session: Session, name: str) -> str | None:
    return session.scalar(
        select(Dataset.id).where(
            Dataset.project_id.is_(None), Dataset.name == name, Dataset.status == "ready"
        )
    )


def get_job(*, session: Session, project_id: str, job_id: str) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id, Job.project_id == project_id))
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
    statement = select(Job).where(Job.project_id == project_id)
    if status:
        statement = statement.where(Job.status.in_(status.split(",")))
    if model_id:
        statement = statement.where(Job.model_id == model_id)
    for key, value in metadata.items():
        statement = statement.where(Job.job_metadata[key].as_string() == value)
    return page(session, statement, id_column=Job.id, limit=limit, after=after)


def list_events(
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
            "priority": job.priority,
            "max_runtime_s": job.max_runtime_s,
            "max_attempts": job.max_attempts,
            "metadata": {**job.job_metadata},
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
    if job.status in LIVE:
        raise APIError("conflict", f"Job {job.id} is {job.status}; cancel it first")
    store = get_store()
    keys = list(session.scalars(select(Artifact.storage_key).where(Artifact.job_id == job.id)))
    session.delete(job)
    prefix = f"jobs/{job.id}"

    def remove_files() -> None:
        for key in keys:
            store.delete(key)
        store.delete_prefix(prefix)

    after_commit(session, remove_files)


def artifact_ids(session: Session, job_ids: list[str]) -> dict[str, list[str]]:
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


def to_out_list(session: Session, jobs: list[Job]) -> list[JobOut]:
    artifacts = artifact_ids(session, [job.id for job in jobs])
    return [to_out(session, job, artifacts=artifacts[job.id]) for job in jobs]


def to_out(session: Session, job: Job, *, artifacts: list[str] | None = None) -> JobOut:
    if artifacts is None:
        artifacts = artifact_ids(session, [job.id])[job.id]
    return JobOut(
        id=job.id,
        status=job.status,
        model_id=job.model_id,
        recipe=job.recipe,
        calibration=job.calibration,
        evaluation=job.evaluation,
        targets=job.targets,
        export=job.export,
        priority=job.priority,
        max_runtime_s=job.max_runtime_s,
        metadata=job.job_metadata,
        progress=Progress.model_validate(job.progress or {}),
        metrics=job.metrics,
        error=job.error,
        attempt=job.attempt,
        max_attempts=job.max_attempts,
        artifact_ids=artifacts,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        updated_at=job.updated_at,
    )


def job_etag(job: Job) -> str:
    # event_seq moves with every change the worker or the API makes to the job.
    return f'W/"{job.id}-{job.event_seq}-{job.updated_at.timestamp():.6f}"'


def jobs_using_model(session: Session, model_id: str) -> list[str]:
    return list(
        session.scalars(select(Job.id).where(Job.model_id == model_id, Job.status.in_(LIVE)))
    )
