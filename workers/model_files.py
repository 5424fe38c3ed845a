"""Where a model's files come from, and whether they are acceptable.

Uploads are checked member by member before anything is extracted, then the folder is inspected
(config, weights format, custom code) without loading weights. Everything lands in the worker's local
cache (`<data_dir>/cache/models/<id>/`), rebuilt from storage when missing, so any worker can run any
job.

Validation reports its progress on the model (`details.progress`, the API's `Model.progress`): the
phases it goes through (fetch the upload, check the archive, extract, convert a GGUF, read the
weight headers shard by shard, check the shapes against config.json), steps within each (MiB,
shards), one fraction and one ETA from `workers.progress_plan`, written at most every
`PROGRESS_INTERVAL_S` (and at every phase change), so a big upload never looks stuck.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import update

from app.db.session import session_scope
from app.db.tables import Model, utcnow
from app.settings import get_settings
from app.storage import Store, get_store
from app.webhooks import outbox
from workers.compression.archive import ArchiveError, Member, extract_archive
from workers.compression.examples import builtin_model_folder
from workers.compression.model_inspection import (
    ModelInfo,
    ModelRejected,
    inspect_model_folder,
    is_pickled_weight,
)
from workers.compression.shapes import describe_folder, shape_mismatches
from workers.progress_plan import Phase, ProgressPlan

log = logging.getLogger("slimformer.models")

HUB_PATTERNS = ["*.json", "*.safetensors", "*.gguf", "tokenizer*", "*.model", "*.txt"]
PROGRESS_INTERVAL_S = 0.5
MIB = 1 << 20
_COPY_CHUNK = 8 * MIB


# Phase name -> how a person reads it. Weights (`_phases`) are in MiB of work, roughly.
LABELS = {
    "fetch": "copying the upload from storage",
    "scan": "checking the archive",
    "extract": "extracting",
    "download": "downloading from the hub",
    "convert": "converting the GGUF file to safetensors",
    "headers": "reading the weight headers",
    "shapes": "checking the shapes against config.json",
}


def _phases(kind: str, archive_bytes: int) -> list[Phase]:
    mib = max(archive_bytes / MIB, 1.0)
    names: list[tuple[str, float]] = {
        # A local copy is fast; scanning a tar.gz decompresses it, extracting writes it.
        "upload": [("fetch", 0.3 * mib), ("scan", mib), ("extract", mib), ("convert", 1.0)],
        "hub": [("download", 200.0), ("convert", 1.0)],
    }.get(kind, [])
    names += [("headers", 2.0), ("shapes", 5.0)]
    return [Phase(name, LABELS[name], weight) for name, weight in names]


class ValidationProgress:
    """A model's validation progress: every update goes to `listener` (tests, logs); the model
    row gets the latest at most every PROGRESS_INTERVAL_S and at each phase change."""

    def __init__(
        self,
        model_id: str,
        kind: str,
        archive_bytes: int = 0,
        listener: Callable[[dict], None] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model_id = model_id
        self.plan = ProgressPlan(_phases(kind, archive_bytes), clock=clock)
        self.names = [phase.name for phase in self.plan.phases]
        self.listener = listener
        self.clock = clock
        self.started = clock()
        self._written_at: float | None = None
        self._written_phase: str | None = None
        self.last: dict | None = None

    def has(self, phase: str) -> bool:
        return phase in self.names

    def reweigh(self, phase: str, weight: float) -> None:
        weights = [p.weight for p in self.plan.phases]
        weights[self.names.index(phase)] = max(weight, 1.0)
        self.plan.reweigh(weights)

    def bytes_hook(self, phase: str) -> Callable[[int, int], None]:
        return lambda done, total: self.report(phase, done, total, unit="MiB")

    def report(self, phase: str, step: int, total: int, detail: str = "", unit: str = "") -> None:
        index = self.names.index(phase)
        estimate = self.plan.update(index, step, total)
        if unit == "MiB":
            step, total = round(step / MIB), max(round(total / MIB), 1)
            detail = detail or f"{step}/{total} MiB"
        progress = {
            "stage": phase,
            "stage_index": index,
            "num_stages": len(self.names),
            "step": step,
            "total_steps": total,
            "fraction": round(estimate.fraction, 4),
            "eta_s": estimate.eta_s,
            "label": self.plan.label(index, detail),
            "elapsed_s": round(self.clock() - self.started, 1),
        }
        self.last = progress
        if self.listener is not None:
            self.listener(progress)
        now = self.clock()
        if (
            self._written_at is None
            or phase != self._written_phase
            or step >= total
            or now - self._written_at >= PROGRESS_INTERVAL_S
        ):
            self._written_at, self._written_phase = now, phase
            self._write(progress)

    def finished(self, status: str) -> dict:
        """The last progress, as the model keeps it once validation ended."""
        last = self.last or {"stage_index": 0, "num_stages": len(self.names), "fraction": 0.0}
        done = status == "ready"
        progress = {
            **last,
            "stage": "done" if done else "rejected",
            "stage_index": len(self.names) - 1 if done else last["stage_index"],
            "step": 1 if done else last.get("step", 0),
            "total_steps": 1 if done else last.get("total_steps", 1),
            "fraction": 1.0 if done else last["fraction"],
            "eta_s": 0.0 if done else None,
            "label": "ready"
            if done
            else f"rejected while {self.plan.phases[last['stage_index']].label}",
            "elapsed_s": round(self.clock() - self.started, 1),
            "updated_at": utcnow().isoformat(),
        }
        if self.listener is not None:
            self.listener(progress)
        return progress

    def _write(self, progress: dict) -> None:
        now = utcnow()
        with session_scope() as session:
            session.execute(
                update(Model)
                .where(Model.id == self.model_id, Model.status == "validating")
                .values(
                    details={"progress": {**progress, "updated_at": now.isoformat()}},
                    updated_at=now,
                )
                .execution_options(synchronize_session=False)
            )


class ModelUnavailable(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def materialize(model: Model, progress: ValidationProgress | None = None) -> Path:
    """A local folder holding the model as a Hugging Face folder with safetensors weights."""
    settings = get_settings()
    source = model.source
    kind = source.get("type")
    if kind == "builtin":
        return builtin_model_folder(source["name"], settings.cache_dir)
    if kind == "path":
        folder = Path(source["path"])
        return _converted_if_gguf(folder, settings.cache_dir / "models" / f"{model.id}-hf")
    target = settings.cache_dir / "models" / model.id
    if not target.is_dir():
        if kind == "upload":
            _extract_upload(model, target, progress)
        elif kind == "hub":
            if progress is not None:
                progress.report("download", 0, 1, source["repo"])
            _download_from_hub(source, target)
            if progress is not None:
                progress.report("download", 1, 1, source["repo"])
        else:
            raise ModelUnavailable("unsupported_model", f"unknown model source {kind!r}")
    return _converted_if_gguf(target, settings.cache_dir / "models" / f"{model.id}-hf", progress)


def _refuse_pickles_only(members: list[Member]) -> None:
    names = [member.name for member in members]
    has_safe_weights = any(n.endswith((".safetensors", ".gguf")) for n in names)
    if not has_safe_weights and any(is_pickled_weight(n) for n in names):
        raise ModelRejected(
            "unsafe_model",
            "the archive has only pickled weights (.bin/.pt), "
            "which can run code when loaded; convert them to safetensors "
            "with save_pretrained(..., safe_serialization=True)",
        )


def _fetch(
    store: Store, key: str, destination: Path, on_bytes: Callable[[int, int], None] | None
) -> None:
    """`store.fetch`, in chunks that report the bytes copied."""
    if on_bytes is None:
        store.fetch(key, destination)
        return
    total = store.size(key)
    on_bytes(0, total)
    destination.parent.mkdir(parents=True, exist_ok=True)
    done = 0
    with store.open(key) as source, open(destination, "wb") as sink:
        while chunk := source.read(_COPY_CHUNK):
            sink.write(chunk)
            done += len(chunk)
            on_bytes(done, total)


def _extract_upload(model: Model, target: Path, progress: ValidationProgress | None = None) -> None:
    settings = get_settings()
    if not model.storage_key:
        raise ModelUnavailable("unsupported_model", "the upload is no longer in storage")
    scratch = settings.cache_dir / "incoming" / f"{model.id}.archive"
    track = progress is not None and progress.has("fetch")
    _fetch(get_store(), model.storage_key, scratch, progress.bytes_hook("fetch") if track else None)
    target.parent.mkdir(parents=True, exist_ok=True)

    def archive_progress(phase: str, done: int, total: int) -> None:
        if phase == "extract" and done == 0:
            progress.reweigh("extract", total / MIB)  # the real, uncompressed size
        progress.report(phase, done, total, unit="MiB")

    try:
        extract_archive(
            scratch,
            target,
            max_members=settings.max_archive_members,
            max_total_bytes=settings.max_extracted_bytes,
            skip=is_pickled_weight,
            check=_refuse_pickles_only,
            progress=archive_progress if track else None,
        )
    finally:
        scratch.unlink(missing_ok=True)


def _download_from_hub(source: dict, target: Path) -> None:
    from huggingface_hub import snapshot_download

    try:
        # Data only: weights in safetensors/GGUF, configs and tokenizer files; never code or pickles.
        snapshot_download(
            repo_id=source["repo"],
            revision=source.get("revision") or "main",
            local_dir=target,
            allow_patterns=HUB_PATTERNS,
        )
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, auth: all mean "cannot fetch"
        shutil.rmtree(target, ignore_errors=True)
        raise ModelUnavailable(
            "unsupported_model", f"could not fetch {source['repo']} from the hub: {exc}"
        ) from exc


def _converted_if_gguf(
    folder: Path, converted: Path, progress: ValidationProgress | None = None
) -> Path:
    ggufs = sorted(folder.glob("*.gguf"))
    if ggufs and not any(folder.glob("*.safetensors")):
        if not converted.is_dir():
            from workers.compression.loading import convert_gguf

            track = progress is not None and progress.has("convert")
            if track:
                progress.reweigh("convert", 3 * ggufs[0].stat().st_size / MIB)
                progress.report("convert", 0, 1, ggufs[0].name)
            convert_gguf(ggufs[0], converted)
            if track:
                progress.report("convert", 1, 1, ggufs[0].name)
        return converted
    return folder


def validate_model(model_id: str, listener: Callable[[dict], None] | None = None) -> None:
    """The validation task: `validating` -> `ready` (with what was learned) or `rejected` (why).
    `listener` gets every progress update (the model row gets them throttled)."""
    with session_scope() as session:
        model = session.get(Model, model_id)
        if model is None or model.status != "validating":
            return
    kind = model.source.get("type")
    progress = ValidationProgress(model_id, kind, model.size_bytes or 0, listener)
    try:
        folder = materialize(model, progress) if kind != "path" else Path(model.source["path"])
        info = inspect_model_folder(
            folder, lambda step, total, detail: progress.report("headers", step, total, detail)
        )
        progress.report("shapes", 0, 1)
        if info.weight_format == "gguf":  # llama.cpp tensor names: take the shapes from the config
            info.linear_shapes, _ = describe_folder(folder, info.architecture)
        elif wrong := shape_mismatches(folder, info.tensor_shapes):
            raise ModelRejected(
                "unsupported_model",
                f"config.json does not describe these weights ({len(wrong)} tensors differ): "
                + "; ".join(wrong[:3]),
            )
        progress.report("shapes", 1, 1)
    except Exception as exc:  # noqa: BLE001 - the files are data: any failure reading them rejects
        if not isinstance(exc, ArchiveError | ModelRejected | ModelUnavailable):
            log.exception("validating %s failed unexpectedly", model_id)
            exc = ModelUnavailable("unsupported_model", f"could not read the model: {exc}")
        log.info("model %s rejected: %s", model_id, exc)
        shutil.rmtree(get_settings().cache_dir / "models" / model_id, ignore_errors=True)
        _finish(
            model_id,
            status="rejected",
            error={"code": exc.code, "message": exc.message},
            progress=progress.finished("rejected"),
        )
        if model.storage_key:
            get_store().delete(model.storage_key)  # a rejected upload keeps no bytes
            with session_scope() as session:
                session.execute(update(Model).where(Model.id == model_id).values(storage_key=None))
        return
    _finish(model_id, status="ready", info=info, progress=progress.finished("ready"))


def _finish(
    model_id: str,
    *,
    status: str,
    info: ModelInfo | None = None,
    error: dict | None = None,
    progress: dict | None = None,
) -> None:
    values: dict = {"status": status, "updated_at": utcnow(), "error": error}
    if progress is not None:
        values["details"] = {"progress": progress}
    if info is not None:
        values.update(
            architecture=info.architecture,
            task=info.task,
            parameters=info.parameters,
            details={
                "model_type": info.model_type,
                "weight_format": info.weight_format,
                "weight_bytes": info.size_bytes,
                "linear_shapes": info.linear_shapes,
                **({"progress": progress} if progress is not None else {}),
            },
        )
    with session_scope() as session:
        moved = session.execute(
            update(Model)
            .where(Model.id == model_id, Model.status == "validating")
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if moved.rowcount:
            outbox.model_status_changed(session, model_id=model_id, status=status)
