"""The Python SDK of the Slimformer HTTP API (`/v1`, see API.md). Needs httpx and pydantic only:
importing it loads neither torch nor the service.

    from slimformer.client import Client

    with Client("http://127.0.0.1:8000", api_key="sk_…") as slim:
        model_id = slim.models.find("all-MiniLM-L6-v2").id
        job = slim.jobs.create(model_id=model_id, recipe={"stages": [{"method": "dynamic_int8"}]})
        for event in slim.jobs.events(job.id):
            print(event.type, event.message)
        job = slim.jobs.wait(job.id)
        path = slim.download(job.artifact_ids[0], "out/")  # sha256-verified

Create calls carry an `Idempotency-Key` (made here unless given), so they are retried safely;
429 and 503 answers are retried after their `Retry-After`, connection failures with exponential
backoff and jitter. Every failure is a `SlimformerError` carrying the API's error envelope.
`AsyncClient` has the same resources with `async` methods.
"""

from __future__ import annotations

import asyncio
import email.message
import email.utils
import hashlib
import json
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Generic, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict

__all__ = [
    "Artifact",
    "AsyncClient",
    "Client",
    "Dataset",
    "Job",
    "JobEvent",
    "Model",
    "Page",
    "SSEDecoder",
    "SSEEvent",
    "ServiceUnreachable",
    "SlimformerError",
    "WebhookEndpoint",
]

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
CHUNK = 1024 * 1024
RETRY_STATUSES = frozenset({429, 503})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})

# --- Errors -------------------------------------------------------------------------------------


