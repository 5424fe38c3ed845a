"""The result cache: a job whose inputs are byte-identical to an earlier succeeded job's, in the
same project, reuses that job's artifacts instead of running the engine.

**The inputs** (`fingerprint_inputs`): the model (id and sha256); the resolved recipe, whose stages
name the other models and datasets they read (their sha256s are added); the calibration and
evaluation settings with their datasets' ids and sha256s; the targets and export options; the
versions of what computes the result (torch, transformers, compressed-tensors, slimformer, and a
digest of the engine's own source, so an edited engine never serves an old result); and the
device class that runs it. Ids stay beside the sha256s because the artifact records them
(`report.json` and the model card name the model and datasets): the same bytes under another id
would not make the same artifact.

**Where it is computed**: in the worker, when an attempt starts (after the claim, before anything
is loaded). Only the worker knows all of it: the library versions and the device class are the
worker's (the API never imports torch and may run another image; a job for `any` device gets its
class from the worker that takes it), and the default evaluation set of a job submitted while its
model was validating is chosen there. The price is that a hit waits for a worker like any job;
then it ends at once, through the same claim, fence, events and webhooks as any success.

A model without a sha256 (hub and path sources, whose bytes can change under the same name) is
never reused. Every job that succeeds records its fingerprint, `cache: false` ones too, so a
fresh run serves the later ones.

**Shared bytes**: the hit's artifact rows point at the stored objects of the job it reused (no
copy: a model artifact can be gigabytes), and deleting a job deletes only the objects that no
other row points at (`app.jobs.service.delete_job`). The hit inserts its rows and then, holding
the source's row (`FOR SHARE` on PostgreSQL; on SQLite its first write holds the database), checks
that the source's rows are still there. A delete of the source either committed first (the hit
sees the rows gone, rolls back and runs the job) or waits, then sees the hit's rows and keeps the
bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from sqlalchemy import exists, func, insert, select

from app.db.session import session_scope
from app.db.tables import Artifact, Dataset, Job, Model, utcnow
from app.ids import new_id
from app.jobs.lifecycle import add_event
from app.jobs.routing import device_class
from workers.attempt import Interrupted, JobContext
from workers.compression.recipe import Recipe  # torch-free
from workers.job_inputs import evaluation_dataset, read_job, read_row, ready_row
from workers.outage import ride_out
from workers.presence import DEVICE_ENV

LIBRARIES = ("torch", "transformers", "compressed-tensors", "slimformer")
WORKERS = Path(__file__).resolve().parent
# The source the artifact's bytes and metrics depend on, beside the libraries' versions.
ENGINE_SOURCES = ("compression", "runner.py", "packaging.py", "job_inputs.py", "checkpoints.py")


def reuse_if_cached(context: JobContext) -> bool:
    """The attempt's shortcut (`workers.attempt.run_attempt`): record the job's fingerprint and,
    unless the job says `cache: false`, end it as a copy of an earlier job with the same one.
    Returns whether it ended the attempt."""
    job = read_job(context.job_id)
    inputs = fingerprint_inputs(job)
    if inputs is None:
        return False
    context.fingerprint = fingerprint(inputs)
    if not job.cache:
        return False
    source_id = find_source(job, context.fingerprint)
    return source_id is not None and _reuse(context, job, source_id)


def fingerprint(inputs: dict) -> str:
    body = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def fingerprint_inputs(job: Job) -> dict | None:
    """Everything the job's result depends on, or None when something it reads has no sha256.
    Validates the model first if its validation message is still queued (as the run would)."""
    model = ride_out(f"job {job.id}: model", lambda: read_row(Model, job.model_id))
    assert model is not None
    model = ready_row(model, "model")
    recipe = Recipe.model_validate(job.recipe)
    evaluation = {**(job.evaluation or {}), "dataset_id": evaluation_dataset(job, model)}
    dataset_ids = {evaluation["dataset_id"]}
    if job.calibration:
        dataset_ids.add(job.calibration["dataset_id"])
    model_ids = {model.id}
    for stage in recipe.stages:
        referenced = stage.referenced_ids()
        model_ids.update(referenced["model_ids"])
        dataset_ids.update(referenced["dataset_ids"])

    def read_shas() -> dict[str, str | None]:
        with session_scope() as session:
            models = session.execute(
                select(Model.id, Model.sha256).where(Model.id.in_(model_ids))
            ).all()
            datasets = session.execute(
                select(Dataset.id, Dataset.sha256).where(
                    Dataset.id.in_(dataset_ids), Dataset.deleted_at.is_(None)
                )
            ).all()
        return {**dict(models), **dict(datasets)}

    shas = ride_out(f"job {job.id}: sha256s", read_shas)
    if any(shas.get(item) is None for item in model_ids | dataset_ids):
        return None  # a model from the hub or a path, or a dataset that is gone
    return {
        "model": {"id": model.id, "sha256": model.sha256},
        "recipe": job.recipe,
        "calibration": job.calibration,
        "evaluation": evaluation,
        "sha256": {item: shas[item] for item in sorted(model_ids | dataset_ids)},
        "targets": job.targets,
        "export": job.export,
        "versions": versions(),
        "device": job_device_class(recipe, job),
    }


def job_device_class(recipe: Recipe, job: Job) -> str:
    """The class of the device this worker runs the job on, decided as `runner.execute` decides
    the device: the recipe's requirement, a cpu job on the CPU, else this worker's device."""
    if recipe.required_device:
        return device_class(recipe.required_device)
    if job.device == "cpu":
        return "cpu"
    described = os.environ.get(DEVICE_ENV)  # `slimformer worker` probed it (workers/presence.py)
    if described:
        return json.loads(described)["device"]
    from workers.compression.device import select_device

    return device_class(str(select_device()))


@lru_cache(maxsize=1)
def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    found["engine"] = engine_digest()
    return found


def engine_digest() -> str:
    """sha256 over the engine's source files, named and in a fixed order."""
    return source_digest(ENGINE_SOURCES)


