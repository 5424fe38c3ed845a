"""Datasets: text for calibration, training and evaluation. Small enough to check while streaming."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from sqlalchemy.orm import Session

from app import quotas
from app.datasets import repository
from app.datasets.schemas import DatasetOut
from app.db.session import after_commit
from app.db.tables import Dataset, utcnow
from app.errors import APIError, not_found
from app.jobs.repository import live_jobs_referencing
from app.pagination import page
from app.settings import get_settings
from app.storage import StoredObject, get_store
from workers.compression.records import FORMATS, RecordError, count_records


def whole_lines(chunks: Iterable[bytes], max_record_bytes: int) -> Iterator[bytes]:
    """The same bytes re-cut to end at a newline, in linear time (one growing buffer, each byte
    looked at once), so the parser never re-joins a long line chunk by chunk. A line longer than
    `max_record_bytes` is a 422 naming it, found after reading at most that many bytes of it."""
    pending = bytearray()
    line = 1  # the line `pending` starts at
    for chunk in chunks:
        cut = chunk.rfind(b"\n")
        if cut < 0:
            pending += chunk
            _check_longest(pending, line, max_record_bytes, whole=False)
            continue
        pending += chunk[: cut + 1]
        _check_longest(pending, line, max_record_bytes, whole=True)
        line += pending.count(b"\n")
        yield bytes(pending)
        pending = bytearray(chunk[cut + 1 :])
        _check_longest(pending, line, max_record_bytes, whole=False)
    if pending:
        yield bytes(pending)


def _check_longest(buffer: bytearray, line: int, limit: int, *, whole: bool) -> None:
    """Every line in `buffer` (the last one unfinished unless `whole`) within `limit` bytes."""
    if len(buffer) <= limit:
        return
    start = 0
    while True:
        end = buffer.find(b"\n", start)
        length = (len(buffer) if end < 0 else end) - start
        if length > limit:
            raise APIError(
                "invalid_request",
                f"Line {line}: longer than the {limit}-byte limit for one record "
                "(SLIMFORMER_MAX_RECORD_BYTES)",
                param="file",
            )
        if end < 0:
            return
        start, line = end + 1, line + 1


def number_of_records(chunks: Iterable[bytes], fmt: str) -> int:
    """Reads an upload once, as it is stored: how many records it holds. A malformed line (the
    same parser the worker reads it with later), a record over `max_record_bytes` or no record at
    all is a 422 naming the file. Blocking: the route runs it in a thread."""
    try:
        records = count_records(whole_lines(chunks, get_settings().max_record_bytes), fmt)
    except RecordError as exc:
        message = f"Line {exc.line}: {exc.reason}" if exc.line is not None else str(exc)
        raise APIError("invalid_request", message, param="file") from None
    if records == 0:
        raise APIError("invalid_request", "The dataset has no records", param="file")
    return records


def format_for(filename: str | None, requested: str | None) -> str:
    if requested:
        if requested not in FORMATS:
            raise APIError("invalid_request", f"format must be one of {FORMATS}", param="format")
        return requested
    if filename and filename.lower().endswith((".jsonl", ".ndjson")):
        return "jsonl"
    return "txt"


def get_dataset(*, session: Session, project_id: str, dataset_id: str) -> Dataset:
    dataset = repository.get_visible(session=session, project_id=project_id, dataset_id=dataset_id)
    if dataset is None:
        raise not_found("dataset", dataset_id)
    return dataset


def list_datasets(
    *, session: Session, project_id: str, limit: int, after: str | None
) -> tuple[list[Dataset], bool]:
    statement = repository.visible(project_id)
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
    if project_id is not None:  # built-ins belong to no project
        quotas.check_storage(session=session, project_id=project_id, adding=stored.size_bytes)
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
    live = live_jobs_referencing(session=session, dataset_id=dataset.id)
    if live:
        raise APIError("conflict", f"Dataset is used by live jobs: {', '.join(live[:5])}")
    dataset.deleted_at = utcnow()
    storage_key = dataset.storage_key
    dataset.storage_key = None
    if storage_key:
        after_commit(session, lambda: get_store().delete(storage_key))


def to_out(dataset: Dataset) -> DatasetOut:
    return DatasetOut.model_validate(dataset)


def etag(dataset: Dataset) -> str:
    return f'W/"{dataset.id}-{dataset.status}-{dataset.sha256}"'
