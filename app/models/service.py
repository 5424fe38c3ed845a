"""Models: uploads, registrations by path or hub, built-ins. Validation happens in a worker."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import broker, quotas
from app.db.session import after_commit
from app.db.tables import BaselineMetrics, Job, Model, utcnow
from app.errors import APIError, not_found
from app.jobs.repository import live_jobs_referencing
from app.models import repository
from app.models.schemas import ModelOut, ModelProgress, ModelRegister
from app.pagination import page
from app.settings import get_settings
from app.storage import StoredObject, get_store, search_trials_key


def get_model(*, session: Session, project_id: str, model_id: str) -> Model:
    model = repository.get_visible(session=session, project_id=project_id, model_id=model_id)
    if model is None:
        raise not_found("model", model_id)
    return model


def list_models(
    *, session: Session, project_id: str, limit: int, after: str | None
) -> tuple[list[Model], bool]:
    return page(
        session, repository.visible(project_id), id_column=Model.id, limit=limit, after=after
    )


def create_uploaded(
    *,
    session: Session,
    project_id: str,
    model_id: str,
    name: str,
    filename: str | None,
    stored: StoredObject,
) -> Model:
    quotas.check_storage(session=session, project_id=project_id, adding=stored.size_bytes)
    model = Model(
        id=model_id,
        project_id=project_id,
        name=name,
        status="validating",
        source={"type": "upload", "filename": filename},
        size_bytes=stored.size_bytes,
        sha256=stored.sha256,
        storage_key=stored.key,
    )
    session.add(model)
    session.flush()
    after_commit(session, lambda: broker.send_validate_model(model_id))
    return model


def register(*, session: Session, project_id: str, model_id: str, spec: ModelRegister) -> Model:
    source = spec.source.model_dump()
    if spec.source.type == "path":
        source["path"] = str(_allowed_path(spec.source.path))
    quotas.check_storage(session=session, project_id=project_id, adding=0)
    model = Model(
        id=model_id, project_id=project_id, name=spec.name, status="validating", source=source
    )
    session.add(model)
    session.flush()
    after_commit(session, lambda: broker.send_validate_model(model_id))
    return model


def _allowed_path(raw: str) -> Path:
    roots = [root.resolve() for root in get_settings().model_path_roots]
    path = Path(raw).resolve()
    if not any(path.is_relative_to(root) for root in roots):
        raise APIError(
            "invalid_request",
            "Path is not under an allowed root (SLIMFORMER_MODEL_PATH_ROOTS)",
            param="source.path",
        )
    if not path.is_dir():
        raise APIError("invalid_request", f"No model folder at {raw!r}", param="source.path")
    return path


def delete_model(*, session: Session, model: Model) -> None:
    if model.project_id is None:
        raise APIError("conflict", "Built-in models cannot be deleted")
    live = live_jobs_referencing(session=session, model_id=model.id)
    if live:
        raise APIError("conflict", f"Model is used by live jobs: {', '.join(live[:5])}")
    model.deleted_at = utcnow()
    keys = [model.storage_key] if model.storage_key else []
    model.storage_key = None
    keys += _derived_keys(session=session, model=model)
    if keys:
        after_commit(session, lambda: _delete_keys(keys))


def _derived_keys(*, session: Session, model: Model) -> list[str]:
    """What the model's jobs left in storage besides their results, for deletion with it: the
    search trials of each of its jobs, and the baseline cache's entries measured on its bytes
    (workers/baseline_cache.py: their rows are deleted here, their state files returned) unless
    another model of the project has the same bytes and still uses them."""
    job_ids = session.scalars(select(Job.id).where(Job.model_id == model.id))
    keys = [search_trials_key(job_id) for job_id in job_ids]
    if model.project_id is None or not model.sha256:
        return keys
    twin = session.scalar(
        select(Model.id)
        .where(
            Model.project_id == model.project_id,
            Model.sha256 == model.sha256,
            Model.id != model.id,
            Model.deleted_at.is_(None),
        )
        .limit(1)
    )
    if twin is not None:
        return keys
    entries = session.scalars(
        select(BaselineMetrics).where(BaselineMetrics.project_id == model.project_id)
    )
    for entry in entries:
        if entry.inputs.get("model_sha256") == model.sha256:
            if entry.state_key:
                keys.append(entry.state_key)
            session.delete(entry)
    return keys


def _delete_keys(keys: list[str]) -> None:
    store = get_store()
    for key in keys:
        store.delete(key)


def to_out(model: Model) -> ModelOut:
    out = ModelOut.model_validate(model)
    progress = (model.details or {}).get("progress")
    if progress is not None:
        out.progress = ModelProgress.model_validate(progress)
    return out


def etag(model: Model) -> str:
    return f'W/"{model.id}-{model.status}-{model.updated_at.timestamp():.6f}"'
