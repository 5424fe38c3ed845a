"""The people-facing commands (`submit`, `jobs`, `download`, `cancel`).

They are plain HTTP clients of the public API, so they behave the same against `slimformer serve`
on a laptop and against a remote deployment. Nothing here imports the service: what the CLI knows
about jobs is what the API contract says, nothing more.
"""

from __future__ import annotations

import email.message
import hashlib
import json
import os
import shutil
import stat
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import click
import httpx
from tqdm import tqdm

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
ID_PREFIXES = {"models": "mdl_", "datasets": "dset_"}
CHUNK = 1024 * 1024
PROGRESS_STEPS = 1000  # the bar counts permille: tqdm draws float totals poorly


class CommandError(Exception):
    """A failure the user should read as `code: message` (exit status 2)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ApiError(CommandError):
    """A non-2xx answer, carrying the API's `{"error": {code, message, param}}`."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(code, f"{message} (param: {param})" if param else message)
        self.status = status
        self.param = param


class ServiceUnreachable(CommandError):
    def __init__(self, url: str, reason: httpx.TransportError) -> None:
        if isinstance(reason, httpx.ConnectError | httpx.ConnectTimeout):
            message = (
                f"the Slimformer service isn't running at {url} ({reason}); start it with "
                "`slimformer serve`, or point --url / SLIMFORMER_URL at it"
            )
        else:
            message = f"lost the connection to the Slimformer service at {url} ({reason})"
        super().__init__("service_unreachable", message)


# --- HTTP ---------------------------------------------------------------------------------------


