"""The outermost layer of every request (pure ASGI): a request id, input the database must never see
(NUL bytes), and the error envelope for whatever escaped the routes.

- `X-Request-ID`: taken from the request when it is short and printable, otherwise made here; sent back
  on every response and written into every error body as `error.request_id`.
- NUL bytes: in the path the resource cannot exist (404 `not_found`); in a query parameter or a JSON
  string it is refused (422 `invalid_request` naming the parameter). PostgreSQL text cannot hold NUL,
  so these never reach a query.
- `OPTIONS`: 204 with an `Allow` naming every method served at the path (404 when none is).
- An exception no handler took: 500 `internal_error` (logged with the request id); a database that
  cannot be reached: 503 `unavailable` with `Retry-After` (the handler is in `app/errors.py`).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import secrets
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, unquote

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_body

log = logging.getLogger("app.errors")

REQUEST_ID_HEADER = "x-request-id"
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MAX_JSON_SCAN_BYTES = 16 * 1024 * 1024  # JSON bodies are small; larger ones are not scanned here


# Unique, not secret: a random prefix per process and a counter (a fresh token_hex per request read
# the system's random source on every request, a noticeable part of a cached read).
_ID_PREFIX = secrets.token_hex(6)
_ID_COUNTER = itertools.count()


def new_request_id() -> str:
    return f"req_{_ID_PREFIX}{next(_ID_COUNTER) % 16**12:012x}"


def request_id_of(scope: Scope) -> str | None:
    return scope.get("state", {}).get("request_id")


def _nul_path(value: Any, path: str = "") -> str | None:
    """The JSON path of the first string (or key) holding a NUL byte, or None."""
    if isinstance(value, str):
        return path or "body" if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            child = f"{path}.{key}" if path else str(key)
            if "\x00" in str(key):
                return child
            found = _nul_path(item, child)
            if found:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _nul_path(item, f"{path}[{index}]")
            if found:
                return found
    return None


class HttpLayer:
    """A pure ASGI layer over HTTP requests; anything else (lifespan) passes straight through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


def on_response_start(send: Send, hook: Callable[[Message], Message]) -> Send:
    """`send`, with `hook` seeing (and possibly rewriting) the response's start message."""

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = hook(message)
        await send(message)

    return wrapped


class RequestContext(HttpLayer):
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        incoming = (
            dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        )
        request_id = incoming if _SANE_ID.match(incoming) else new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        def with_id(message: Message) -> Message:
            nonlocal started
            started = True
            headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
            headers.append((b"x-request-id", request_id.encode()))
            return {**message, "headers": headers}

        send_with_id = on_response_start(send, with_id)

        refusal = _refuse_nul_in_url(scope)
        if refusal is not None:
            await _send_error(send_with_id, request_id, *refusal)
            return
        if scope.get("method") == "OPTIONS":
            allowed = _allowed_methods(scope)
            if allowed:
                await send_with_id(
                    {
                        "type": "http.response.start",
                        "status": 204,
                        "headers": [(b"allow", ", ".join(allowed).encode())],
                    }
                )
                await send_with_id({"type": "http.response.body", "body": b""})
                return
        # Only a method served at the path: any other is the router's 405, whatever its body.
        if _is_json_body(scope) and scope["method"] in _allowed_methods(scope):
            body, receive = await _buffer(receive)
            param = _nul_in_json(body)
            if param is not None:
                await _send_error(
                    send_with_id,
                    request_id,
                    422,
                    "invalid_request",
                    "Strings may not contain NUL (\\u0000) characters",
                    param,
                )
                return
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error (request_id=%s)", request_id)
            if started:
                raise
            await _send_error(
                send_with_id,
                request_id,
                500,
                "internal_error",
                f"Internal error; quote request id {request_id} when reporting it",
                None,
            )


def _allowed_methods(scope: Scope) -> list[str]:
    """Every method the contract (the OpenAPI document) serves at this path, for `Allow`."""
    app = scope.get("app")
    if app is None or not hasattr(app, "openapi"):
        return []
    table = getattr(app.state, "allow_table", None)
    if table is None:
        table = []
        for template, operations in app.openapi().get("paths", {}).items():
            pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
            methods = {method.upper() for method in operations if method != "parameters"}
            table.append((re.compile(f"^{pattern}$"), methods))
        app.state.allow_table = table
    path = scope.get("path", "")
    methods: set[str] = set()
    for pattern, served in table:
        if pattern.match(path):
            methods |= served
    return sorted(methods | {"OPTIONS"}) if methods else []


def _refuse_nul_in_url(scope: Scope) -> tuple[int, str, str, str | None] | None:
    raw_path = scope.get("raw_path") or scope.get("path", "").encode()
    if "\x00" in scope.get("path", "") or b"%00" in raw_path:
        return 404, "not_found", "No resource at this path (it contains a NUL byte)", None
    query = scope.get("query_string", b"").decode("latin-1")
    if "%00" in query or "\x00" in query:
        for key, value in parse_qsl(query, keep_blank_values=True):
            if "\x00" in key or "\x00" in value:
                name = unquote(key).replace("\x00", "")
                return 422, "invalid_request", "Query parameters may not contain NUL bytes", name
        return 422, "invalid_request", "Query parameters may not contain NUL bytes", None
    return None


def _is_json_body(scope: Scope) -> bool:
    if scope.get("method") not in ("POST", "PUT", "PATCH"):
        return False
    headers = dict(scope.get("headers") or [])
    content_type = headers.get(b"content-type", b"").decode("latin-1").lower()
    if "json" not in content_type:
        return False
    length = headers.get(b"content-length", b"0")
    return not length.isdigit() or int(length) <= MAX_JSON_SCAN_BYTES


async def _buffer(receive: Receive) -> tuple[bytes, Receive]:
    """Read the whole body, and give back a `receive` that replays it."""
    chunks = []
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"".join(chunks)
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


def _nul_in_json(body: bytes) -> str | None:
    if b"\\u0000" not in body.lower() and b"\x00" not in body:
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None  # not JSON: the route's own parsing answers 422
    return _nul_path(value)


async def _send_error(
    send: Send, request_id: str, status: int, code: str, message: str, param: str | None
) -> None:
    body = error_body(code, message, param)
    body["error"]["request_id"] = request_id
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
