"""The error shape: `{"error": {"code", "message", "param"}}` with codes from a stable list."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from workers.compression.recipe import METHOD_NAMES  # validation specs only (DESIGN.md)

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
    "idempotency_mismatch": 409,
    "range_not_satisfiable": 416,
    "method_not_allowed": 405,
    "unavailable": 503,
    "internal_error": 500,
}


class APIError(Exception):
    def __init__(
        self, code: str, message: str, *, param: str | None = None, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.status = status or ERROR_CODES[code]


def not_found(kind: str, resource_id: str) -> APIError:
    return APIError("not_found", f"No {kind} with id {resource_id!r}", param=None)


def error_body(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "param": param}}


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
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message, exc.param), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
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
        return JSONResponse(error_body("invalid_request", message, param), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(
            exc.status_code, "invalid_request"
        )
        return JSONResponse(
            error_body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers
        )
