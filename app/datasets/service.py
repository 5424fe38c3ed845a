"""Datasets: text for calibration, training and evaluation. Small enough to check while streaming."""

from __future__ import annotations

import json

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app.datasets.schemas import DatasetOut
from app.db.session import after_commit
from app.db.tables import Dataset, Job, utcnow
from app.errors import APIError, not_found
from app.jobs.lifecycle import LIVE
from app.pagination import page
from app.storage import StoredObject, get_store

FORMATS = ("txt", "jsonl")


class RecordCounter:
    """Fed the upload chunk by chunk; counts records and refuses a malformed JSONL line at once."""

    def __init__(self, fmt: str) -> None:
        self.format = fmt
        self.records = 0
        self._line_number = 0
        self._pending = b""

    def feed(self, chunk: bytes) -> None:
        lines = (self._pending + chunk).split(b"\n")
        self._pending = lines.pop()
        for line in lines:
            self._line(line)

    def finish(self) -> int:
        if self._pending:
            self._line(self._pending)
            self._pending = b""
        if self.records == 0:
            raise APIError("invalid_request", "The dataset has no records", param="file")
        return self.records

    def _line(self, raw: bytes) -> None:
        self._line_number += 1
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise APIError(
                "invalid_request", f"Line {self._line_number} is not UTF-8", param="file"
            ) from None
        if not line:
            return
        if self.format == "jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise APIError(
                    "invalid_request",
                    f"Line {self._line_number} is not JSON: {exc.msg}",
                    param="file",
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise APIError(
                    "invalid_request",
                    f"Line {self._line_number} needs a string 'text' field",
                    param="file",
                )
        self.records += 1


def format_for(filename: str | None, requested: str | None) -> str:
    if requested:
        if requested not in FORMATS:
            raise APIError("invalid_request", f"format must be one of {FORMATS}", param="format")
        return requested
    if filename and filename.lower().endswith((".jsonl", ".ndjson")):
        return "jsonl"
    return "txt"


def dataset_visible_to(*, session: Session, project_id: str, dataset_id: str) -> Dataset | None:
    return session.scalar(
        select(Dataset).where(
            Dataset.id == dataset_id,
            Dataset.deleted_at.is_(None),
            or_(Dataset.project_id == project_id, Dataset.project_id.is_(None)),
        )
    )


def get_dataset(*, session: Session, project_id: str, dataset_id: str) -> Dataset:
    dataset = dataset_visible_to(session=session, project_id=project_id, dataset_id=dataset_id)
    if dataset is None:
        raise not_found("dataset", dataset_id)
    return dataset


def list_datasets(
    *, session: Session, project_id: str, limit: int, after: str | None
) -> tuple[list[Dataset], bool]:
    statement = select(Dataset).where(
        Dataset.deleted_at.is_(None),
        or_(Dataset.project_id == project_id, Dataset.project_id.is_(None)),
    )
    return page(session, statement, id_column=Dataset.id, limit=limit, after=after)


def create_dataset(
    *,
    session: Session,
    project_id: str | None,
    dataset_id: str,
    name: str,
    fmt: str,
    num_records: int,
    stored: StoredObject,
    source: dict,
) -> Dataset:
    dataset = Dataset(
        id=dataset_id,
        project_id=project_id,
        name=name,
        status="ready",
        format=fmt,
        source=source,
        num_records=num_records,
        size_bytes=stored.size_bytes,
        sha256=stored.sha256,
        storage_key=stored.key,
    )
    session.add(dataset)
    session.flush()
    return dataset


def delete_dataset(*, session: Session, dataset: Dataset) -> None:
    if dataset.project_id is None:
        raise APIError("conflict", "Built-in datasets cannot be deleted")
    live = list(
        session.scalars(
            select(Job.id).where(
                Job.status.in_(LIVE),
                or_(
                    Job.calibration["dataset_id"].as_string() == dataset.id,
                    Job.evaluation["dataset_id"].as_string() == dataset.id,
                ),
            )
        )
    )
    if live:
        raise APIError("conflict", f"Dataset is used by live jobs: {', '.join(live[:5])}")
    dataset.deleted_at = utcnow()
    storage_key = dataset.storage_key
    dataset.storage_key = None
    if storage_key:
        after_commit(session, lambda: get_store().delete(storage_key))


def to_out(dataset: Dataset) -> DatasetOut:
    return DatasetOut(
        id=dataset.id,
        name=dataset.name,
        status=dataset.status,
        format=dataset.format,
        num_records=dataset.num_records,
        size_bytes=dataset.size_bytes,
        sha256=dataset.sha256,
        source=dataset.source,
        created_at=dataset.created_at,
    )


def etag(dataset: Dataset) -> str:
    return f'W/"{dataset.id}-{dataset.status}-{dataset.sha256}"'
