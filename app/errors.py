"""The error shape: `{"error": {"code", "message", "param"}}` with codes from a stable list."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from workers.compression.recipe import METHOD_NAMES  # validation specs only (DESIGN.md)

log = logging.getLogger(__name__)

# The documented, stable codes. Clients switch on these; never rename one.
ERROR_CODES = {
    "invalid_request": 422,
    "not_found": 404,
    "conflict": 409,
    "unauthorized": 401,
    "payload_too_large": 413,
    "unsupported_model": 422,
    "unsafe_model": 422,
    "rate_limited": 429,
    "quota_exceeded": 409,  # a project limit (app/quotas.py); the body's `error.quota` says which
    "idempotency_mismatch": 409,
    "range_not_satisfiable": 416,
    "method_not_allowed": 405,
    "unavailable": 503,
    "internal_error": 500,
}


class APIError(Exception):
    def __init__(
        self,
        code: str,
        message: str,
        *,
        param: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = headers
        self.extra = extra  # more members of the error object (`quota`)
        self.code = code
        self.message = message
        self.param = param
        self.status = status or ERROR_CODES[code]


def not_found(kind: str, resource_id: str) -> APIError:
    return APIError("not_found", f"No {kind} with id {resource_id!r}", param=None)


def error_body(
    code: str,
    message: str,
    param: str | None = None,
    request_id: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message, "param": param, **(extra or {})}
    if request_id is not None:
        body["request_id"] = request_id
    return {"error": body}


def _request_id(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


# A database that cannot be reached (refused, gone, timed out, out of connections, locked): 503.
RETRY_AFTER_S = 5


SQLITE_UNAVAILABLE = ("unable to open", "database is locked", "disk i/o error", "busy")


def _database_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, (InterfaceError, SQLAlchemyTimeoutError)):
        return True
    if isinstance(exc, OperationalError):
        # SQLite names a missing table an OperationalError too: that one is a bug (500).
        if type(exc.orig).__module__ == "sqlite3":
            return any(text in str(exc.orig).lower() for text in SQLITE_UNAVAILABLE)
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def param_path(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """`("body", "recipe", "stages", 0, "gptq", "bits")` -> `recipe.stages[0].bits`."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "form"):
        parts = parts[1:]
    path = ""
    previous_was_index = False
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
            previous_was_index = True
            continue
        # pydantic names the chosen union member after an index (`stages[0].gptq.bits`): drop it.
        if previous_was_index and isinstance(part, str) and part.islower() and part.isidentifier():
            previous_was_index = False
            if path.endswith("]") and _looks_like_tag(part):
                continue
        previous_was_index = False
        path += f".{part}" if path else str(part)
    return path or None


def _looks_like_tag(part: str) -> bool:
    return part in METHOD_NAMES


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(
            error_body(exc.code, exc.message, exc.param, _request_id(request), exc.extra),
            status_code=exc.status,
            headers=exc.headers,
        )

    async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
        if not _database_unavailable(exc):
            raise exc  # app/middleware.py answers 500 internal_error
        log.warning("database unavailable: %s", exc.__class__.__name__)
        return JSONResponse(
            error_body(
                "unavailable",
                "The database cannot be reached; retry shortly",
                None,
                _request_id(request),
            ),
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

    app.add_exception_handler(DBAPIError, _unavailable)
    app.add_exception_handler(SQLAlchemyTimeoutError, _unavailable)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = param_path(first.get("loc", ()))
        message = first.get("msg", "Invalid request")
        if first.get("type") == "value_error":  # our validators' own words, without pydantic's
            message = message.removeprefix("Value error, ")
        if first.get("type") in ("union_tag_invalid", "union_tag_not_found"):
            # An unknown or missing `method`: name the discriminator field, not the stage.
            param = f"{param}.method" if param else "method"
            problem = "Unknown" if first["type"] == "union_tag_invalid" else "Missing"
            message = f"{problem} method; expected one of: {', '.join(sorted(METHOD_NAMES))}"
        if first.get("type") == "extra_forbidden":
            message = f"Unknown field {param!r}"
        return JSONResponse(
            error_body("invalid_request", message, param, _request_id(request)), status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(
            exc.status_code, "invalid_request"
        )
        # FastAPI answers 400 for a body it cannot decode (not UTF-8, say); the contract's
        # status for a request it cannot accept is 422.
        status = 422 if exc.status_code == 400 else exc.status_code
        return JSONResponse(
            error_body(code, str(exc.detail), None, _request_id(request)),
            status_code=status,
            headers=exc.headers,
        )
