"""Streaming multipart uploads: the file part goes straight to storage, chunk by chunk, under a size
limit; it is never held whole in memory or spooled to a temporary file first."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app import quotas
from app.db.session import release_connection
from app.errors import APIError
from app.quotas import Room
from app.storage import StoredObject, TooLarge, get_store

FIELD_LIMIT = 64 * 1024  # text form fields (name, format) are small

T = TypeVar("T")


@dataclass
class Upload:
    stored: StoredObject
    filename: str | None
    fields: dict[str, str] = field(default_factory=dict)


async def upload_room(
    session: Session, project_id: str, idempotency_key: str | None
) -> Room | None:
    """The project's byte quota before an upload streams (refused at once when full). None
    without a quota, or with an Idempotency-Key: a replay of an upload that filled the quota must
    still be answered; the check after the upload (in the insert's transaction) covers it."""
    if idempotency_key is not None:
        return None

    def room() -> Room | None:
        try:
            return quotas.upload_room(session=session, project_id=project_id)
        finally:
            release_connection(session)  # no pooled connection held while the body streams

    return await run_in_threadpool(room)


async def receive_upload(
    request: Request,
    *,
    key: str,
    max_bytes: int,
    room: Room | None = None,
) -> Upload:
    """Parse `multipart/form-data` from the request body; the part named `file` is written to `key`.
    Raises APIError 413 (nothing stored) past `max_bytes`, 409 `quota_exceeded` past the project's
    `room`, 422 on a malformed body or no file."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in options:
        raise APIError(
            "invalid_request",
            "Send the model as multipart/form-data with a 'file' part",
            param="file",
        )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + FIELD_LIMIT:
        raise APIError("payload_too_large", f"Upload is larger than the limit of {max_bytes} bytes")
    quota_binds = room is not None and room.bytes < max_bytes
    if quota_binds and declared and declared.isdigit() and int(declared) > room.bytes + FIELD_LIMIT:
        raise room.error()

    store = get_store()
    fields: dict[str, str] = {}
    state: dict = {
        "headers": {},
        "name": None,
        "filename": None,
        "buffer": bytearray(),
        "writer": None,
        "file_seen": False,
        "header_field": b"",
        "header_value": b"",
    }

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["header_field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["header_value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["header_field"].lower()] = state["header_value"]
        state["header_field"], state["header_value"] = b"", b""

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(state["headers"].get(b"content-disposition", b""))
        state["name"] = disposition.get(b"name", b"").decode("utf-8", "replace")
        filename = disposition.get(b"filename")
        state["filename"] = filename.decode("utf-8", "replace") if filename is not None else None
        if state["name"] == "file":
            if state["file_seen"]:
                raise APIError("invalid_request", "Only one 'file' part is allowed", param="file")
            state["file_seen"] = True
            state["writer"] = writer

    def on_part_data(data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if state["name"] == "file":
            writer.write(chunk)
        else:
            state["buffer"] += chunk
            if len(state["buffer"]) > FIELD_LIMIT:
                raise APIError("payload_too_large", f"Form field {state['name']!r} is too long")

    def on_part_end() -> None:
        if state["name"] == "file":
            fields["__filename__"] = state["filename"] or ""
        elif state["name"]:
            fields[state["name"]] = state["buffer"].decode("utf-8", "replace")
        state["buffer"] = bytearray()
        state["headers"] = {}
        state["name"] = None

    parser = MultipartParser(
        options[b"boundary"],
        callbacks={
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        async with _opened_in_thread(
            store.writer(key, max_bytes=room.bytes if quota_binds else max_bytes)
        ) as writer:
            async for chunk in request.stream():
                parser.write(chunk)
            parser.finalize()
            if not state["file_seen"]:
                raise APIError("invalid_request", "The form has no 'file' part", param="file")
    except TooLarge:
        if quota_binds:
            raise room.error() from None
        raise APIError(
            "payload_too_large", f"Upload is larger than the limit of {max_bytes} bytes"
        ) from None
    except APIError:
        raise
    except Exception as exc:  # a malformed multipart body
        raise APIError("invalid_request", f"Malformed multipart body: {exc}", param="file") from exc
    assert writer.result is not None
    filename = fields.pop("__filename__", None) or None
    return Upload(stored=writer.result, filename=filename, fields=fields)


@asynccontextmanager
async def _opened_in_thread(manager: AbstractContextManager[T]) -> AsyncIterator[T]:
    """Enter and leave a store's writer off the event loop: finishing one is an fsync on disk and a
    CompleteMultipartUpload (or an abort) on S3, seconds for a large object, during which every
    other request of this process would wait. Leaving is shielded: a cancelled request still
    aborts its upload."""
    value = await run_in_threadpool(manager.__enter__)
    try:
        yield value
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            suppressed = await run_in_threadpool(
                manager.__exit__, type(exc), exc, exc.__traceback__
            )
        if not suppressed:
            raise
    else:
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(manager.__exit__, None, None, None)
