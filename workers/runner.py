"""Running one job, exactly once to success, whatever dies.

claim (conditional update queued -> running, attempt + 1)  ->  heartbeat thread renews the lease and
watches for cancel / max_runtime  ->  load, evaluate the baseline, compress, export, load-test,
evaluate the result  ->  store artifacts under this attempt's prefix  ->  in ONE transaction: artifact
rows + running -> succeeded, fenced on the attempt. A worker that lost its lease (the reaper handed the
job to someone else) fails the fence, deletes its files and leaves.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import socket
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import func, insert, select, update

from app.db.session import session_scope
from app.db.tables import Artifact, Dataset, Job, Model, utcnow
from app.ids import new_id
from app.jobs.lifecycle import add_event, lease_deadline, transition
from app.jobs.service import default_evaluation_dataset
from app.settings import get_settings
from app.storage import get_store
from workers.checkpoints import StorageBlockCheckpoint, fingerprint
from workers.compression.preflight import estimate_memory
from workers.model_files import ModelUnavailable, materialize, validate_model

log = logging.getLogger("slimformer.runner")


class Interrupted(Exception):
    """Raised at the next step once the heartbeat saw a cancel, a timeout or a lost lease."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class JobFailure(Exception):
    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


@dataclass
class JobContext:
    """What the running attempt knows; `check()` is the cooperative-cancellation point."""

    job_id: str
    attempt: int
    max_runtime_s: int
    stage_names: list[str] = field(default_factory=list)
    interrupt: str | None = None
    started: float = field(default_factory=time.monotonic)
    clear_checkpoints: Callable[[], object] = lambda: None
    _last_progress: float = 0.0

    def check(self) -> None:
        if self.interrupt is not None:
            raise Interrupted(self.interrupt)

    def progress(
        self,
        stage_index: int,
        step: int,
        total_steps: int,
        message: str,
        *,
        force: bool = False,
        data: dict[str, Any] | None = None,
    ) -> None:
        self.check()
        now = time.monotonic()
        if not force and now - self._last_progress < get_settings().progress_min_interval_s:
            return
        self._last_progress = now
        num_stages = len(self.stage_names)
        within = step / total_steps if total_steps else 0.0
        fraction = min(1.0, (stage_index + within) / num_stages)
        elapsed = now - self.started
        eta = elapsed * (1 - fraction) / fraction if fraction > 0.02 else None
        progress = {
            "stage": self.stage_names[stage_index],
            "stage_index": stage_index,
            "num_stages": num_stages,
            "step": step,
            "total_steps": total_steps,
            "fraction": round(fraction, 4),
            "eta_s": round(eta, 1) if eta else None,
            "message": message,
            "updated_at": utcnow().isoformat(),
        }
        with session_scope() as session:
            seq = add_event(
                session,
                job_id=self.job_id,
                type="progress",
                message=message,
                data={**progress, "details": data} if data else progress,
                values={"progress": progress},
                attempt=self.attempt,
            )
        if seq is None:
            self.interrupt = "lease_lost"
            self.check()

    def log(
        self,
        message: str,
        data: dict[str, Any] | None = None,
        *,
        type: str = "log",
        level: str = "info",
    ) -> None:
        with session_scope() as session:
            add_event(
                session,
                job_id=self.job_id,
                type=type,
                message=message,
                data=data,
                level=level,
                attempt=self.attempt,
            )


class Heartbeat(threading.Thread):
    """Renews the lease every lease_s / 4 and turns cancel / max_runtime into an interrupt."""

    def __init__(self, context: JobContext) -> None:
        super().__init__(name=f"heartbeat-{context.job_id}", daemon=True)
        self.context = context
        self.stopped = threading.Event()

    def run(self) -> None:
        settings = get_settings()
        while not self.stopped.wait(settings.lease_s / 4):
            try:
                self.beat(settings.lease_s)
            except Exception:  # noqa: BLE001 - one failed beat is fine; the lease has slack
                log.warning("heartbeat for %s failed", self.context.job_id, exc_info=True)

    def beat(self, lease_s: float) -> None:
        context = self.context
        with session_scope() as session:
            status = session.execute(
                update(Job)
                .where(
                    Job.id == context.job_id,
                    Job.attempt == context.attempt,
                    Job.status.in_(("running", "cancelling")),
                )
                .values(lease_until=lease_deadline(lease_s))
                .returning(Job.status)
                .execution_options(synchronize_session=False)
            ).scalar_one_or_none()
        if status is None:
            context.interrupt = "lease_lost"
        elif status == "cancelling":
            context.interrupt = context.interrupt or "cancelled"
        elif time.monotonic() - context.started > context.max_runtime_s:
            context.interrupt = context.interrupt or "timeout"

    def stop(self) -> None:
        self.stopped.set()


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def claim(job_id: str) -> JobContext | None:
    settings = get_settings()
    now = utcnow()
    with session_scope() as session:
        if not transition(
            session,
            job_id=job_id,
            to="running",
            from_=("queued",),
            extra_where=Job.attempt < Job.max_attempts,
            values={
                "attempt": Job.attempt + 1,
                "lease_until": lease_deadline(settings.lease_s),
                "worker": worker_name(),
                "started_at": func.coalesce(Job.started_at, now),
                "error": None,
            },
            message=f"status: running on {worker_name()}",
            data={"worker": worker_name()},
        ):
            return None
        job = session.get(Job, job_id)
        assert job is not None
        return JobContext(job_id=job_id, attempt=job.attempt, max_runtime_s=job.max_runtime_s)