class Api:
    """A thin httpx client: bearer auth, and every error turned into an `ApiError`."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        headers = {"User-Agent": "slimformer-cli"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        # Streams may sit quiet between events; a read timeout well above the SSE keep-alive
        # interval makes a silently dead server show up as a reconnect instead of a hang.
        self.http = httpx.Client(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, read=120.0)
        )

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServiceUnreachable(self.url, exc) from exc
        if response.status_code >= 400:
            raise error_from(response)
        return response

    def get(self, path: str, **params: Any) -> Any:
        return self.request(
            "GET", path, params={k: v for k, v in params.items() if v is not None}
        ).json()

    def post(self, path: str, body: Any = None, *, headers: dict[str, str] | None = None) -> Any:
        return self.request("POST", path, json=body, headers=headers).json()

    @contextmanager
    def stream(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        allowed: Iterable[int] = (),
    ) -> Iterator[httpx.Response]:
        """A streamed response; statuses >= 400 raise unless listed in `allowed`. Transport errors
        while reading the body are left to the caller, who knows how to resume."""
        allowed = set(allowed)
        try:
            with self.http.stream(method, path, headers=headers) as response:
                if response.status_code >= 400 and response.status_code not in allowed:
                    response.read()
                    raise error_from(response)
                yield response
        except httpx.TransportError as exc:
            raise ServiceUnreachable(self.url, exc) from exc


def error_from(response: httpx.Response) -> ApiError:
    try:
        error = response.json()["error"]
        return ApiError(
            response.status_code, str(error["code"]), str(error["message"]), error.get("param")
        )
    except (ValueError, KeyError, TypeError):
        text = response.text.strip()[:200] or response.reason_phrase
        return ApiError(response.status_code, f"http_{response.status_code}", text)


def iter_list(api: Api, path: str, *, page_size: int = 100, **params: Any) -> Iterator[dict]:
    """Every item of a list endpoint, newest first, following the `after` cursor."""
    query = {k: v for k, v in params.items() if v is not None}
    query["limit"] = page_size
    while True:
        page = api.get(path, **query)
        items = page["data"]
        yield from items
        if not page.get("has_more") or not items:
            return
        query["after"] = items[-1]["id"]


def resolve_id(api: Api, collection: str, name_or_id: str) -> str:
    """`mdl_…`/`dset_…` pass through; anything else is looked up by name in the listing. Names need
    not be unique: of several matches, the single `ready` one wins, otherwise the user must pick."""
    prefix = ID_PREFIXES[collection]
    if name_or_id.startswith(prefix):
        return name_or_id
    matches = [
        item for item in iter_list(api, f"/v1/{collection}") if item.get("name") == name_or_id
    ]
    kind = collection.rstrip("s")
    if not matches:
        raise CommandError("not_found", f"no {kind} named {name_or_id!r} (nor a {prefix}… id)")
    if len(matches) == 1:
        return matches[0]["id"]
    ready = [item for item in matches if item.get("status") == "ready"]
    if len(ready) == 1:
        return ready[0]["id"]
    ids = ", ".join(item["id"] for item in matches)
    raise CommandError(
        "ambiguous",
        f"{len(matches)} {collection} are named {name_or_id!r} ({ids}); pass the id instead",
    )


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


def job_event(event: SSEEvent) -> dict[str, Any]:
    """The job event an SSE message carries: `{seq, type, level, message, data, created_at}`."""
    try:
        payload = json.loads(event.data)
    except ValueError:
        payload = event.data
    if isinstance(payload, dict) and "type" in payload:
        return payload
    return {
        "seq": event.id,
        "type": event.event,
        "level": "info",
        "message": payload if isinstance(payload, str) else "",
        "data": payload if isinstance(payload, dict) else None,
    }


def follow_job(
    api: Api,
    job_id: str,
    on_event: Callable[[dict[str, Any]], None],
    *,
    reconnect_delay_s: float = 1.0,
    max_failures: int = 8,
) -> dict[str, Any]:
    """Stream the job's events to `on_event` until the job is terminal; return the final job.

    The stream is resumed with `Last-Event-ID` whenever it ends early, so no event is seen twice or
    missed. Whether the job is finished is asked of the job itself, not inferred from the stream.
    """
    decoder = SSEDecoder()
    failures = 0
    while True:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if decoder.last_event_id is not None:
            headers["Last-Event-ID"] = decoder.last_event_id
        try:
            with api.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
                for event in decoder.feed_all(response.iter_lines()):
                    failures = 0
                    on_event(job_event(event))
            job = api.get(f"/v1/jobs/{job_id}")
        except (ServiceUnreachable, httpx.TransportError) as exc:
            decoder.reset_partial()
            failures += 1
            if failures > max_failures:
                if isinstance(exc, ServiceUnreachable):
                    raise
                raise ServiceUnreachable(api.url, exc) from exc
            time.sleep(min(reconnect_delay_s * 2 ** (failures - 1), 30.0))
            continue
        if job["status"] in TERMINAL:
            # The stream may have broken just before the last events: collect them as a list.
            after = decoder.last_event_id or "0"
            if after.isdigit():
                for event in iter_events(api, job_id, after=int(after)):
                    on_event(event)
            return job
        decoder.reset_partial()
        delay = decoder.retry_ms / 1000 if decoder.retry_ms is not None else reconnect_delay_s
        time.sleep(delay)


def iter_events(api: Api, job_id: str, *, after: int) -> Iterator[dict[str, Any]]:
    """The job's events after seq `after`, from the JSON form of the events endpoint."""
    while True:
        page = api.get(f"/v1/jobs/{job_id}/events", after=after, limit=1000)
        yield from page["data"]
        if not page.get("has_more") or not page["data"]:
            return
        after = page["data"][-1]["seq"]