class SlimformerError(Exception):
    """Every failure the SDK reports. For an API answer: its HTTP `status` and the error envelope
    (`code`, `message`, `param`, `request_id`); for a local failure (unreachable service, checksum
    mismatch) `status` is None and `code` names it."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        param: str | None = None,
        request_id: str | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.param = param
        self.request_id = request_id
        self.body = body

    @classmethod
    def from_response(cls, response: httpx.Response) -> SlimformerError:
        request_id = response.headers.get("x-request-id")
        try:
            body = response.json()
            error = body["error"]
            return cls(
                str(error["code"]),
                str(error["message"]),
                status=response.status_code,
                param=error.get("param"),
                request_id=error.get("request_id") or request_id,
                body=body,
            )
        except (ValueError, KeyError, TypeError):
            text = response.text.strip()[:200] or response.reason_phrase
            return cls(
                f"http_{response.status_code}",
                text,
                status=response.status_code,
                request_id=request_id,
            )


class ServiceUnreachable(SlimformerError):
    """The service did not answer (connection refused, reset, timed out), after the retries."""

    def __init__(self, url: str, reason: Exception) -> None:
        if isinstance(reason, httpx.ConnectError | httpx.ConnectTimeout):
            message = (
                f"the Slimformer service isn't running at {url} ({reason}); start it with "
                "`slimformer serve`, or point --url / SLIMFORMER_URL at it"
            )
        else:
            message = f"lost the connection to the Slimformer service at {url} ({reason})"
        super().__init__("service_unreachable", message)


# --- Resources ----------------------------------------------------------------------------------


class Resource(BaseModel):
    """A resource as the API sends it; fields this SDK does not know yet are kept."""

    model_config = ConfigDict(extra="allow")

    def to_dict(self) -> dict[str, Any]:
        """The JSON the server sent (fields it left out stay out)."""
        return self.model_dump(mode="json", exclude_unset=True)


class ApiErrorInfo(Resource):
    code: str | None = None
    message: str | None = None
    retryable: bool | None = None


class Progress(Resource):
    stage: str | None = None
    stage_index: int | None = None
    num_stages: int | None = None
    step: int | None = None
    total_steps: int | None = None
    fraction: float | None = None
    eta_s: float | None = None
    message: str | None = None
    updated_at: datetime | None = None
    label: str | None = None  # "stage 1 of 2 · gptq · block 12/30"
    recipe_stage_index: int | None = None
    recipe_num_stages: int | None = None
    elapsed_s: float | None = None


class Job(Resource):
    id: str
    object: str = "job"
    status: str
    model_id: str | None = None
    recipe: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    targets: dict[str, Any] | None = None
    export: dict[str, Any] | None = None
    resources: dict[str, Any] | None = None
    priority: int | None = None
    metadata: dict[str, Any] | None = None
    progress: Progress | None = None
    metrics: dict[str, Any] | None = None
    error: ApiErrorInfo | None = None
    webhook: dict[str, Any] | None = None
    attempt: int | None = None
    max_attempts: int | None = None
    artifact_ids: list[str] = []
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


class Model(Resource):
    id: str
    object: str = "model"
    name: str | None = None
    status: str | None = None
    architecture: str | None = None
    task: str | None = None
    parameters: int | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    source: dict[str, Any] | None = None
    error: ApiErrorInfo | None = None
    created_at: datetime | None = None


class Dataset(Resource):
    id: str
    object: str = "dataset"
    name: str | None = None
    status: str | None = None
    format: str | None = None
    num_records: int | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    source: dict[str, Any] | None = None
    created_at: datetime | None = None


class Artifact(Resource):
    id: str
    object: str = "artifact"
    job_id: str | None = None
    kind: str | None = None
    format: str | None = None
    filename: str | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    created_at: datetime | None = None


class JobEvent(Resource):
    seq: int
    type: str
    level: str = "info"
    message: str = ""
    data: Any = None
    created_at: datetime | None = None


class WebhookEndpoint(Resource):
    id: str
    object: str = "webhook_endpoint"
    url: str
    events: list[str] = []
    description: str | None = None
    status: str | None = None
    disabled_reason: str | None = None
    secret: str | None = None  # only in the creation and rotate-secret answers
    created_at: datetime | None = None
    updated_at: datetime | None = None


class Worker(Resource):
    id: str
    object: str = "worker"
    hostname: str | None = None
    device: str | None = None
    status: str | None = None
    current_job_id: str | None = None


T = TypeVar("T", bound=Resource)
R = TypeVar("R")


class Page(BaseModel, Generic[T]):
    """One page of a list: `data` newest first; `has_more` says whether `after=data[-1].id` (or
    the last event's seq) gives more."""

    model_config = ConfigDict(extra="allow")
    object: str = "list"
    data: list[T]
    has_more: bool = False


# --- Server-Sent Events -------------------------------------------------------------------------


@dataclass(frozen=True)
class SSEEvent:
    data: str
    event: str = "message"
    id: str | None = None


class SSEDecoder:
    """The event-stream interpretation of the WHATWG HTML spec, one line at a time.

    `last_event_id` only moves when an event is dispatched (at its blank line), so a connection
    that drops in the middle of an event resumes *before* it and the event is sent again whole.
    """

    def __init__(self, last_event_id: str | None = None) -> None:
        self.last_event_id = last_event_id
        self.retry_ms: int | None = None
        self._id_buffer = last_event_id
        self._data: list[str] = []
        self._event = ""

    def feed(self, line: str) -> SSEEvent | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment: servers send them as keep-alives
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id" and "\0" not in value:
            self._id_buffer = value
        elif field == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None

    def feed_all(self, lines: Iterable[str]) -> Iterator[SSEEvent]:
        for line in lines:
            event = self.feed(line)
            if event is not None:
                yield event

    def reset_partial(self) -> None:
        """Forget a half-received event (its connection died)."""
        self._data, self._event, self._id_buffer = [], "", self.last_event_id

    def _dispatch(self) -> SSEEvent | None:
        self.last_event_id = self._id_buffer
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return SSEEvent(data="\n".join(data), event=event or "message", id=self.last_event_id)


def job_event(event: SSEEvent) -> JobEvent:
    """The job event an SSE message carries (`{seq, type, level, message, data, created_at}`), or,
    for a bare payload, one made from the SSE fields."""
    try:
        payload = json.loads(event.data)
    except ValueError:
        payload = event.data
    if isinstance(payload, dict) and "type" in payload and "seq" in payload:
        return JobEvent.model_validate(payload)
    seq = int(event.id) if event.id and event.id.isdigit() else 0
    return JobEvent(
        seq=seq,
        type=event.event,
        message=payload if isinstance(payload, str) else "",
        data=payload if isinstance(payload, dict) else None,
    )


# --- Downloads: names and checksums -------------------------------------------------------------


def etag_sha256(value: str | None) -> str | None:
    """The sha256 an ETag carries (`"…"`, `W/"…"`, `"sha256:…"`), or None if it carries none."""
    if not value:
        return None
    value = value.removeprefix("W/").strip('"').removeprefix("sha256:").lower()
    if len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value
    return None


def disposition_filename(value: str | None) -> str | None:
    if not value:
        return None
    message = email.message.Message()
    message["content-disposition"] = value
    return safe_filename(message.get_filename())


def safe_filename(name: str | None) -> str | None:
    """The last component of a server-given name: it must not choose where the file goes."""
    name = PurePosixPath(name.replace("\\", "/")).name if name else None
    return name if name and name not in (".", "..") else None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _range_start(response: httpx.Response) -> int | None:
    """`Content-Range: bytes 100-199/200` → 100."""
    value = response.headers.get("content-range", "")
    unit, _, spec = value.partition(" ")
    start = spec.split("-", 1)[0]
    return int(start) if unit == "bytes" and start.isdigit() else None


def _range_total(response: httpx.Response) -> int | None:
    total = response.headers.get("content-range", "").rpartition("/")[2]
    if total.isdigit():
        return int(total)
    length = response.headers.get("content-length", "")
    return int(length) if length.isdigit() else None


ProgressCallback = Callable[[int, int | None], None]
"""Called with (bytes written so far, total bytes or None) as a download goes."""


def _download_target(
    path: Path, response: httpx.Response, artifact_id: str, filename: str | None
) -> Path:
    if path.is_dir():
        name = (
            safe_filename(filename)
            or disposition_filename(response.headers.get("content-disposition"))
            or artifact_id
        )
        return path / name
    return path


def _destination(path: str | os.PathLike[str]) -> Path:
    """A path ending in a separator names a folder (made if missing), as does an existing one."""
    text = os.fspath(path)
    folder = Path(text)
    if text.endswith(("/", os.sep)):
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def _partial_for(path: Path, artifact_id: str) -> Path:
    folder = path if path.is_dir() else path.parent
    return folder / f".{artifact_id}.part"


def _checksum_error(artifact_id: str, got: str, expected: str, what: str) -> SlimformerError:
    return SlimformerError(
        "checksum_mismatch", f"{artifact_id}: {what} sha256 {got}, expected {expected}"
    )


# --- Retries ------------------------------------------------------------------------------------


def retry_after_s(response: httpx.Response) -> float | None:
    """`Retry-After` as seconds (a number or an HTTP date), None when absent or unreadable."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


@dataclass(frozen=True)
class RetryPolicy:
    """Up to `max_retries` more tries of a request answered 429/503 (after its `Retry-After`,
    capped at `max_delay_s`) or failing to connect; a request that may have reached the server
    (a read failed) is retried only when repeating it is safe: GET/DELETE, or a POST with an
    `Idempotency-Key`. Without `Retry-After` the delay is exponential with jitter: between half
    and all of `backoff_s * 2**n`, capped at `max_delay_s`."""

    max_retries: int = 3
    backoff_s: float = 0.5
    max_delay_s: float = 30.0

    def delay(self, retry: int, response: httpx.Response | None = None) -> float:
        if response is not None:
            after = retry_after_s(response)
            if after is not None:
                return min(after, self.max_delay_s)
        ceiling = min(self.max_delay_s, self.backoff_s * 2**retry)
        return random.uniform(ceiling / 2, ceiling)

    @staticmethod
    def safe_to_repeat(method: str, headers: Mapping[str, str]) -> bool:
        return method.upper() in IDEMPOTENT_METHODS or any(
            k.lower() == "idempotency-key" for k in headers
        )

    def retry_on_error(self, exc: httpx.TransportError, safe: bool) -> bool:
        return (
            isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
            or (safe and isinstance(exc, httpx.TimeoutException | httpx.NetworkError))
            or (safe and isinstance(exc, httpx.RemoteProtocolError))
        )


# --- The request shape shared by both clients ---------------------------------------------------


def _clean(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


def _create_headers(idempotency_key: str | None) -> dict[str, str]:
    return {"Idempotency-Key": idempotency_key or f"sdk-{uuid.uuid4()}"}


def _upload_parts(
    file: str | os.PathLike[str], fields: Mapping[str, Any]
) -> tuple[dict[str, str], Path]:
    path = Path(file)
    return {k: str(v) for k, v in fields.items() if v is not None}, path


def _job_body(body: Mapping[str, Any] | None, fields: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(body or {})
    merged.update(_clean(fields))
    return merged


def _stream_headers(last_event_id: str | None) -> dict[str, str]:
    headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    return headers


class _Settings:
    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        timeout: float,
        retry: RetryPolicy | None,
        user_agent: str,
    ) -> None:
        self.base_url = (base_url or os.environ.get("SLIMFORMER_URL") or DEFAULT_URL).rstrip("/")
        api_key = api_key if api_key is not None else os.environ.get("SLIMFORMER_API_KEY")
        self.headers = {"User-Agent": user_agent}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        # Streams may sit quiet between events; a read timeout well above the SSE keep-alive
        # interval makes a silently dead server show up as a reconnect instead of a hang.
        self.timeout = httpx.Timeout(timeout, read=max(timeout, 120.0))
        self.retry = retry or RetryPolicy()


# --- The synchronous client ---------------------------------------------------------------------


class Client:
    """A synchronous client (httpx.Client). `base_url` and `api_key` default to `SLIMFORMER_URL`
    and `SLIMFORMER_API_KEY`. Use it as a context manager, or call `close()`."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        user_agent: str = "slimformer-sdk",
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._settings = _Settings(base_url, api_key, timeout, retry, user_agent)
        self.url = self._settings.base_url
        self.retry = self._settings.retry
        self.http = httpx.Client(
            base_url=self.url,
            headers=self._settings.headers,
            timeout=self._settings.timeout,
            transport=transport,
        )
        self.jobs = Jobs(self)
        self.models = Models(self)
        self.datasets = Datasets(self)
        self.artifacts = Artifacts(self)
        self.webhook_endpoints = WebhookEndpoints(self)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # HTTP with retries

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        upload: tuple[dict[str, str], Path] | None = None,
    ) -> httpx.Response:
        """One API call, retried per the policy; a non-2xx answer raises `SlimformerError`."""
        headers = dict(headers or {})
        safe = self.retry.safe_to_repeat(method, headers)
        retry = 0
        while True:
            try:
                if upload is not None:  # reopened on every try: a retry sends the whole file
                    fields, file_path = upload
                    with file_path.open("rb") as handle:
                        response = self.http.request(
                            method,
                            path,
                            params=_clean(params or {}),
                            headers=headers,
                            data=fields,
                            files={"file": (file_path.name, handle)},
                        )
                else:
                    response = self.http.request(
                        method, path, params=_clean(params or {}), json=json, headers=headers
                    )
            except httpx.TransportError as exc:
                if retry < self.retry.max_retries and self.retry.retry_on_error(exc, safe):
                    time.sleep(self.retry.delay(retry))
                    retry += 1
                    continue
                raise ServiceUnreachable(self.url, exc) from exc
            if response.status_code in RETRY_STATUSES and retry < self.retry.max_retries:
                time.sleep(self.retry.delay(retry, response))
                retry += 1
                continue
            if response.status_code >= 400:
                raise SlimformerError.from_response(response)
            return response

    def get_json(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params).json()

    def post_json(
        self, path: str, body: Any = None, *, headers: Mapping[str, str] | None = None
    ) -> Any:
        return self.request("POST", path, json=body, headers=headers).json()

    def open_stream(
        self, method: str, path: str, *, headers: Mapping[str, str], allowed: Iterable[int] = ()
    ) -> httpx.Response:
        """A streamed response (the caller closes it), retried per the policy until it opens;
        statuses >= 400 raise unless in `allowed`. Redirects (presigned URLs) are followed."""
        allowed = set(allowed)
        retry = 0
        while True:
            try:
                request = self.http.build_request(method, path, headers=dict(headers))
                response = self.http.send(request, stream=True, follow_redirects=True)
            except httpx.TransportError as exc:
                if retry < self.retry.max_retries and self.retry.retry_on_error(exc, True):
                    time.sleep(self.retry.delay(retry))
                    retry += 1
                    continue
                raise ServiceUnreachable(self.url, exc) from exc
            if response.status_code in RETRY_STATUSES and retry < self.retry.max_retries:
                response.close()
                time.sleep(self.retry.delay(retry, response))
                retry += 1
                continue
            if response.status_code >= 400 and response.status_code not in allowed:
                response.read()
                response.close()
                raise SlimformerError.from_response(response)
            return response

    def iter_pages(
        self, path: str, model: type[T], *, page_size: int = 100, **params: Any
    ) -> Iterator[T]:
        """Every item of a list endpoint, newest first, following the `after` cursor."""
        query = _clean(params)
        query["limit"] = page_size
        while True:
            page = Page[model].model_validate(self.get_json(path, **query))
            yield from page.data
            if not page.has_more or not page.data:
                return
            query["after"] = page.data[-1].id

    def wait(self, job_id: str, **kwargs: Any) -> Job:
        """`jobs.wait`: the job once it is terminal."""
        return self.jobs.wait(job_id, **kwargs)

    # Downloads

    def download(
        self,
        artifact_id: str,
        path: str | os.PathLike[str] = ".",
        *,
        expected_sha256: str | None = None,
        filename: str | None = None,
        progress: ProgressCallback | None = None,
        attempts: int = 5,
    ) -> Path:
        """Stream an artifact to `path` (a file, or a folder, existing or ending in `/`: then the
        server's file name), resuming a partial download with `Range`; the bytes' sha256 must equal the ETag
        (and `expected_sha256` when given) before the file gets its name. A file already there
        with the right hash is kept. Returns the file's path."""
        path = _destination(path)
        partial = _partial_for(path, artifact_id)
        partial.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, attempts + 1):
            offset = partial.stat().st_size if partial.exists() else 0
            # identity: a compressed response would make byte ranges mean something else
            headers = {"Accept-Encoding": "identity"}
            if offset:
                headers["Range"] = f"bytes={offset}-"
            response = self.open_stream(
                "GET", f"/v1/artifacts/{artifact_id}/content", headers=headers, allowed=(416,)
            )
            try:
                if response.status_code == 416:  # the partial file is not a prefix of this one
                    partial.unlink()
                    continue
                served = etag_sha256(response.headers.get("etag"))
                if expected_sha256 and served and served != expected_sha256:
                    raise _checksum_error(artifact_id, served, expected_sha256, "the server sends")
                expected = expected_sha256 or served
                target = _download_target(path, response, artifact_id, filename)
                if target.exists() and expected and file_sha256(target) == expected:
                    partial.unlink(missing_ok=True)
                    return target
                resumed = response.status_code == 206 and _range_start(response) == offset
                digest = _write_body(
                    response.iter_bytes(CHUNK),
                    partial,
                    resumed=resumed,
                    offset=offset,
                    total=_range_total(response),
                    progress=progress,
                )
            except httpx.TransportError as exc:
                if attempt == attempts:
                    raise ServiceUnreachable(self.url, exc) from exc
                time.sleep(self.retry.delay(attempt - 1))
                continue
            finally:
                response.close()
            if expected is None:
                raise SlimformerError(
                    "checksum_missing",
                    f"{artifact_id}: the server gave no sha256 to verify; the download is left "
                    f"in {partial}",
                )
            if digest != expected:
                partial.unlink()
                if resumed:  # the old bytes were bad; one clean download settles it
                    continue
                raise _checksum_error(artifact_id, digest, expected, "downloaded")
            os.replace(partial, target)
            return target
        raise SlimformerError("download_failed", f"{artifact_id}: gave up after {attempts} tries")