def run_job(job_id: str) -> None:
    context = claim(job_id)
    if context is None:
        log.info("job %s is not queued (someone else has it, or it is finished): leaving", job_id)
        return
    heartbeat = Heartbeat(context)
    heartbeat.start()
    prefix = f"jobs/{job_id}/attempt-{context.attempt}"
    scratch = Path(tempfile.mkdtemp(prefix=f"{job_id}-", dir=_scratch_root()))
    try:
        metrics, files = execute(context, scratch)
        context.check()
        _succeed(context, prefix, metrics, files)
    except (Interrupted, SoftTimeLimitExceeded) as exc:
        reason = exc.reason if isinstance(exc, Interrupted) else "timeout"
        get_store().delete_prefix(prefix)
        if reason != "lease_lost":  # the attempt that owns the job now resumes from them
            context.clear_checkpoints()
        _interrupted(context, reason)
    except JobFailure as exc:
        get_store().delete_prefix(prefix)
        context.clear_checkpoints()
        _fail(context, exc.code, exc.message, retryable=exc.retryable)
    except Exception as exc:  # noqa: BLE001 - any other error fails the job with its message
        log.exception("job %s failed", job_id)
        get_store().delete_prefix(prefix)
        context.clear_checkpoints()
        _fail(context, "engine_error", f"{type(exc).__name__}: {exc}", retryable=False)
    finally:
        heartbeat.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def _scratch_root() -> Path:
    root = get_settings().cache_dir / "scratch"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _succeed(context: JobContext, prefix: str, metrics: dict, files: list[dict]) -> None:
    store = get_store()
    stored = []
    for item in files:
        obj = store.put_file(f"{prefix}/{item['filename']}", item["path"])
        if obj.sha256 != item["sha256"]:
            raise RuntimeError(f"{item['filename']}: stored bytes do not match what was written")
        stored.append((item, obj))
    with session_scope() as session:
        job = session.get(Job, context.job_id)
        assert job is not None
        for item, obj in stored:
            session.execute(
                insert(Artifact).values(
                    id=new_id("art"),
                    job_id=context.job_id,
                    project_id=job.project_id,
                    kind=item["kind"],
                    format=item["format"],
                    filename=item["filename"],
                    size_bytes=obj.size_bytes,
                    sha256=obj.sha256,
                    storage_key=obj.key,
                    created_at=utcnow(),
                )
            )
        progress = {
            **(job.progress or {}),
            "fraction": 1.0,
            "eta_s": 0,
            "message": "done",
            "updated_at": utcnow().isoformat(),
        }
        moved = transition(
            session,
            job_id=context.job_id,
            to="succeeded",
            from_=("running",),
            attempt=context.attempt,
            values={"metrics": metrics, "progress": progress},
            message="status: succeeded",
        )
        if not moved:
            # Cancelled meanwhile, or the lease went to another worker: this attempt leaves no trace.
            session.rollback()
    if not moved:
        store.delete_prefix(prefix)
        _interrupted(context, "cancelled")


def _interrupted(context: JobContext, reason: str) -> None:
    if reason == "cancelled":
        with session_scope() as session:
            transition(
                session,
                job_id=context.job_id,
                to="cancelled",
                from_=("cancelling",),
                attempt=context.attempt,
                message="status: cancelled; nothing kept",
            )
    elif reason == "timeout":
        message = f"ran past max_runtime_s={context.max_runtime_s}"
        _fail(context, "timeout", message, retryable=False)
    # lease_lost: another attempt owns the job now; touch nothing.


