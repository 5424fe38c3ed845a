"""Where a model's files come from, and whether they are acceptable.

Uploads are checked member by member before anything is extracted, then the folder is inspected
(config, weights format, custom code) without loading weights. Everything lands in the worker's local
cache (`<data_dir>/cache/models/<id>/`), rebuilt from storage when missing, so any worker can run any
job.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from sqlalchemy import update

from app.db.session import session_scope
from app.db.tables import Model, utcnow
from app.settings import get_settings
from app.storage import get_store
from app.webhooks import outbox
from workers.compression.archive import ArchiveError, extract_archive, list_members
from workers.compression.examples import builtin_model_folder
from workers.compression.model_inspection import (
    ModelInfo,
    ModelRejected,
    inspect_model_folder,
    is_pickled_weight,
)
from workers.compression.shapes import describe_folder, shape_mismatches

log = logging.getLogger("slimformer.models")

HUB_PATTERNS = ["*.json", "*.safetensors", "*.gguf", "tokenizer*", "*.model", "*.txt"]


class ModelUnavailable(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def materialize(model: Model) -> Path:
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
            _extract_upload(model, target)
        elif kind == "hub":
            _download_from_hub(source, target)
        else:
            raise ModelUnavailable("unsupported_model", f"unknown model source {kind!r}")
    return _converted_if_gguf(target, settings.cache_dir / "models" / f"{model.id}-hf")


def _extract_upload(model: Model, target: Path) -> None:
    settings = get_settings()
    if not model.storage_key:
        raise ModelUnavailable("unsupported_model", "the upload is no longer in storage")
    scratch = settings.cache_dir / "incoming" / f"{model.id}.archive"
    get_store().fetch(model.storage_key, scratch)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        names = [
            m.name
            for m in list_members(
                scratch,
                max_members=settings.max_archive_members,
                max_total_bytes=settings.max_extracted_bytes,
            )
        ]
        has_safe_weights = any(n.endswith((".safetensors", ".gguf")) for n in names)
        if not has_safe_weights and any(is_pickled_weight(n) for n in names):
            raise ModelRejected(
                "unsafe_model",
                "the archive has only pickled weights (.bin/.pt), "
                "which can run code when loaded; convert them to safetensors "
                "with save_pretrained(..., safe_serialization=True)",
            )
        extract_archive(
            scratch,
            target,
            max_members=settings.max_archive_members,
            max_total_bytes=settings.max_extracted_bytes,
            skip=is_pickled_weight,
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


def _converted_if_gguf(folder: Path, converted: Path) -> Path:
    ggufs = sorted(folder.glob("*.gguf"))
    if ggufs and not any(folder.glob("*.safetensors")):
        if not converted.is_dir():
            from workers.compression.loading import convert_gguf

            convert_gguf(ggufs[0], converted)
        return converted
    return folder


def validate_model(model_id: str) -> None:
    """The validation task: `validating` -> `ready` (with what was learned) or `rejected` (why)."""
    with session_scope() as session:
        model = session.get(Model, model_id)
        if model is None or model.status != "validating":
            return
    try:
        folder = (
            materialize(model) if model.source.get("type") != "path" else Path(model.source["path"])
        )
        info = inspect_model_folder(folder)
        if info.weight_format == "gguf":  # llama.cpp tensor names: take the shapes from the config
            info.linear_shapes, _ = describe_folder(folder, info.architecture)
        elif wrong := shape_mismatches(folder, info.tensor_shapes):
            raise ModelRejected(
                "unsupported_model",
                f"config.json does not describe these weights ({len(wrong)} tensors differ): "
                + "; ".join(wrong[:3]),
            )
    except Exception as exc:  # noqa: BLE001 - the files are data: any failure reading them rejects
        if not isinstance(exc, ArchiveError | ModelRejected | ModelUnavailable):
            log.exception("validating %s failed unexpectedly", model_id)
            exc = ModelUnavailable("unsupported_model", f"could not read the model: {exc}")
        log.info("model %s rejected: %s", model_id, exc)
        shutil.rmtree(get_settings().cache_dir / "models" / model_id, ignore_errors=True)
        _finish(model_id, status="rejected", error={"code": exc.code, "message": exc.message})
        if model.storage_key:
            get_store().delete(model.storage_key)  # a rejected upload keeps no bytes
            with session_scope() as session:
                session.execute(update(Model).where(Model.id == model_id).values(storage_key=None))
        return
    _finish(model_id, status="ready", info=info)


def _finish(
    model_id: str, *, status: str, info: ModelInfo | None = None, error: dict | None = None
) -> None:
    values: dict = {"status": status, "updated_at": utcnow(), "error": error}
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
