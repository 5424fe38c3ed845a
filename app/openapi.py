"""The OpenAPI document as the contract: the real error envelope on every documented error status,
the schemas the routes reference by hand (`ModelRegister`), and the right content types."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.models.schemas import ModelRegister

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "param"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "request_id": {"type": "string"},
                "quota": {  # quota_exceeded only: which project limit, and the usage now
                    "type": "object",
                    "required": ["name", "limit", "usage"],
                    "properties": {
                        "name": {"type": "string", "enum": ["live_jobs", "stored_bytes"]},
                        "limit": {"type": "integer"},
                        "usage": {"type": "integer"},
                    },
                },
            },
        }
    },
}
ERROR_REF = {"$ref": "#/components/schemas/Error"}
DESCRIPTIONS = {
    "304": "Not modified (If-None-Match matched the ETag)",
    "401": "Missing or invalid API key",
    "404": "No such resource in this project",
    "409": "Conflict with the resource's or the project's state (`quota_exceeded`: a project limit)",
    "413": "Upload larger than the limit",
    "416": "Range not satisfiable (Content-Range: bytes */size)",
    "422": "Invalid request",
    "429": "Rate limited (per API key); retry after Retry-After seconds",
    "500": "Internal error (quote the request id)",
    "503": "Database unreachable; retry after Retry-After seconds",
}


def _statuses(path: str, method: str) -> set[str]:
    statuses = {"422", "500", "503"}
    if not path.startswith("/v1/"):
        return {"503"} if path == "/readyz" else set()
    statuses |= {"401", "429"}
    if "{" in path or (method == "post" and path == "/v1/jobs"):
        statuses.add("404")  # the resource, or a model or dataset the job names
    if method == "delete" or path.endswith(("/cancel", "/retry")):
        statuses.add("409")
    if method == "post" and path in ("/v1/jobs", "/v1/models", "/v1/datasets"):
        statuses.add("409")  # an Idempotency-Key reused with another body; a project quota
    if method == "post" and path in ("/v1/models", "/v1/datasets"):
        statuses.add("413")
    if method == "get" and "{" in path and not path.endswith(("/events", "/artifacts")):
        statuses.add("304")
    return statuses


def build(app: FastAPI) -> dict[str, Any]:
    doc = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    register = ModelRegister.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in register.pop("$defs", {}).items():
        schemas.setdefault(name, definition)
    schemas["ModelRegister"] = register
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            for status in _statuses(path, method) | ({"416"} if "416" in responses else set()):
                if status == "304":
                    responses[status] = {"description": DESCRIPTIONS[status]}
                    continue
                entry = {
                    "description": DESCRIPTIONS[status],
                    "content": {"application/json": {"schema": ERROR_REF}},
                }
                if status in ("503", "429"):
                    entry["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
                if status == "416":
                    entry["headers"] = {"Content-Range": {"schema": {"type": "string"}}}
                if path == "/readyz" and status == "503":
                    entry = {"description": "Not ready", "content": responses["200"]["content"]}
                responses[status] = entry
            if path == "/metrics":
                responses["200"] = {
                    "description": "Prometheus text exposition",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
                responses["401"] = {
                    "description": DESCRIPTIONS["401"],
                    "content": {"application/json": {"schema": ERROR_REF}},
                }
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return doc


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