def _write_body(
    chunks: Iterable[bytes],
    partial: Path,
    *,
    resumed: bool,
    offset: int,
    total: int | None,
    progress: ProgressCallback | None,
) -> str:
    digest = hashlib.sha256()
    done = 0
    if resumed:
        with partial.open("rb") as existing:
            while chunk := existing.read(CHUNK):
                digest.update(chunk)
        done = offset
    if progress:
        progress(done, total)
    with partial.open("ab" if resumed else "wb") as out:
        for chunk in chunks:
            out.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


class _Collection(Generic[T]):
    path: str
    model: type[T]

    def __init__(self, client: Client) -> None:
        self._client = client

    def get(self, resource_id: str) -> T:
        return self.model.model_validate(self._client.get_json(f"{self.path}/{resource_id}"))

    def list(
        self, *, limit: int | None = None, after: str | None = None, **filters: Any
    ) -> Page[T]:
        """One page (`limit` 1–100, cursor `after` = the last id of the page before)."""
        body = self._client.get_json(self.path, limit=limit, after=after, **filters)
        return Page[self.model].model_validate(body)

    def iter(self, *, page_size: int = 100, **filters: Any) -> Iterator[T]:
        """Every item, newest first, page after page."""
        return self._client.iter_pages(self.path, self.model, page_size=page_size, **filters)

    def delete(self, resource_id: str) -> None:
        self._client.request("DELETE", f"{self.path}/{resource_id}")

    def find(self, name: str) -> T:
        """The one item named `name` (of several, the single `ready` one)."""
        matches = [item for item in self.iter() if getattr(item, "name", None) == name]
        return _one_named(matches, name, self.path)

    def wait_validated(
        self, resource_id: str, *, timeout: float | None = None, poll_interval_s: float = 1.0
    ) -> T:
        """Poll an uploaded model or dataset until its validation has ended (`ready` or
        `rejected`) and return it; `timeout` as in `jobs.wait`."""
        return _poll(
            lambda: self.get(resource_id),
            lambda item: getattr(item, "status", None) != "validating",
            resource_id,
            timeout,
            poll_interval_s,
        )