class ProgressView:
    """A tqdm bar fed by progress events, with status changes printed above it (on stderr)."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar = tqdm(
            total=PROGRESS_STEPS,
            file=sys.stderr,
            disable=None if enabled else True,
            bar_format="{desc} {percentage:3.0f}%|{bar}| {postfix}",
            desc="queued",
        )
        self.stage: str | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        data = event.get("data") or {}
        kind = event.get("type")
        if kind == "status":
            status = data.get("status") or "?"
            self.bar.set_description_str(status)
            self.say(event.get("message") or f"status: {status}")
        elif kind == "progress":
            self.progress(data, event.get("message"))
        elif kind == "metric" or (kind == "log" and event.get("level") in ("warning", "error")):
            self.say(f"{event.get('level', 'info')}: {event.get('message', '')}")

    def progress(self, data: dict[str, Any], message: str | None) -> None:
        stage = data.get("stage")
        if stage and stage != self.stage:
            self.stage = stage
            self.say(f"stage {stage_label(data)}")
        if stage:
            self.bar.set_description_str(stage_label(data))
        fraction = data.get("fraction")
        if isinstance(fraction, int | float):
            self.bar.n = round(min(max(fraction, 0.0), 1.0) * PROGRESS_STEPS)
        parts = [data.get("message") or message or ""]
        if data.get("eta_s") is not None:
            parts.append(f"eta {format_duration(data['eta_s'])}")
        self.bar.set_postfix_str("  ".join(p for p in parts if p), refresh=False)
        self.bar.refresh()

    def say(self, line: str) -> None:
        if self.enabled:
            tqdm.write(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def stage_label(progress: dict[str, Any]) -> str:
    """`gptq [2/3]`; `stage_index` counts from 0."""
    stage = progress.get("stage") or "-"
    index, total = progress.get("stage_index"), progress.get("num_stages")
    if isinstance(index, int) and isinstance(total, int) and total > 1:
        return f"{stage} [{index + 1}/{total}]"
    return str(stage)


# --- Formatting ---------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def format_metric(name: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-" if value is None else str(value)
    if name.endswith("_bytes"):
        return format_bytes(value)
    if name == "sparsity":
        return f"{value:.1%}"
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def format_table(rows: list[list[str]], headers: list[str] | None = None) -> str:
    lines = [headers, *rows] if headers else rows
    if not lines:
        return ""
    widths = [max(len(str(cell)) for cell in column) for column in zip(*lines, strict=True)]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def metrics_table(metrics: dict[str, Any]) -> str:
    """Baseline against compressed for every numeric metric both sides (or either) report."""
    baseline = metrics.get("baseline") or {}
    compressed = metrics.get("compressed") or {}
    rows = []
    for name in dict.fromkeys([*baseline, *compressed]):
        before, after = baseline.get(name), compressed.get(name)
        if not any(_is_number(v) for v in (before, after)):
            continue  # settings (device, dataset sha256) are not comparisons
        change = ""
        if _is_number(before) and _is_number(after) and before:
            change = f"{(after - before) / abs(before):+.1%}"
        rows.append([name, format_metric(name, before), format_metric(name, after), change])
    return format_table(rows, ["metric", "baseline", "compressed", "change"])


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def describe_recipe(recipe: dict[str, Any] | None) -> str:
    stages = (recipe or {}).get("stages") or []
    return " → ".join(stage.get("method", "?") for stage in stages) or "-"


def progress_cell(job: dict[str, Any]) -> str:
    progress = job.get("progress") or {}
    if job.get("status") not in ("running", "cancelling"):
        return "-"
    fraction = progress.get("fraction")
    label = stage_label(progress) if progress.get("stage") else ""
    return f"{label} {fraction:.0%}".strip() if _is_number(fraction) else label or "-"


def short_time(timestamp: str | None) -> str:
    return (timestamp or "-").replace("T", " ")[:19]


# --- Building a job -----------------------------------------------------------------------------


def parse_stage(spec: str) -> dict[str, Any]:
    """`gptq` or `gptq:bits=4,group_size=128`; values are read as JSON scalars where they parse."""
    method, _, options = spec.partition(":")
    if not method:
        raise click.BadParameter(f"{spec!r}: expected METHOD or METHOD:key=value,…")
    stage: dict[str, Any] = {"method": method}
    for option in filter(None, options.split(",")):
        key, equals, raw = option.partition("=")
        if not equals or not key:
            raise click.BadParameter(f"{option!r} in {spec!r}: expected key=value")
        stage[key] = _scalar(raw)
    return stage


def _scalar(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def parse_metadata(pairs: Iterable[str]) -> dict[str, str]:
    metadata = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key:
            raise click.BadParameter(f"{pair!r}: expected key=value", param_hint="--metadata")
        metadata[key] = value
    return metadata


def build_job_body(
    *,
    model_id: str,
    template: dict[str, Any] | None = None,
    stages: list[dict[str, Any]] = (),
    calibration_id: str | None = None,
    evaluation_id: str | None = None,
    metrics: Iterable[str] = (),
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The `POST /v1/jobs` body: the recipe file's fields, overridden by the command line."""
    body = json.loads(json.dumps(template or {}))  # a deep copy
    body["model_id"] = model_id
    if stages:
        if body.get("recipe", {}).get("stages"):
            raise click.UsageError("give the stages either in --recipe or as --method, not both")
        body["recipe"] = {**body.get("recipe", {}), "stages": list(stages)}
    if calibration_id:
        body["calibration"] = {**(body.get("calibration") or {}), "dataset_id": calibration_id}
    metrics = list(metrics)
    if evaluation_id or metrics:
        evaluation = dict(body.get("evaluation") or {})
        if evaluation_id:
            evaluation["dataset_id"] = evaluation_id
        if metrics:
            evaluation["metrics"] = metrics
        body["evaluation"] = evaluation
    if metadata:
        body["metadata"] = {**(body.get("metadata") or {}), **metadata}
    return body