def _fail(context: JobContext, code: str, message: str, *, retryable: bool) -> None:
    with session_scope() as session:
        moved = transition(
            session,
            job_id=context.job_id,
            to="failed",
            from_=("running",),
            attempt=context.attempt,
            level="error",
            values={"error": {"code": code, "message": message, "retryable": retryable}},
            message=f"status: failed ({code}): {message}",
        )
    if not moved:  # a cancel arrived meanwhile: it wins
        _interrupted(context, "cancelled")


# --- the work itself -------------------------------------------------------------------------------


def execute(context: JobContext, scratch: Path) -> tuple[dict, list[dict]]:
    """Load, measure the baseline, compress, export, load-test, measure the result."""
    import torch

    from workers.compression import compress
    from workers.compression.data import calibration_batches, read_records
    from workers.compression.device import select_device
    from workers.compression.evaluation import Evaluator
    from workers.compression.export import (
        load_artifact,
        save_model,
        update_metadata,
        verify_export,
    )
    from workers.compression.loading import load_model
    from workers.compression.recipe import EvaluationSettings, Recipe
    from workers.compression.registry import StageResources

    with session_scope() as session:
        job = session.get(Job, context.job_id)
        model_row = session.get(Model, job.model_id) if job else None
        assert job is not None and model_row is not None
        session.expunge_all()
    recipe = Recipe.model_validate(job.recipe)
    methods = [stage.method for stage in recipe.stages]
    context.stage_names = ["load", "baseline", *methods, "export", "evaluate"]
    context.progress(0, 0, 3, "preparing the model", force=True)

    model_row, folder = _ready_folder(model_row, "model")
    context.check()
    device = torch.device(recipe.required_device) if recipe.required_device else select_device()
    _preflight(model_row, job, device)
    torch.manual_seed(0)
    loaded = load_model(folder, device=device)
    context.progress(0, 1, 3, f"loaded {loaded.architecture} on {device}", force=True)

    evaluation = dict(job.evaluation or {})
    eval_dataset_id = evaluation.pop("dataset_id", None) or _default_dataset(loaded.task)
    eval_records, eval_sha = _dataset_records(eval_dataset_id, read_records)
    settings = EvaluationSettings.model_validate(evaluation)
    calibration = None
    calibration_sha = None
    if job.calibration:
        cal_records, calibration_sha = _dataset_records(job.calibration["dataset_id"], read_records)
        calibration = calibration_batches(
            [record["text"] for record in cal_records],
            loaded.tokenizer,
            num_samples=job.calibration["num_samples"],
            seq_len=job.calibration["seq_len"],
            seed=job.calibration["seed"],
        )
    context.progress(0, 3, 3, "data ready", force=True)

    evaluator = Evaluator(
        task=loaded.task,
        tokenizer=loaded.tokenizer,
        settings=settings,
        records=eval_records,
        device=device,
    )
    context.progress(1, 0, 1, "measuring the original model", force=True)
    baseline = evaluator.measure(loaded.model, folder=folder, on_step=context.check)
    context.log("baseline measured", {"baseline": baseline}, type="metric")

    def on_progress(update: Any) -> None:
        # Throttled, except a stage's last step: every stage shows up finished in the events.
        context.progress(
            2 + update.stage_index,
            update.step,
            update.total_steps,
            update.message,
            force=update.step == update.total_steps,
            data=update.data,
        )

    students: dict[int, Any] = {}  # id(model) -> LoadedModel of a distillation student

    def load_student(model_id: str) -> Any:
        student = _load_student(model_id, loaded, device)
        students[id(student.model)] = student
        return student.model

    def measure_stage(index: int, model: Any) -> dict:
        # A pipeline reports what each stage cost and bought: quality after every stage.
        context.progress(2 + index, 1, 1, f"measuring the model after {methods[index]}", force=True)
        measured = evaluator.measure(model, folder=None, on_step=context.check, only=QUALITY)
        context.log(f"after stage {index} ({methods[index]})", {"metrics": measured}, type="metric")
        return measured

    resources = StageResources(
        tokenizer=loaded.tokenizer,
        texts=lambda dataset_id: [r["text"] for r in _dataset_records(dataset_id, read_records)[0]],
        load_model=load_student,
    )
    checkpoints = _checkpoints(model_row, job, calibration_sha)
    context.clear_checkpoints = lambda: [checkpoints(i).clear() for i in range(len(methods))]
    result = compress(
        loaded.model,
        recipe,
        calibration,
        progress=on_progress,
        checkpoints=checkpoints,
        resources=resources,
        after_stage=measure_stage,
    )
    context.clear_checkpoints()  # they exist to resume this stage; it is done
    context.check()
    if result.model is not loaded.model:  # a distilled student of its own: saved as itself
        loaded = students[id(result.model)]

    export_index = 2 + len(methods)
    context.progress(export_index, 0, 2, "writing the compressed model", force=True)
    model_folder = scratch / "model"
    inputs = {
        "model_sha256": model_row.sha256,
        "model_id": model_row.id,
        "evaluation_dataset_sha256": eval_sha,
        "calibration_dataset_sha256": calibration_sha,
    }
    # Pruned layers are stored dense: transformers 5.24 / compressed-tensors 0.20.1 cannot read the
    # sparse bitmask layouts and would load such a folder with random weights, warning only.
    save_model(
        loaded,
        result.model,
        model_folder,
        recipe=job.recipe,
        metrics={},
        inputs=inputs,
        sparse_storage="dense",
    )
    sample = loaded.tokenizer(
        eval_records[0]["text"], return_tensors="pt", truncation=True, max_length=64
    )["input_ids"]
    verification = verify_export(model_folder, result.model, loaded.task, sample)
    context.progress(export_index, 1, 2, "export load-tested", force=True)

    context.progress(export_index + 1, 0, 1, "measuring the compressed model", force=True)
    # Measure what users will run: the exported folder loaded the documented way (real low-bit
    # kernels where the device has them), not the in-memory model the methods left behind.
    deployed = load_artifact(model_folder, device=device)
    compressed = evaluator.measure(deployed.model, folder=model_folder, on_step=context.check)
    compressed["runtime"] = getattr(deployed.model, "slimformer_runtime", None)
    metrics = {
        "baseline": baseline,
        "compressed": compressed,
        "delta": evaluator.delta(baseline, compressed),
        "trials": [],
        "settings": {
            **evaluator.settings_record(),
            "dataset_id": eval_dataset_id,
            "dataset_sha256": eval_sha,
        },
        "stages": result.stages,
        "export_check": verification,
    }
    if job.targets:
        metrics["targets"] = _targets_report(job.targets, baseline, compressed)
    # The folder's card and slimformer.json carry the final metrics: rewrite them, then pack.
    update_metadata(loaded, model_folder, recipe=job.recipe, metrics=metrics, inputs=inputs)
    files = [
        _pack(model_folder, scratch / "model.tar.gz"),
        _report(metrics, job.recipe, inputs, scratch / "report.json"),
    ]
    return metrics, files


