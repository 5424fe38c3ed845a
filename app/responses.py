"""Responses for single resources: ETag and If-None-Match (304)."""

from __future__ import annotations

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict


class RowOut(BaseModel):
    """A resource as responses return it, read from its table row: `ModelOut.model_validate(row)`."""

    model_config = ConfigDict(from_attributes=True)


def resource_response(
    request: Request,
    resource: BaseModel,
    *,
    etag: str,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
) -> Response:
    headers = {"ETag": etag, **(headers or {})}
    if status_code == 200 and not_modified(request, etag):
        return Response(status_code=304, headers=headers)
    return JSONResponse(resource.model_dump(mode="json"), status_code=status_code, headers=headers)


def not_modified(request: Request, etag: str) -> bool:
    return etag in _candidates(request.headers.get("if-none-match", ""))


def json_response(
    resource: BaseModel,
    *,
    etag: str,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
) -> Response:
    """A resource serialised by pydantic in one step (the same JSON as `resource_response`
    writes), without the If-None-Match check (a 200 on a hot read that checked it already, or a
    creation's 202)."""
    return Response(
        resource.model_dump_json().encode(),
        status_code=status_code,
        media_type="application/json",
        headers={"ETag": etag, **(headers or {})},
    )


def _candidates(header: str) -> set[str]:
    values = {value.strip() for value in header.split(",") if value.strip()}
    # Weak comparison (RFC 9110): W/"x" matches "x".
    return values | {value.removeprefix("W/") for value in values} | {f"W/{v}" for v in values}
