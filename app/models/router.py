from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from pydantic import ValidationError

from app.auth import CallerDep, SessionDep
from app.db.tables import Model
from app.errors import APIError, param_path
from app.idempotency import remember, replay_upload, replaying, request_hash
from app.ids import new_id
from app.models import service
from app.models.schemas import ModelList, ModelOut, ModelRegister
from app.responses import resource_response
from app.settings import get_settings
from app.storage import get_store
from app.uploads import receive_upload, upload_room

router = APIRouter(prefix="/v1/models", tags=["models"])
ENDPOINT = "POST /v1/models"


@router.post(
    "",
    status_code=201,
    response_model=ModelOut,
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
                        },
                    }
                },
                "application/json": {"schema": {"$ref": "#/components/schemas/ModelRegister"}},
            }
        }
    },
)
async def create_model(
    request: Request,
    caller: CallerDep,
    session: SessionDep,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Response:
    """Upload a model archive (multipart `file` + `name`) or register one by path or hub repo."""
    model_id = new_id("mdl")
    spec, upload = None, None
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            spec = ModelRegister.model_validate_json(await request.body())
        except ValueError as exc:
            raise _validation_error(exc) from exc
        body_hash = request_hash(spec.model_dump(mode="json"))
    else:
        upload = await receive_upload(
            request,
            key=f"models/{model_id}/upload",
            max_bytes=get_settings().max_upload_bytes,
            room=await upload_room(session, caller.project_id, idempotency_key),
        )
        name = (upload.fields.get("name") or upload.filename or model_id).strip()[:200]
        body_hash = request_hash({"name": name, "sha256": upload.stored.sha256})
    existing = replay_upload(
        session,
        project_id=caller.project_id,
        endpoint=ENDPOINT,
        key=idempotency_key,
        body_hash=body_hash,
        upload_key=upload.stored.key if upload else None,
    )
    if existing:
        with replaying(existing):
            model = service.get_model(
                session=session, project_id=caller.project_id, model_id=existing
            )
        return _created(request, model)
    if spec is not None:
        model = service.register(
            session=session, project_id=caller.project_id, model_id=model_id, spec=spec
        )
    else:
        try:
            model = service.create_uploaded(
                session=session,
                project_id=caller.project_id,
                model_id=model_id,
                name=name,
                filename=upload.filename,
                stored=upload.stored,
            )
        except APIError:
            get_store().delete(upload.stored.key)
            raise
    remember(
        session,
        project_id=caller.project_id,
        endpoint=ENDPOINT,
        key=idempotency_key,
        body_hash=body_hash,
        resource_id=model.id,
    )
    return _created(request, model)


def _created(request: Request, model: Model) -> Response:
    return resource_response(
        request,
        service.to_out(model),
        etag=service.etag(model),
        status_code=201,
        headers={"Location": f"/v1/models/{model.id}"},
    )


def _validation_error(exc: ValueError) -> APIError:
    if isinstance(exc, ValidationError) and exc.errors():
        first = exc.errors()[0]
        return APIError("invalid_request", first["msg"], param=param_path(first["loc"]))
    return APIError("invalid_request", str(exc))


@router.get("", response_model=ModelList)
def list_models(
    caller: CallerDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> ModelList:
    rows, has_more = service.list_models(
        session=session, project_id=caller.project_id, limit=limit, after=after
    )
    return ModelList(data=[service.to_out(row) for row in rows], has_more=has_more)


@router.get("/{model_id}", response_model=ModelOut)
def get_model(model_id: str, request: Request, caller: CallerDep, session: SessionDep) -> Response:
    model = service.get_model(session=session, project_id=caller.project_id, model_id=model_id)
    return resource_response(request, service.to_out(model), etag=service.etag(model))


@router.delete("/{model_id}", status_code=204)
def delete_model(model_id: str, caller: CallerDep, session: SessionDep) -> Response:
    model = service.get_model(session=session, project_id=caller.project_id, model_id=model_id)
    service.delete_model(session=session, model=model)
    return Response(status_code=204)