def read_recipe_file(path: Path) -> dict[str, Any]:
    """A recipe (`{"stages": […]}`) or a whole job body (`{"recipe": …, "calibration": …}`)."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"{path}: {exc}", param_hint="--recipe") from exc
    if isinstance(document, dict) and "stages" in document:
        return {"recipe": document}
    if isinstance(document, dict) and "recipe" in document:
        return document
    raise click.BadParameter(
        f'{path}: expected {{"stages": [...]}} or a job body with "recipe"', param_hint="--recipe"
    )


# --- Downloads ----------------------------------------------------------------------------------


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


def local_filename(artifact: dict) -> str | None:
    """The name a job's artifact is saved under: the server's, which names the model and the job;
    an artifact from before it did (`model.tar.gz`) gets its job's id in front, so that the
    downloads of two jobs never overwrite each other."""
    name = safe_filename(artifact.get("filename"))
    job_id = safe_filename(artifact.get("job_id"))
    if name and job_id and job_id not in name:
        return f"{job_id}-{name}"
    return name


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_artifact(
    api: Api,
    artifact_id: str,
    directory: Path,
    *,
    expected_sha256: str | None = None,
    filename: str | None = None,
    show_progress: bool = True,
    attempts: int = 5,
    retry_delay_s: float = 1.0,
) -> Path:
    """Stream an artifact into `directory`, resuming a partial download with `Range`, verify its
    sha256 and only then give it its name. A file already there with the right hash is kept."""
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".{artifact_id}.part"
    for attempt in range(1, attempts + 1):
        offset = partial.stat().st_size if partial.exists() else 0
        # identity: a compressed response would make byte ranges mean something else
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            with api.stream(
                "GET", f"/v1/artifacts/{artifact_id}/content", headers=headers, allowed=(416,)
            ) as response:
                if response.status_code == 416:  # the partial file is not a prefix of this one
                    partial.unlink()
                    continue
                served = etag_sha256(response.headers.get("etag"))
                if expected_sha256 and served and served != expected_sha256:
                    raise CommandError(
                        "checksum_mismatch",
                        f"{artifact_id}: the server sends "
                        f"sha256 {served}, the artifact says {expected_sha256}",
                    )
                expected = expected_sha256 or served
                target = directory / (
                    filename
                    or disposition_filename(response.headers.get("content-disposition"))
                    or artifact_id
                )
                if target.exists() and expected and file_sha256(target) == expected:
                    partial.unlink(missing_ok=True)
                    return target
                resumed = response.status_code == 206 and _range_start(response) == offset
                digest = _write_body(
                    response,
                    partial,
                    resumed=resumed,
                    offset=offset,
                    label=target.name,
                    show_progress=show_progress,
                )
        except (ServiceUnreachable, httpx.TransportError) as exc:
            if attempt == attempts:
                raise (
                    exc if isinstance(exc, ServiceUnreachable) else ServiceUnreachable(api.url, exc)
                ) from exc
            time.sleep(retry_delay_s * attempt)
            continue
        if expected is None:
            raise CommandError(
                "checksum_missing",
                f"{artifact_id}: the server gave no sha256 "
                f"to verify; the download is left in {partial}",
            )
        if digest != expected:
            partial.unlink()
            if resumed:  # the old bytes were bad; one clean download settles it
                continue
            raise CommandError(
                "checksum_mismatch",
                f"{artifact_id}: downloaded sha256 {digest}, expected {expected}",
            )
        os.replace(partial, target)
        return target
    raise CommandError("download_failed", f"{artifact_id}: gave up after {attempts} attempts")


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


def _write_body(
    response: httpx.Response,
    partial: Path,
    *,
    resumed: bool,
    offset: int,
    label: str,
    show_progress: bool,
) -> str:
    digest = hashlib.sha256()
    if resumed:
        with partial.open("rb") as existing:
            while chunk := existing.read(CHUNK):
                digest.update(chunk)
    total = _range_total(response)
    with (
        partial.open("ab" if resumed else "wb") as out,
        tqdm(
            total=total,
            initial=offset if resumed else 0,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=label,
            file=sys.stderr,
            disable=None if show_progress else True,
        ) as bar,
    ):
        for chunk in response.iter_bytes(CHUNK):
            out.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


class UnsafeArchive(CommandError):
    def __init__(self, message: str) -> None:
        super().__init__("unsafe_archive", message)


ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


def check_member_name(name: str) -> None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchive(f"absolute member path {name!r}")
    if ".." in path.parts:
        raise UnsafeArchive(f"member path leaves the folder: {name!r}")


def safe_extract(archive: Path, destination: Path) -> Path:
    """Unpack a .tar.gz/.tar/.zip into the new folder `destination`, refusing absolute paths, `..`
    and anything but regular files and folders (links, devices) before writing a single byte.
    An archive holding one folder (a model artifact holds `model/`) becomes that folder, renamed,
    never `destination/model/`. Permissions follow the umask, as a folder made here would."""
    if destination.exists():
        raise CommandError("conflict", f"{destination} already exists; remove it or use -o")
    destination.parent.mkdir(parents=True, exist_ok=True)
    mask = current_umask()
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=destination.parent))
    try:
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as bundle:
                for info in bundle.infolist():
                    check_member_name(info.filename)
                    mode = info.external_attr >> 16
                    if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                        raise UnsafeArchive(f"{info.filename!r} is not a regular file")
                bundle.extractall(staging)
        else:
            with tarfile.open(archive) as bundle:
                members = bundle.getmembers()
                for member in members:
                    check_member_name(member.name)
                    if not (member.isfile() or member.isdir()):
                        raise UnsafeArchive(f"{member.name!r} is a link or special file")
                bundle.extractall(staging, members=members, filter=masked_data_filter(mask))
        entries = list(staging.iterdir())
        root = entries[0] if len(entries) == 1 and entries[0].is_dir() else staging
        root.chmod(0o777 & ~mask)  # mkdtemp makes the staging folder private (0700)
        os.replace(root, destination)
    except (tarfile.TarError, zipfile.BadZipFile) as exc:
        raise CommandError("bad_archive", f"{archive}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already, unless a folder came out of it
    return destination


def current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def masked_data_filter(mask: int) -> Callable[[tarfile.TarInfo, str], tarfile.TarInfo]:
    """tarfile's `data` filter (no links, devices or paths outside; no setuid or group/other
    write bits), with the umask applied to the archive's modes as `tar` applies it."""

    def keep(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
        member = tarfile.data_filter(member, path)
        if member.mode is not None:
            member = member.replace(mode=member.mode & ~mask, deep=False)
        return member

    return keep


def extraction_folder(archive: Path) -> Path:
    for suffix in ARCHIVE_SUFFIXES:
        if archive.name.endswith(suffix):
            return archive.with_name(archive.name[: -len(suffix)])
    raise CommandError("bad_archive", f"{archive.name}: not a {', '.join(ARCHIVE_SUFFIXES)} file")


# --- Commands -----------------------------------------------------------------------------------


def connection_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option(
        "--api-key",
        envvar="SLIMFORMER_API_KEY",
        show_envvar=True,
        help="API key (not needed when the service runs with auth off)",
    )(command)
    return click.option(
        "--url",
        envvar="SLIMFORMER_URL",
        show_envvar=True,
        default=DEFAULT_URL,
        show_default=True,
        help="Service URL",
    )(command)


@contextmanager
def api_session(url: str, api_key: str | None) -> Iterator[Api]:
    """An `Api` whose failures become `code: message` on stderr and exit status 2."""
    api = Api(url, api_key)
    try:
        yield api
    except CommandError as exc:
        click.echo(f"{exc.code}: {exc.message}", err=True)
        raise click.exceptions.Exit(2) from None
    finally:
        api.close()


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def register_client_commands(group: click.Group) -> None:
    """Add `submit`, `jobs`, `download` and `cancel` to the `slimformer` command group."""
    for command in (submit, jobs, download, cancel):
        group.add_command(command)


@click.command()
@click.argument("model")
@click.option(
    "--recipe",
    "recipe_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help='JSON: a recipe {"stages": [...]} or a whole job body; options override it',
)
@click.option(
    "--method",
    "methods",
    multiple=True,
    metavar="METHOD[:key=value,…]",
    help="A recipe stage, e.g. dynamic_int8 or rtn:bits=4,group_size=128; "
    "repeat for a pipeline, in order",
)
@click.option("--calibration", metavar="DATASET", help="Calibration dataset (name or dset_ id)")
@click.option("--evaluation", metavar="DATASET", help="Evaluation dataset (name or dset_ id)")
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    metavar="METRIC",
    help="perplexity, embedding_cosine, accuracy, latency or size (repeatable; "
    "default: what fits the model)",
)
@click.option(
    "--metadata",
    "metadata_pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="Attach metadata (repeatable)",
)
@click.option("--idempotency-key", help="Resubmitting with the same key returns the same job")
@click.option("--wait", is_flag=True, help="Follow the job to its end; exit 1 unless it succeeds")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON")
@connection_options
def submit(
    model: str,
    recipe_file: Path | None,
    methods: tuple[str, ...],
    calibration: str | None,
    evaluation: str | None,
    metrics: tuple[str, ...],
    metadata_pairs: tuple[str, ...],
    idempotency_key: str | None,
    wait: bool,
    as_json: bool,
    url: str,
    api_key: str | None,
) -> None:
    """Compress MODEL (a model name or mdl_ id) as a job; print its id."""
    template = read_recipe_file(recipe_file) if recipe_file else None
    stages = [parse_stage(spec) for spec in methods]
    metadata = parse_metadata(metadata_pairs)
    with api_session(url, api_key) as api:
        body = build_job_body(
            model_id=resolve_id(api, "models", model),
            template=template,
            stages=stages,
            calibration_id=calibration and resolve_id(api, "datasets", calibration),
            evaluation_id=evaluation and resolve_id(api, "datasets", evaluation),
            metrics=metrics,
            metadata=metadata,
        )
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        job = api.post("/v1/jobs", body, headers=headers)
        if not wait:
            echo_json(job) if as_json else click.echo(job["id"])
            return
        if not as_json:
            click.echo(job["id"])
        view = ProgressView(enabled=not as_json)
        try:
            final = follow_job(api, job["id"], view)
        except KeyboardInterrupt:
            view.close()
            click.echo(
                f"\nstopped following {job['id']}; it keeps running "
                f"(`slimformer cancel {job['id']}` stops it)",
                err=True,
            )
            raise click.exceptions.Exit(130) from None
        finally:
            view.close()
        if as_json:
            echo_json(final)
        else:
            report_outcome(api, final)
    if final["status"] != "succeeded":
        raise click.exceptions.Exit(1)