QUALITY = ("perplexity", "embedding_cosine", "accuracy")


def _ready_folder(row: Model, what: str) -> tuple[Model, Path]:
    """The model's files on local disk, once it is validated (the row as it is then, and the
    folder); a model that is not ready fails the job with its own error."""
    if row.status == "validating":
        validate_model(row.id)  # the validation message may still be queued behind us
        with session_scope() as session:
            row = session.get(Model, row.id)
            session.expunge_all()
    if row.status != "ready":
        error = row.error or {}
        raise JobFailure(
            error.get("code", "unsupported_model"),
            f"{what} {row.id} is {row.status}: {error.get('message', '')}",
        )
    try:
        return row, materialize(row)
    except ModelUnavailable as exc:
        raise JobFailure(exc.code, exc.message) from exc


def _load_student(model_id: str, teacher: Any, device: Any) -> Any:
    """Another registered model, as a distillation student: ready, safe, same tokenizer."""
    from workers.compression.loading import load_model

    with session_scope() as session:
        row = session.get(Model, model_id)
        session.expunge_all()
    if row is None or row.deleted_at is not None:
        raise JobFailure("not_found", f"the student model {model_id} is gone")
    _, folder = _ready_folder(row, "student model")
    student = load_model(folder, device=device)
    if student.task != teacher.task:
        raise JobFailure(
            "invalid_request",
            f"the student {model_id} is a {student.task} model, the teacher a {teacher.task}",
        )
    if student.tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
        raise JobFailure(
            "invalid_request",
            f"the student {model_id} has another tokenizer than the teacher: distillation "
            "compares their outputs token by token, so the vocabularies must be the same",
        )
    return student


def _checkpoints(model_row: Model, job: Job, calibration_sha: str | None):  # noqa: ANN202
    """Per-stage block checkpoints in storage, keyed by what the computation depends on."""
    import torch
    import transformers

    store = get_store()

    def for_stage(index: int) -> StorageBlockCheckpoint:
        key = fingerprint(
            model={"id": model_row.id, "sha256": model_row.sha256, "source": model_row.source},
            calibration={**(job.calibration or {}), "sha256": calibration_sha},
            stages=job.recipe["stages"][: index + 1],
            versions={"torch": torch.__version__, "transformers": transformers.__version__},
        )
        return StorageBlockCheckpoint(store, f"checkpoints/{key}")

    return for_stage