def source_digest(entries: tuple[str, ...]) -> str:
    """sha256 over the named files and folders under `workers/` (their .py files), in order."""
    digest = hashlib.sha256()
    for entry in entries:
        path = WORKERS / entry
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(WORKERS)).encode() + b"\0")
            digest.update(file.read_bytes() + b"\0")
    return digest.hexdigest()


def find_source(job: Job, job_fingerprint: str) -> str | None:
    """The earliest succeeded job of the project with these inputs that still has artifacts."""

    def read() -> str | None:
        with session_scope() as session:
            return session.scalar(
                select(Job.id)
                .where(
                    Job.project_id == job.project_id,
                    Job.fingerprint == job_fingerprint,
                    Job.status == "succeeded",
                    Job.id != job.id,
                    exists().where(Artifact.job_id == Job.id),
                )
                .order_by(Job.finished_at, Job.id)
                .limit(1)
            )

    return ride_out(f"job {job.id}: result cache", read)


def _reuse(context: JobContext, job: Job, source_id: str) -> bool:
    """One transaction: artifact rows sharing the source's stored objects, a log event, and
    running -> succeeded fenced on the attempt. False (nothing written) when the source went."""
    with session_scope() as session:
        source = session.execute(
            select(Job.metrics)
            .where(Job.id == source_id, Job.status == "succeeded")
            .with_for_update(read=True)
        ).one_or_none()
        rows = session.scalars(
            select(Artifact).where(Artifact.job_id == source_id).order_by(Artifact.id)
        ).all()
        if source is None or not rows:
            return False
        now = utcnow()
        for row in rows:
            session.execute(
                insert(Artifact).values(
                    id=new_id("art"),
                    job_id=job.id,
                    project_id=job.project_id,
                    kind=row.kind,
                    format=row.format,
                    filename=row.filename,
                    size_bytes=row.size_bytes,
                    sha256=row.sha256,
                    storage_key=row.storage_key,
                    created_at=now,
                )
            )
        # Asked again after this transaction's first write (SQLite: it holds the database now):
        # a delete of the source that committed since the read above shows here.
        still = session.scalar(select(func.count()).where(Artifact.job_id == source_id))
        if still != len(rows):
            session.rollback()
            return False
        message = f"reused the artifacts of {source_id}"
        add_event(
            session,
            job_id=job.id,
            type="log",
            message=f"same inputs as {source_id}, which succeeded: its artifacts are reused and "
            "the engine does not run (`cache: false` runs it)",
            data={"reused_from": source_id, "fingerprint": context.fingerprint},
            attempt=context.attempt,
        )
        moved = context.move(
            session,
            to="succeeded",
            from_=("running",),
            values={
                "metrics": {**(source.metrics or {}), "reused_from": source_id},
                "progress": {
                    "fraction": 1.0,
                    "eta_s": 0,
                    "message": message,
                    "updated_at": now.isoformat(),
                },
                "fingerprint": context.fingerprint,
            },
            message=f"status: succeeded ({message})",
            data={"reused_from": source_id},
        )
        if not moved:
            session.rollback()
    if (
        not moved
    ):  # cancelled meanwhile, or the lease went to another worker: leave as _succeed does
        raise Interrupted("cancelled")
    return True