def report_outcome(api: Api, job: dict[str, Any]) -> None:
    click.echo(f"{job['id']} {job['status']}")
    if job.get("error"):
        error = job["error"]
        click.echo(f"{error.get('code')}: {error.get('message')}", err=True)
    if job.get("metrics"):
        click.echo(metrics_table(job["metrics"]))
        if job["metrics"].get("trials"):
            click.echo(f"search trials: {len(job['metrics']['trials'])}")
    if job["status"] == "succeeded":
        artifacts = list(iter_list(api, f"/v1/jobs/{job['id']}/artifacts"))
        click.echo(artifacts_table(artifacts))
        click.echo(f"download with: slimformer download {job['id']}")


def artifacts_table(artifacts: list[dict[str, Any]]) -> str:
    return format_table(
        [
            [
                a["id"],
                a.get("kind", "-"),
                a.get("format") or "-",
                format_metric("size_bytes", a.get("size_bytes")),
                a.get("filename") or "-",
            ]
            for a in artifacts
        ],
        ["artifact", "kind", "format", "size", "filename"],
    )


@click.group(invoke_without_command=True)
@click.option(
    "--status",
    type=click.Choice(["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]),
)
@click.option("--model", metavar="MODEL", help="Only jobs of this model (name or mdl_ id)")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True, help="Print the jobs as JSON")
@connection_options
@click.pass_context
def jobs(
    ctx: click.Context,
    status: str | None,
    model: str | None,
    limit: int,
    as_json: bool,
    url: str,
    api_key: str | None,
) -> None:
    """List jobs, newest first (`jobs show JOB_ID` for one)."""
    if ctx.invoked_subcommand is not None:
        return
    with api_session(url, api_key) as api:
        model_id = resolve_id(api, "models", model) if model else None
        listed = []
        for job in iter_list(
            api, "/v1/jobs", page_size=min(limit, 100), status=status, model_id=model_id
        ):
            listed.append(job)
            if len(listed) == limit:
                break
        if as_json:
            echo_json(listed)
            return
        if not listed:
            click.echo("no jobs" + (f" with status {status}" if status else ""))
            return
        names = model_names(api, {job["model_id"] for job in listed})
        click.echo(
            format_table(
                [
                    [
                        job["id"],
                        job["status"],
                        names.get(job["model_id"], job["model_id"]),
                        progress_cell(job),
                        short_time(job.get("created_at")),
                    ]
                    for job in listed
                ],
                ["job", "status", "model", "stage / progress", "created (UTC)"],
            )
        )


def model_names(api: Api, model_ids: set[str]) -> dict[str, str]:
    names: dict[str, str] = {}
    if not model_ids:
        return names
    for item in iter_list(api, "/v1/models"):
        if item["id"] in model_ids:
            names[item["id"]] = item.get("name") or item["id"]
            if len(names) == len(model_ids):
                break
    return names


@jobs.command("show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON")
@connection_options
@click.pass_context
def jobs_show(
    ctx: click.Context, job_id: str, as_json: bool, url: str, api_key: str | None
) -> None:
    """Show one job: status, progress, metrics and artifacts."""
    url, api_key = (_inherited(ctx, "url", url), _inherited(ctx, "api_key", api_key))
    with api_session(url, api_key) as api:
        job = api.get(f"/v1/jobs/{job_id}")
        if as_json:
            echo_json(job)
            return
        progress = job.get("progress") or {}
        rows = [
            ["status", job["status"]],
            ["model", model_label(api, job["model_id"])],
            ["recipe", describe_recipe(job.get("recipe"))],
            ["attempt", f"{job.get('attempt', '-')} of {job.get('max_attempts', '-')}"],
            ["created", short_time(job.get("created_at"))],
            ["started", short_time(job.get("started_at"))],
            ["finished", short_time(job.get("finished_at"))],
        ]
        if job["status"] in ("running", "cancelling"):
            eta = progress.get("eta_s")
            rows.append(
                [
                    "progress",
                    " ".join(
                        filter(
                            None,
                            [
                                progress_cell(job),
                                progress.get("message"),
                                f"eta {format_duration(eta)}" if _is_number(eta) else None,
                            ],
                        )
                    ),
                ]
            )
        if job.get("metadata"):
            rows.append(["metadata", ", ".join(f"{k}={v}" for k, v in job["metadata"].items())])
        if job.get("error"):
            rows.append(["error", f"{job['error'].get('code')}: {job['error'].get('message')}"])
        click.echo(job["id"])
        click.echo(format_table(rows))
        if job.get("metrics"):
            click.echo()
            click.echo(metrics_table(job["metrics"]))
        if job.get("artifact_ids"):
            click.echo()
            click.echo(artifacts_table(list(iter_list(api, f"/v1/jobs/{job_id}/artifacts"))))


def model_label(api: Api, model_id: str) -> str:
    try:
        return f"{api.get(f'/v1/models/{model_id}').get('name')} ({model_id})"
    except ApiError:  # deleted since; the id is still worth showing
        return model_id


def _inherited(ctx: click.Context, name: str, value: Any) -> Any:
    """A connection option given to `jobs` (before `show`) counts unless `show` got its own."""
    if ctx.get_parameter_source(name) in (click.core.ParameterSource.DEFAULT, None) and ctx.parent:
        return ctx.parent.params.get(name, value)
    return value


@click.command()
@click.argument("job_or_artifact_id")
@click.option(
    "-o",
    "--output",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Folder to write into",
)
@click.option(
    "--kind",
    type=click.Choice(["model", "report", "log"]),
    default="model",
    show_default=True,
    help="Which of a job's artifacts to download",
)
@click.option(
    "--extract",
    is_flag=True,
    help="Unpack the archive next to it, into a folder named like it (the model's files inside)",
)
@connection_options
def download(
    job_or_artifact_id: str,
    directory: Path,
    kind: str,
    extract: bool,
    url: str,
    api_key: str | None,
) -> None:
    """Download a job's compressed model (or one artifact by art_ id), verified by sha256."""
    with api_session(url, api_key) as api:
        if job_or_artifact_id.startswith("art_"):
            wanted = [{"id": job_or_artifact_id}]
        else:
            artifacts = list(iter_list(api, f"/v1/jobs/{job_or_artifact_id}/artifacts"))
            wanted = [artifact for artifact in artifacts if artifact.get("kind") == kind]
            if not wanted:
                present = ", ".join(a.get("kind", "?") for a in artifacts) or "none"
                raise CommandError(
                    "not_found",
                    f"job {job_or_artifact_id} has no {kind} artifact (it has: {present})",
                )
        for artifact in wanted:
            path = download_artifact(
                api,
                artifact["id"],
                directory,
                expected_sha256=artifact.get("sha256"),
                filename=local_filename(artifact),
            )
            click.echo(str(path))
            if extract:
                click.echo(str(safe_extract(path, extraction_folder(path))))


@click.command()
@click.argument("job_id")
@connection_options
def cancel(job_id: str, url: str, api_key: str | None) -> None:
    """Ask a queued or running job to stop (it stops between steps)."""
    with api_session(url, api_key) as api:
        job = api.post(f"/v1/jobs/{job_id}/cancel")
        click.echo(f"{job.get('id', job_id)} {job.get('status', 'cancelling')}")