def _preflight(model_row: Model, job: Job, device: Any) -> None:
    """Refuse a job that cannot fit, before loading it (when the model's size is known)."""
    if not model_row.parameters:
        return
    calibration = job.calibration or {}
    estimate = estimate_memory(
        parameters=model_row.parameters,
        linear_shapes=(model_row.details or {}).get("linear_shapes") or {},
        calibration_samples=calibration.get("num_samples", 0),
        calibration_seq_len=calibration.get("seq_len", 0),
        evaluation_seq_len=(job.evaluation or {}).get("seq_len", 512),
        device=str(device),
        training_tokens=max(
            (
                (stage.get("micro_batch_size") or stage.get("batch_size", 8))
                * stage.get("seq_len", 256)
                for stage in job.recipe["stages"]
                if stage["method"] == "distill"
            ),
            default=0,
        ),
    )
    if not estimate.fits:
        raise JobFailure(
            "insufficient_memory",
            f"this job needs about {estimate.peak_bytes / 1e9:.1f} GB on {device} but "
            f"{estimate.available_bytes / 1e9:.1f} GB is free ({estimate.breakdown}); use fewer "
            "calibration samples or a shorter seq_len, or a worker with more memory",
        )


def _default_dataset(task: str) -> str:
    name = default_evaluation_dataset(task)
    with session_scope() as session:
        dataset_id = session.scalar(
            select(Dataset.id).where(
                Dataset.project_id.is_(None), Dataset.name == name, Dataset.deleted_at.is_(None)
            )
        )
    if dataset_id is None:
        raise JobFailure("invalid_request", f"no evaluation dataset given and no built-in {name!r}")
    return dataset_id


def _dataset_records(dataset_id: str, read_records: Any) -> tuple[list[dict], str | None]:
    with session_scope() as session:
        dataset = session.get(Dataset, dataset_id)
        session.expunge_all()
    if dataset is None or dataset.storage_key is None or dataset.deleted_at is not None:
        raise JobFailure("not_found", f"dataset {dataset_id} is gone")
    local = (
        get_settings().cache_dir / "datasets" / f"{dataset.id}-{dataset.sha256}.{dataset.format}"
    )
    if not local.is_file():
        get_store().fetch(dataset.storage_key, local)
    return read_records(local, dataset.format), dataset.sha256


def _targets_report(targets: dict, baseline: dict, compressed: dict) -> dict:
    """Honest: the service records whether each target held (no search yet in this version)."""
    report = {}
    higher_is_better = {"embedding_cosine", "accuracy", "tokens_per_s"}
    for metric, max_drop in (targets.get("max_metric_drop") or {}).items():
        before, after = baseline.get(metric), compressed.get(metric)
        if not isinstance(before, int | float) or not isinstance(after, int | float) or not before:
            report[metric] = {"met": None, "reason": "metric not measured"}
            continue
        drop = (
            (before - after) / abs(before)
            if metric in higher_is_better
            else (after - before) / abs(before)
        )
        report[metric] = {"max_drop": max_drop, "drop": round(drop, 6), "met": drop <= max_drop}
    return {
        "met": all(item.get("met") for item in report.values()) if report else None,
        "metrics": report,
    }


def _pack(folder: Path, target: Path) -> dict:
    """A deterministic .tar.gz: sorted names, zeroed times and owners (same bytes for same input)."""
    with (
        open(target, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as zipped,
        tarfile.open(fileobj=zipped, mode="w") as tar,
    ):
        for path in sorted(folder.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=f"model/{path.relative_to(folder)}")
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            info.mode = 0o755 if path.is_dir() else 0o644
            if path.is_file():
                with path.open("rb") as handle:
                    tar.addfile(info, handle)
            else:
                tar.addfile(info)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    return {
        "path": target,
        "filename": "model.tar.gz",
        "kind": "model",
        "format": "hf-safetensors+tar.gz",
        "sha256": digest,
    }


def _report(metrics: dict, recipe: dict, inputs: dict, target: Path) -> dict:
    body = json.dumps(
        {"recipe": recipe, "metrics": metrics, "inputs": inputs},
        indent=2,
        sort_keys=True,
        default=str,
    ).encode()
    target.write_bytes(body)
    return {
        "path": target,
        "filename": "report.json",
        "kind": "report",
        "format": "json",
        "sha256": hashlib.sha256(body).hexdigest(),
    }
