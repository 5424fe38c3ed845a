from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from app.auth import CallerDep, SessionDep
from app.datasets import service
from app.datasets.schemas import DatasetList, DatasetOut
from app.db.tables import Dataset
from app.errors import APIError
from app.idempotency import remember, replay_upload, replaying, request_hash
from app.ids import new_id
from app.responses import resource_response
from app.settings import get_settings
from app.storage import CHUNK, Store, get_store
from app.uploads import receive_upload, upload_room

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
ENDPOINT = "POST /v1/datasets"


@router.post(
    "",
    status_code=201,
    response_model=DatasetOut,
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "name": {"type": "string"},
                            "format": {"type": "string", "enum": list(service.FORMATS)},
                        },
                    }
                }
            }
        }
    },
)
async def create_dataset(
    request: Request,
    caller: CallerDep,
    session: SessionDep,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Response:
    """Upload `.txt` (one record per line) or `.jsonl` (`{"text": …, "label"?: …}`) text."""
    dataset_id = new_id("dset")
    store = get_store()
    upload = await receive_upload(
        request,
        key=f"datasets/{dataset_id}/data",
        max_bytes=get_settings().max_upload_bytes,
        room=await upload_room(session, caller.project_id, idempotency_key),
    )
    try:
        fmt = service.format_for(upload.filename, upload.fields.get("format"))
        num_records = await run_in_threadpool(_count, store, upload.stored.key, fmt)
        name = (upload.fields.get("name") or upload.filename or dataset_id).strip()[:200]
        body_hash = request_hash({"name": name, "format": fmt, "sha256": upload.stored.sha256})
        existing = replay_upload(
            session,
            project_id=caller.project_id,
            endpoint=ENDPOINT,
            key=idempotency_key,
            body_hash=body_hash,
            upload_key=upload.stored.key,
        )
    except APIError:
        store.delete(upload.stored.key)
        raise
    if existing:
        with replaying(existing):
            dataset = service.get_dataset(
                session=session, project_id=caller.project_id, dataset_id=existing
            )
        return _created(request, dataset)
    try:
        dataset = service.create_dataset(
            session=session,
            project_id=caller.project_id,
            dataset_id=dataset_id,
            name=name,
            fmt=fmt,
            num_records=num_records,
            stored=upload.stored,
            source={"type": "upload", "filename": upload.filename},
        )
    except APIError:  # over the project's byte quota
        store.delete(upload.stored.key)
        raise
    remember(
        session,
        project_id=caller.project_id,
        endpoint=ENDPOINT,
        key=idempotency_key,
        body_hash=body_hash,
        resource_id=dataset.id,
    )
    return _created(request, dataset)


def _count(store: Store, key: str, fmt: str) -> int:
    """Off the event loop: a long or hostile file must not stall other requests."""
    with store.open(key) as handle:
        return service.number_of_records(iter(lambda: handle.read(CHUNK), b""), fmt)


def _created(request: Request, dataset: Dataset) -> Response:
    return resource_response(
        request,
        service.to_out(dataset),
        etag=service.etag(dataset),
        status_code=201,
        headers={"Location": f"/v1/datasets/{dataset.id}"},
    )


@router.get("", response_model=DatasetList)
def list_datasets(
    caller: CallerDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> DatasetList:
    rows, has_more = service.list_datasets(
        session=session, project_id=caller.project_id, limit=limit, after=after
    )
    return DatasetList(data=[service.to_out(row) for row in rows], has_more=has_more)


@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(
    dataset_id: str, request: Request, caller: CallerDep, session: SessionDep
) -> Response:
    dataset = service.get_dataset(
        session=session, project_id=caller.project_id, dataset_id=dataset_id
    )
    return resource_response(request, service.to_out(dataset), etag=service.etag(dataset))


@router.delete("/{dataset_id}", status_code=204)
def delete_dataset(dataset_id: str, caller: CallerDep, session: SessionDep) -> Response:
    dataset = service.get_dataset(
        session=session, project_id=caller.project_id, dataset_id=dataset_id
    )
    service.delete_dataset(session=session, dataset=dataset)
    return Response(status_code=204)