def _poll(
    fetch: Callable[[], R],
    done: Callable[[R], bool],
    label: str,
    timeout: float | None,
    poll_interval_s: float,
) -> R:
    """`fetch()` until `done`, waiting 0.2 s doubling to `poll_interval_s` between tries."""
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = min(0.2, poll_interval_s)
    while True:
        item = fetch()
        if done(item):
            return item
        if deadline is not None and time.monotonic() + delay > deadline:
            status = getattr(item, "status", None)
            raise SlimformerError("timeout", f"{label} is still {status} after {timeout} s")
        time.sleep(delay)
        delay = min(delay * 2, poll_interval_s)


def _one_named(matches: list[T], name: str, path: str) -> T:
    kind = path.rsplit("/", 1)[1]
    if not matches:
        raise SlimformerError("not_found", f"no {kind.rstrip('s')} named {name!r}")
    if len(matches) == 1:
        return matches[0]
    ready = [item for item in matches if getattr(item, "status", None) == "ready"]
    if len(ready) == 1:
        return ready[0]
    ids = ", ".join(item.id for item in matches)
    raise SlimformerError(
        "ambiguous", f"{len(matches)} {kind} are named {name!r} ({ids}); pass the id instead"
    )


class Models(_Collection[Model]):
    path, model = "/v1/models", Model

    def upload(
        self,
        file: str | os.PathLike[str],
        *,
        name: str | None = None,
        idempotency_key: str | None = None,
    ) -> Model:
        """Upload a .zip/.tar.gz of a Hugging Face model folder; validation runs afterwards."""
        response = self._client.request(
            "POST",
            self.path,
            headers=_create_headers(idempotency_key),
            upload=_upload_parts(file, {"name": name}),
        )
        return Model.model_validate(response.json())

    def create(
        self, *, name: str, source: Mapping[str, Any], idempotency_key: str | None = None
    ) -> Model:
        """Register a model without upload: `source` {"type": "hub"|"path", …}."""
        body = {"name": name, "source": dict(source)}
        return Model.model_validate(
            self._client.post_json(self.path, body, headers=_create_headers(idempotency_key))
        )


class Datasets(_Collection[Dataset]):
    path, model = "/v1/datasets", Dataset

    def upload(
        self,
        file: str | os.PathLike[str],
        *,
        name: str | None = None,
        format: str | None = None,  # noqa: A002 - the API's field
        idempotency_key: str | None = None,
    ) -> Dataset:
        """Upload a .txt (a record per line) or .jsonl (`{"text": …}`) file."""
        response = self._client.request(
            "POST",
            self.path,
            headers=_create_headers(idempotency_key),
            upload=_upload_parts(file, {"name": name, "format": format}),
        )
        return Dataset.model_validate(response.json())


class WebhookEndpoints(_Collection[WebhookEndpoint]):
    path, model = "/v1/webhook-endpoints", WebhookEndpoint

    def create(
        self,
        *,
        url: str,
        events: list[str] | None = None,
        description: str | None = None,
        idempotency_key: str | None = None,
    ) -> WebhookEndpoint:
        body = _clean({"url": url, "events": events, "description": description})
        return WebhookEndpoint.model_validate(
            self._client.post_json(self.path, body, headers=_create_headers(idempotency_key))
        )

    def rotate_secret(self, endpoint_id: str) -> WebhookEndpoint:
        return WebhookEndpoint.model_validate(
            self._client.post_json(f"{self.path}/{endpoint_id}/rotate-secret")
        )


class Artifacts:
    def __init__(self, client: Client) -> None:
        self._client = client

    def list(self, job_id: str) -> list[Artifact]:
        """A job's artifacts (model, report, log)."""
        return list(self._client.iter_pages(f"/v1/jobs/{job_id}/artifacts", Artifact))

    def download(self, artifact_id: str, path: str | os.PathLike[str] = ".", **kwargs: Any) -> Path:
        return self._client.download(artifact_id, path, **kwargs)


class Jobs(_Collection[Job]):
    path, model = "/v1/jobs", Job

    def create(
        self,
        body: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> Job:
        """`POST /v1/jobs` with `body` and/or its fields as keywords (`model_id`, `recipe`,
        `calibration`, `evaluation`, `targets`, …). Retried safely: the same key, the same job."""
        return Job.model_validate(
            self._client.post_json(
                self.path, _job_body(body, fields), headers=_create_headers(idempotency_key)
            )
        )

    def cancel(self, job_id: str) -> Job:
        return Job.model_validate(self._client.post_json(f"{self.path}/{job_id}/cancel"))

    def retry(self, job_id: str) -> Job:
        """A new job with the same spec (the job must be terminal)."""
        return Job.model_validate(self._client.post_json(f"{self.path}/{job_id}/retry"))

    def artifacts(self, job_id: str) -> list[Artifact]:
        return self._client.artifacts.list(job_id)

    def list_events(self, job_id: str, *, after: int = 0, limit: int = 100) -> Page[JobEvent]:
        """One page of the job's events after seq `after` (the JSON form)."""
        body = self._client.get_json(f"{self.path}/{job_id}/events", after=after, limit=limit)
        return Page[JobEvent].model_validate(body)

    def iter_events(self, job_id: str, *, after: int = 0) -> Iterator[JobEvent]:
        while True:
            page = self.list_events(job_id, after=after, limit=1000)
            yield from page.data
            if not page.has_more or not page.data:
                return
            after = page.data[-1].seq

    def events(
        self,
        job_id: str,
        *,
        last_event_id: str | int | None = None,
        reconnect_delay_s: float = 1.0,
        max_failures: int = 8,
    ) -> Iterator[JobEvent]:
        """The job's events as they happen (SSE), until it is terminal, each exactly once: a
        dropped connection is resumed with `Last-Event-ID`; whether the job has ended is asked of
        the job itself, and the events after the stream's last one are then read as a list.
        `last_event_id` starts after that seq (what an earlier iteration saw last)."""
        decoder = SSEDecoder(None if last_event_id is None else str(last_event_id))
        failures = 0
        while True:
            try:
                response = self._client.open_stream(
                    "GET",
                    f"{self.path}/{job_id}/events",
                    headers=_stream_headers(decoder.last_event_id),
                )
                try:
                    for event in decoder.feed_all(response.iter_lines()):
                        failures = 0
                        yield job_event(event)
                finally:
                    response.close()
                job = self.get(job_id)
            except (ServiceUnreachable, httpx.TransportError) as exc:
                decoder.reset_partial()
                failures += 1
                if failures > max_failures:
                    if isinstance(exc, ServiceUnreachable):
                        raise
                    raise ServiceUnreachable(self._client.url, exc) from exc
                time.sleep(min(reconnect_delay_s * 2 ** (failures - 1), 30.0))
                continue
            if job.terminal:
                # The stream may have broken just before the last events: collect them as a list.
                after = decoder.last_event_id or "0"
                if after.isdigit():
                    yield from self.iter_events(job_id, after=int(after))
                return
            decoder.reset_partial()
            delay = decoder.retry_ms / 1000 if decoder.retry_ms is not None else reconnect_delay_s
            time.sleep(delay)

    def wait(
        self, job_id: str, *, timeout: float | None = None, poll_interval_s: float = 1.0
    ) -> Job:
        """Poll until the job is terminal and return it; `timeout` (s) raises `SlimformerError`
        code `timeout` when it passes first."""
        return _poll(
            lambda: self.get(job_id),
            lambda job: job.terminal,
            f"job {job_id}",
            timeout,
            poll_interval_s,
        )


# --- The asynchronous client --------------------------------------------------------------------


class AsyncClient:
    """`Client`'s asynchronous twin (httpx.AsyncClient): the same resources, `await`ed, and
    `async for` over pages and events."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        user_agent: str = "slimformer-sdk",
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._settings = _Settings(base_url, api_key, timeout, retry, user_agent)
        self.url = self._settings.base_url
        self.retry = self._settings.retry
        self.http = httpx.AsyncClient(
            base_url=self.url,
            headers=self._settings.headers,
            timeout=self._settings.timeout,
            transport=transport,
        )
        self.jobs = AsyncJobs(self)
        self.models = AsyncModels(self)
        self.datasets = AsyncDatasets(self)
        self.webhook_endpoints = AsyncWebhookEndpoints(self)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        upload: tuple[dict[str, str], Path] | None = None,
    ) -> httpx.Response:
        headers = dict(headers or {})
        safe = self.retry.safe_to_repeat(method, headers)
        retry = 0
        while True:
            try:
                if upload is not None:  # reopened on every try, read in chunks as it is sent
                    fields, file_path = upload
                    with file_path.open("rb") as handle:
                        response = await self.http.request(
                            method,
                            path,
                            params=_clean(params or {}),
                            headers=headers,
                            data=fields,
                            files={"file": (file_path.name, handle)},
                        )
                else:
                    response = await self.http.request(
                        method, path, params=_clean(params or {}), json=json, headers=headers
                    )
            except httpx.TransportError as exc:
                if retry < self.retry.max_retries and self.retry.retry_on_error(exc, safe):
                    await asyncio.sleep(self.retry.delay(retry))
                    retry += 1
                    continue
                raise ServiceUnreachable(self.url, exc) from exc
            if response.status_code in RETRY_STATUSES and retry < self.retry.max_retries:
                await asyncio.sleep(self.retry.delay(retry, response))
                retry += 1
                continue
            if response.status_code >= 400:
                raise SlimformerError.from_response(response)
            return response

    async def get_json(self, path: str, **params: Any) -> Any:
        return (await self.request("GET", path, params=params)).json()

    async def post_json(
        self, path: str, body: Any = None, *, headers: Mapping[str, str] | None = None
    ) -> Any:
        return (await self.request("POST", path, json=body, headers=headers)).json()

    async def open_stream(
        self, method: str, path: str, *, headers: Mapping[str, str]
    ) -> httpx.Response:
        retry = 0
        while True:
            try:
                request = self.http.build_request(method, path, headers=dict(headers))
                response = await self.http.send(request, stream=True, follow_redirects=True)
            except httpx.TransportError as exc:
                if retry < self.retry.max_retries and self.retry.retry_on_error(exc, True):
                    await asyncio.sleep(self.retry.delay(retry))
                    retry += 1
                    continue
                raise ServiceUnreachable(self.url, exc) from exc
            if response.status_code in RETRY_STATUSES and retry < self.retry.max_retries:
                await response.aclose()
                await asyncio.sleep(self.retry.delay(retry, response))
                retry += 1
                continue
            if response.status_code >= 400:
                await response.aread()
                await response.aclose()
                raise SlimformerError.from_response(response)
            return response

    async def iter_pages(
        self, path: str, model: type[T], *, page_size: int = 100, **params: Any
    ) -> AsyncIterator[T]:
        query = _clean(params)
        query["limit"] = page_size
        while True:
            page = Page[model].model_validate(await self.get_json(path, **query))
            for item in page.data:
                yield item
            if not page.has_more or not page.data:
                return
            query["after"] = page.data[-1].id

    async def wait(self, job_id: str, **kwargs: Any) -> Job:
        return await self.jobs.wait(job_id, **kwargs)

    async def download(
        self,
        artifact_id: str,
        path: str | os.PathLike[str] = ".",
        *,
        expected_sha256: str | None = None,
        filename: str | None = None,
    ) -> Path:
        """Stream an artifact to `path` (a file, or a folder: the server's name), verified
        against its ETag sha256 (and `expected_sha256`) before it gets its name."""
        path = _destination(path)
        partial = _partial_for(path, artifact_id)
        partial.parent.mkdir(parents=True, exist_ok=True)
        response = await self.open_stream(
            "GET", f"/v1/artifacts/{artifact_id}/content", headers={"Accept-Encoding": "identity"}
        )
        digest = hashlib.sha256()
        try:
            served = etag_sha256(response.headers.get("etag"))
            expected = expected_sha256 or served
            if expected is None:
                raise SlimformerError("checksum_missing", f"{artifact_id}: no sha256 to verify")
            if served and served != expected:
                raise _checksum_error(artifact_id, served, expected, "the server sends")
            target = _download_target(path, response, artifact_id, filename)
            with partial.open("wb") as out:
                async for chunk in response.aiter_bytes(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
        except httpx.TransportError as exc:
            partial.unlink(missing_ok=True)
            raise ServiceUnreachable(self.url, exc) from exc
        finally:
            await response.aclose()
        if digest.hexdigest() != expected:
            partial.unlink()
            raise _checksum_error(artifact_id, digest.hexdigest(), expected, "downloaded")
        os.replace(partial, target)
        return target


class _AsyncCollection(Generic[T]):
    path: str
    model: type[T]

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def get(self, resource_id: str) -> T:
        return self.model.model_validate(await self._client.get_json(f"{self.path}/{resource_id}"))

    async def list(
        self, *, limit: int | None = None, after: str | None = None, **filters: Any
    ) -> Page[T]:
        body = await self._client.get_json(self.path, limit=limit, after=after, **filters)
        return Page[self.model].model_validate(body)

    def iter(self, *, page_size: int = 100, **filters: Any) -> AsyncIterator[T]:
        return self._client.iter_pages(self.path, self.model, page_size=page_size, **filters)

    async def delete(self, resource_id: str) -> None:
        await self._client.request("DELETE", f"{self.path}/{resource_id}")

    async def find(self, name: str) -> T:
        matches = [item async for item in self.iter() if getattr(item, "name", None) == name]
        return _one_named(matches, name, self.path)


class AsyncModels(_AsyncCollection[Model]):
    path, model = "/v1/models", Model

    async def upload(
        self,
        file: str | os.PathLike[str],
        *,
        name: str | None = None,
        idempotency_key: str | None = None,
    ) -> Model:
        response = await self._client.request(
            "POST",
            self.path,
            headers=_create_headers(idempotency_key),
            upload=_upload_parts(file, {"name": name}),
        )
        return Model.model_validate(response.json())

    async def create(
        self, *, name: str, source: Mapping[str, Any], idempotency_key: str | None = None
    ) -> Model:
        body = {"name": name, "source": dict(source)}
        return Model.model_validate(
            await self._client.post_json(self.path, body, headers=_create_headers(idempotency_key))
        )


class AsyncDatasets(_AsyncCollection[Dataset]):
    path, model = "/v1/datasets", Dataset

    async def upload(
        self,
        file: str | os.PathLike[str],
        *,
        name: str | None = None,
        format: str | None = None,  # noqa: A002 - the API's field
        idempotency_key: str | None = None,
    ) -> Dataset:
        response = await self._client.request(
            "POST",
            self.path,
            headers=_create_headers(idempotency_key),
            upload=_upload_parts(file, {"name": name, "format": format}),
        )
        return Dataset.model_validate(response.json())


class AsyncWebhookEndpoints(_AsyncCollection[WebhookEndpoint]):
    path, model = "/v1/webhook-endpoints", WebhookEndpoint

    async def create(
        self,
        *,
        url: str,
        events: list[str] | None = None,
        description: str | None = None,
        idempotency_key: str | None = None,
    ) -> WebhookEndpoint:
        body = _clean({"url": url, "events": events, "description": description})
        return WebhookEndpoint.model_validate(
            await self._client.post_json(self.path, body, headers=_create_headers(idempotency_key))
        )


class AsyncJobs(_AsyncCollection[Job]):
    path, model = "/v1/jobs", Job

    async def create(
        self,
        body: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> Job:
        return Job.model_validate(
            await self._client.post_json(
                self.path, _job_body(body, fields), headers=_create_headers(idempotency_key)
            )
        )

    async def cancel(self, job_id: str) -> Job:
        return Job.model_validate(await self._client.post_json(f"{self.path}/{job_id}/cancel"))

    async def retry(self, job_id: str) -> Job:
        return Job.model_validate(await self._client.post_json(f"{self.path}/{job_id}/retry"))

    async def artifacts(self, job_id: str) -> list[Artifact]:
        path = f"{self.path}/{job_id}/artifacts"
        return [item async for item in self._client.iter_pages(path, Artifact)]

    async def list_events(self, job_id: str, *, after: int = 0, limit: int = 100) -> Page[JobEvent]:
        body = await self._client.get_json(f"{self.path}/{job_id}/events", after=after, limit=limit)
        return Page[JobEvent].model_validate(body)

    async def events(
        self, job_id: str, *, last_event_id: str | int | None = None, max_failures: int = 8
    ) -> AsyncIterator[JobEvent]:
        """As `Client.jobs.events`: SSE, resumed with `Last-Event-ID`, until the job ends."""
        decoder = SSEDecoder(None if last_event_id is None else str(last_event_id))
        failures = 0
        while True:
            try:
                response = await self._client.open_stream(
                    "GET",
                    f"{self.path}/{job_id}/events",
                    headers=_stream_headers(decoder.last_event_id),
                )
                try:
                    async for line in response.aiter_lines():
                        event = decoder.feed(line)
                        if event is not None:
                            failures = 0
                            yield job_event(event)
                finally:
                    await response.aclose()
                job = await self.get(job_id)
            except (ServiceUnreachable, httpx.TransportError) as exc:
                decoder.reset_partial()
                failures += 1
                if failures > max_failures:
                    if isinstance(exc, ServiceUnreachable):
                        raise
                    raise ServiceUnreachable(self._client.url, exc) from exc
                await asyncio.sleep(min(2 ** (failures - 1), 30.0))
                continue
            if job.terminal:
                after = int(decoder.last_event_id or 0)
                while True:
                    page = await self.list_events(job_id, after=after, limit=1000)
                    for event in page.data:
                        yield event
                    if not page.has_more or not page.data:
                        return
                    after = page.data[-1].seq
            decoder.reset_partial()
            await asyncio.sleep(decoder.retry_ms / 1000 if decoder.retry_ms is not None else 1.0)

    async def wait(
        self, job_id: str, *, timeout: float | None = None, poll_interval_s: float = 1.0
    ) -> Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = min(0.2, poll_interval_s)
        while True:
            job = await self.get(job_id)
            if job.terminal:
                return job
            if deadline is not None and time.monotonic() + delay > deadline:
                raise SlimformerError(
                    "timeout", f"job {job_id} is still {job.status} after {timeout} s"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, poll_interval_s)
