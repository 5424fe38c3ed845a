"""The client's own logic: SSE decoding and resumption, name→id resolution across pages, resumable
verified downloads, and extraction that refuses unsafe archives. Where HTTP is involved the other
end is a real local HTTP server speaking just enough of the protocol (paging, Range, SSE)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import click
import pytest
from click.testing import CliRunner

from slimformer.cli import cli
from slimformer.client import Client, SlimformerError, SSEDecoder, SSEEvent, job_event
from slimformer.commands import (
    CommandError,
    UnsafeArchive,
    build_job_body,
    current_umask,
    download_artifact,
    extraction_folder,
    follow_job,
    parse_metadata,
    parse_stage,
    register_client_commands,
    resolve_id,
    safe_extract,
)
from slimformer.display import ProgressView, metrics_table

# --- a real HTTP server whose behaviour each test writes --------------------------------------


class Handler(BaseHTTPRequestHandler):
    route: Callable[[Handler], None]

    def do_GET(self) -> None:  # noqa: N802 - the http.server naming
        self.server.requests.append(  # type: ignore[attr-defined]
            {"method": self.command, "path": self.path, "headers": dict(self.headers)}
        )
        type(self).route(self)

    do_POST = do_GET

    @property
    def url(self) -> tuple[str, dict[str, str]]:
        parts = urlsplit(self.path)
        return parts.path, {k: v[0] for k, v in parse_qs(parts.query).items()}

    def send_json(self, status: int, body: Any) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def serve(route: Callable[[Handler], None]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    handler = type("RouteHandler", (Handler,), {"route": staticmethod(route)})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", server.requests  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()


# --- Server-Sent Events -----------------------------------------------------------------------


def test_sse_joins_multi_line_data_and_reads_every_field():
    decoder = SSEDecoder()
    lines = [
        ": keep-alive",
        "id: 1",
        "event: progress",
        'data: {"a":',
        "data:  1}",
        "",
        "id: 2",
        "data",
        "",
        "retry: 2500",
        "data:no-space",
        "",
        "event: ignored-without-data",
        "",
    ]
    events = list(decoder.feed_all(lines))
    assert events == [
        SSEEvent(data='{"a":\n 1}', event="progress", id="1"),  # one leading space is eaten
        SSEEvent(data="", event="message", id="2"),  # a bare `data` line is an empty value
        SSEEvent(data="no-space", event="message", id="2"),  # the id carries over
    ]
    assert decoder.retry_ms == 2500
    assert decoder.last_event_id == "2"


def test_last_event_id_moves_only_when_an_event_is_complete():
    decoder = SSEDecoder(last_event_id="4")
    assert list(decoder.feed_all(["id: 5", "data: whole", ""])) == [SSEEvent(data="whole", id="5")]
    assert list(decoder.feed_all(["id: 6", "data: half of it"])) == []  # the connection dies here
    assert decoder.last_event_id == "5"
    decoder.reset_partial()
    assert list(decoder.feed_all([""])) == []  # the half event is not dispatched late
    assert decoder.last_event_id == "5"
    list(decoder.feed_all(["id: 9", ""]))  # an id alone still counts as seen
    assert decoder.last_event_id == "9"
    list(decoder.feed_all(["id: 1\0", ""]))  # ids with NUL are ignored
    assert decoder.last_event_id == "9"


def test_job_event_reads_the_event_object_or_wraps_bare_data():
    whole = {
        "seq": 3,
        "type": "progress",
        "level": "info",
        "message": "block 2/6",
        "data": {"fraction": 0.3},
        "created_at": "2025-01-01T00:00:00Z",
    }
    event = job_event(SSEEvent(data=json.dumps(whole), event="progress", id="3"))
    assert event.to_dict() == whole
    bare = job_event(SSEEvent(data='{"status": "running"}', event="status", id="4"))
    assert (bare.type, bare.data, bare.seq) == ("status", {"status": "running"}, 4)
    text = job_event(SSEEvent(data="hello", event="log", id="5"))
    assert (text.type, text.message, text.data, text.seq) == ("log", "hello", None, 5)


def sse(seq: int, kind: str, data: dict[str, Any]) -> bytes:
    event = {
        "seq": seq,
        "type": kind,
        "level": "info",
        "message": f"{kind} {seq}",
        "data": data,
        "created_at": "2025-01-01T00:00:00Z",
    }
    return f"id: {seq}\nevent: {kind}\ndata: {json.dumps(event)}\n\n".encode()


@pytest.mark.parametrize("drop", ["clean_end", "broken_body", "last_event_missing"])
def test_follow_job_resumes_after_the_last_complete_event(drop):
    events = [
        (1, "status", {"status": "running"}),
        (2, "progress", {"fraction": 0.5}),
        (3, "progress", {"fraction": 0.9}),
        (4, "status", {"status": "succeeded"}),
    ]
    stream = [sse(*event) for event in events]
    state = {"status": "running"}

    def route(handler: Handler) -> None:
        path, query = handler.url
        if path == "/v1/jobs/job_1":
            handler.send_json(200, {"id": "job_1", "status": state["status"]})
            return
        if handler.headers["Accept"] != "text/event-stream":
            after = int(query["after"])
            handler.send_json(
                200,
                {
                    "object": "list",
                    "has_more": False,
                    "data": [
                        json.loads(sse(*event).split(b"data: ")[1]) for event in events[after:]
                    ],
                },
            )
            return
        after = int(handler.headers.get("Last-Event-ID", "0"))
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        if after == 0:
            body = b"".join(stream[:2]) + stream[2][:-20]  # event 3 is cut off mid-way
            if drop == "broken_body":
                handler.send_header("Content-Length", str(len(body) + 1000))
            handler.end_headers()
            handler.wfile.write(body)
            return
        handler.end_headers()
        # the stream breaks off before the terminal event, which the job then has anyway
        handler.wfile.write(
            b"".join(stream[after:-1] if drop == "last_event_missing" else stream[after:])
        )
        state["status"] = "succeeded"

    seen: list[dict[str, Any]] = []
    with serve(route) as (url, requests):
        api = Client(url)
        final = follow_job(api, "job_1", seen.append, reconnect_delay_s=0)
        api.close()
    assert final["status"] == "succeeded"
    assert [event["seq"] for event in seen] == [1, 2, 3, 4]
    assert seen[2]["data"] == {"fraction": 0.9}
    resumed_from = [
        r["headers"].get("Last-Event-ID")
        for r in requests
        if r["headers"].get("Accept") == "text/event-stream"
    ]
    assert resumed_from == [None, "2"]
    drained_after = [
        r["path"].split("after=")[1].split("&")[0] for r in requests if "/events?" in r["path"]
    ]
    assert drained_after == ["3" if drop == "last_event_missing" else "4"]


def test_progress_view_reports_stages_and_status_changes(capsys):
    view = ProgressView()
    view({"type": "status", "message": "status: running on gpu-1", "data": {"status": "running"}})
    for fraction in (0.1, 0.6):
        view(
            {
                "type": "progress",
                "message": "block",
                "data": {
                    "stage": "rtn",
                    "stage_index": 1,
                    "num_stages": 2,
                    "fraction": fraction,
                    "eta_s": 75,
                },
            }
        )
    view({"type": "log", "level": "warning", "message": "lm_head left in float"})
    view({"type": "log", "level": "info", "message": "chatter"})
    view.close()
    lines = [line.split(" ", 1)[1] for line in capsys.readouterr().err.splitlines()]
    assert lines == [
        "status: running on gpu-1",
        "rtn",
        "warning: lm_head left in float",
    ]
    assert view.bar.n == 600


def test_progress_view_ends_full_with_one_eta_and_the_servers_label():
    view = ProgressView()
    label = "stage 1 of 2 · gptq · block 12/30"
    view(
        {
            "type": "progress",
            "message": "calibrated model.layers.11",
            "data": {
                "stage": "gptq",
                "stage_index": 2,
                "fraction": 0.8,
                "eta_s": 75,
                "label": label,
            },
        }
    )
    assert view.bar.desc == label
    assert view.bar.postfix == "eta 1m15s"  # the one ETA; the message repeats none
    view({"type": "status", "message": "status: succeeded", "data": {"status": "succeeded"}})
    assert view.bar.n == 1000
    assert "100%" in str(view.bar)
    view.close()


# --- Name resolution --------------------------------------------------------------------------


def model_listing(models: list[dict[str, Any]]) -> Callable[[Handler], None]:
    """`GET /v1/models` as the contract pages it: newest (largest id) first, cursor `after`."""
    ordered = sorted(models, key=lambda m: m["id"], reverse=True)

    def route(handler: Handler) -> None:
        path, query = handler.url
        assert path == "/v1/models"
        limit = int(query.get("limit", 20))
        rest = [m for m in ordered if "after" not in query or m["id"] < query["after"]]
        handler.send_json(
            200, {"object": "list", "data": rest[:limit], "has_more": len(rest) > limit}
        )

    return route


def test_resolve_id_pages_until_it_finds_the_name():
    models = [{"id": f"mdl_{i:04d}", "name": f"model-{i}", "status": "ready"} for i in range(250)]
    models[10]["name"] = "the-one"  # old, so on the third page
    with serve(model_listing(models)) as (url, requests):
        api = Client(url)
        assert resolve_id(api, "models", "the-one") == "mdl_0010"
        assert resolve_id(api, "models", "mdl_0099") == "mdl_0099"  # an id costs no request
        api.close()
    cursors = [parse_qs(urlsplit(r["path"]).query).get("after", [None])[0] for r in requests]
    assert cursors == [None, "mdl_0150", "mdl_0050"]


def test_resolve_id_prefers_the_one_ready_match_and_refuses_to_guess():
    models = [
        {"id": "mdl_1", "name": "bert", "status": "rejected"},
        {"id": "mdl_2", "name": "bert", "status": "ready"},
        {"id": "mdl_3", "name": "gpt", "status": "ready"},
        {"id": "mdl_4", "name": "gpt", "status": "ready"},
    ]
    with serve(model_listing(models)) as (url, _):
        api = Client(url)
        assert resolve_id(api, "models", "bert") == "mdl_2"
        with pytest.raises(SlimformerError) as ambiguous:
            resolve_id(api, "models", "gpt")
        with pytest.raises(CommandError) as missing:
            resolve_id(api, "models", "llama")
        api.close()
    assert ambiguous.value.code == "ambiguous" and "mdl_3" in ambiguous.value.message
    assert missing.value.code == "not_found"


# --- Downloads --------------------------------------------------------------------------------

CONTENT = os.urandom(3 * 1024 * 1024 + 123)
CONTENT_SHA = hashlib.sha256(CONTENT).hexdigest()


def artifact_route(content: bytes = CONTENT, sha: str = CONTENT_SHA) -> Callable[[Handler], None]:
    def route(handler: Handler) -> None:
        start = 0
        requested = handler.headers.get("Range")
        if requested:
            start = int(requested.removeprefix("bytes=").rstrip("-"))
            if start >= len(content):
                handler.send_response(416)
                handler.send_header("Content-Range", f"bytes */{len(content)}")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
        handler.send_response(206 if requested else 200)
        if requested:
            handler.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        handler.send_header("Content-Length", str(len(content) - start))
        handler.send_header("ETag", f'"{sha}"')
        handler.send_header("Accept-Ranges", "bytes")
        handler.send_header("Content-Disposition", 'attachment; filename="../model.tar.gz"')
        handler.end_headers()
        handler.wfile.write(content[start:])

    return route


def ranges(requests: list[dict[str, Any]]) -> list[str | None]:
    return [r["headers"].get("Range") for r in requests]


def test_download_resumes_a_partial_file_with_range(tmp_path):
    (tmp_path / ".art_1.part").write_bytes(CONTENT[:1_000_000])
    with serve(artifact_route()) as (url, requests):
        api = Client(url)
        path = download_artifact(api, "art_1", tmp_path, show_progress=False)
        api.close()
    assert path == tmp_path / "model.tar.gz"  # the server's `../` does not choose the folder
    assert path.read_bytes() == CONTENT
    assert ranges(requests) == ["bytes=1000000-"]
    assert not (tmp_path / ".art_1.part").exists()


def test_a_corrupt_partial_file_is_caught_by_the_hash_and_downloaded_again(tmp_path):
    (tmp_path / ".art_1.part").write_bytes(b"\0" * 1_000_000)
    with serve(artifact_route()) as (url, requests):
        api = Client(url)
        path = download_artifact(
            api, "art_1", tmp_path, show_progress=False, expected_sha256=CONTENT_SHA
        )
        api.close()
    assert path.read_bytes() == CONTENT
    assert ranges(requests) == ["bytes=1000000-", None]


def test_a_partial_file_longer_than_the_artifact_starts_over(tmp_path):
    (tmp_path / ".art_1.part").write_bytes(CONTENT + b"more")
    with serve(artifact_route()) as (url, requests):
        api = Client(url)
        path = download_artifact(api, "art_1", tmp_path, show_progress=False)
        api.close()
    assert path.read_bytes() == CONTENT
    assert ranges(requests) == [f"bytes={len(CONTENT) + 4}-", None]


def test_bytes_that_do_not_match_the_sha256_never_get_the_final_name(tmp_path):
    with serve(artifact_route(sha="0" * 64)) as (url, _):
        api = Client(url)
        with pytest.raises(SlimformerError) as mismatch:
            download_artifact(api, "art_1", tmp_path, show_progress=False)
        with pytest.raises(SlimformerError) as disagree:
            download_artifact(
                api, "art_1", tmp_path, show_progress=False, expected_sha256=CONTENT_SHA
            )
        api.close()
    assert mismatch.value.code == disagree.value.code == "checksum_mismatch"
    assert list(tmp_path.iterdir()) == []


def test_a_file_already_downloaded_is_kept_without_reading_the_body(tmp_path):
    (tmp_path / "model.tar.gz").write_bytes(CONTENT)
    before = (tmp_path / "model.tar.gz").stat().st_mtime_ns
    with serve(artifact_route()) as (url, _):
        api = Client(url)
        path = download_artifact(api, "art_1", tmp_path, show_progress=False)
        api.close()
    assert path.stat().st_mtime_ns == before


# --- Safe extraction --------------------------------------------------------------------------


def tar_with(tmp_path: Path, *members: tarfile.TarInfo, name: str = "model.tar.gz") -> Path:
    archive = tmp_path / name
    with tarfile.open(archive, "w:gz") as bundle:
        for member in members:
            data = b"x" * member.size if member.isfile() else None
            bundle.addfile(member, io.BytesIO(data) if data is not None else None)
    return archive


def member(
    name: str, kind: bytes = tarfile.REGTYPE, size: int = 1, target: str = ""
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size if kind == tarfile.REGTYPE else 0
    info.linkname = target
    return info


@pytest.fixture
def umask(request) -> Iterator[int]:
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


@pytest.mark.parametrize("umask", [0o022, 0o077], indirect=True)
def test_safe_extract_unpacks_the_model_folder_itself_with_the_umask(tmp_path, umask):
    archive = tar_with(
        tmp_path,
        member("model", tarfile.DIRTYPE),
        member("model/config.json"),
        member("model/model.safetensors", size=10),
        name="all-MiniLM-L6-v2-job_1.tar.gz",
    )
    folder = safe_extract(archive, extraction_folder(archive))
    assert folder == tmp_path / "all-MiniLM-L6-v2-job_1"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert (folder / "model.safetensors").stat().st_size == 10
    # What `mkdir` and `tar` give under this umask: 0755/0644 normally, never a private 0700.
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((folder / "config.json").stat().st_mode) == 0o644 & ~umask
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_archive_of_several_entries_unpacks_into_the_folder(tmp_path):
    archive = tar_with(tmp_path, member("config.json"), member("weights", tarfile.DIRTYPE))
    folder = safe_extract(archive, extraction_folder(archive))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "weights"]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~current_umask()


@pytest.mark.parametrize(
    "bad",
    [
        member("../escape.txt"),
        member("model/../../escape.txt"),
        member("/tmp/escape.txt"),
        member("model/link", tarfile.SYMTYPE, target="/etc/passwd"),
        member("model/hard", tarfile.LNKTYPE, target="model/config.json"),
        member("model/fifo", tarfile.FIFOTYPE),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "fifo"],
)
def test_safe_extract_refuses_unsafe_members_before_writing_anything(tmp_path, bad):
    archive = tar_with(tmp_path, member("model/config.json"), bad)
    with pytest.raises(UnsafeArchive):
        safe_extract(archive, tmp_path / "out" / "model")
    assert not (tmp_path / "out" / "model").exists()
    assert list((tmp_path / "out").iterdir()) == []  # the staging folder is gone too
    assert not (tmp_path / "escape.txt").exists()


def test_safe_extract_checks_zip_members_too(tmp_path):
    escaping = tmp_path / "escaping.zip"
    with zipfile.ZipFile(escaping, "w") as bundle:
        bundle.writestr("../escape.txt", "x")
    linking = tmp_path / "linking.zip"
    with zipfile.ZipFile(linking, "w") as bundle:
        link = zipfile.ZipInfo("model/link")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        bundle.writestr(link, "/etc/passwd")
    for archive in (escaping, linking):
        with pytest.raises(UnsafeArchive):
            safe_extract(archive, extraction_folder(archive))
        assert not extraction_folder(archive).exists()


def test_safe_extract_will_not_overwrite_a_folder(tmp_path):
    archive = tar_with(tmp_path, member("config.json"))
    (tmp_path / "model").mkdir()
    with pytest.raises(CommandError) as exists:
        safe_extract(archive, extraction_folder(archive))
    assert exists.value.code == "conflict"


# --- Building the job body --------------------------------------------------------------------


def test_stages_and_metadata_from_the_command_line():
    assert parse_stage("dynamic_int8") == {"method": "dynamic_int8"}
    assert parse_stage("rtn:bits=4,group_size=-1,symmetric=false,note=x") == {
        "method": "rtn",
        "bits": 4,
        "group_size": -1,
        "symmetric": False,
        "note": "x",
    }
    with pytest.raises(click.BadParameter):
        parse_stage("rtn:bits")
    assert parse_metadata(["team=search", "note=a=b"]) == {"team": "search", "note": "a=b"}
    with pytest.raises(click.BadParameter):
        parse_metadata(["team"])


def test_command_line_options_override_the_recipe_file():
    template = {
        "recipe": {"stages": [{"method": "dynamic_int8"}]},
        "calibration": {"dataset_id": "dset_old", "num_samples": 64},
        "evaluation": {"metrics": ["size"], "seq_len": 256},
        "metadata": {"a": "1"},
    }
    body = build_job_body(
        model_id="mdl_1",
        template=template,
        calibration_id="dset_new",
        evaluation_id="dset_eval",
        metrics=["perplexity"],
        metadata={"b": "2"},
    )
    assert body == {
        "model_id": "mdl_1",
        "recipe": {"stages": [{"method": "dynamic_int8"}]},
        "calibration": {"dataset_id": "dset_new", "num_samples": 64},
        "evaluation": {"dataset_id": "dset_eval", "metrics": ["perplexity"], "seq_len": 256},
        "metadata": {"a": "1", "b": "2"},
    }
    assert template["calibration"]["dataset_id"] == "dset_old"  # the template is not changed
    with pytest.raises(click.UsageError):
        build_job_body(model_id="mdl_1", template=template, stages=[{"method": "rtn"}])
    assert build_job_body(model_id="mdl_1", stages=[{"method": "rtn"}]) == {
        "model_id": "mdl_1",
        "recipe": {"stages": [{"method": "rtn"}]},
    }


def test_metrics_table_compares_numbers_only():
    table = metrics_table(
        {
            "baseline": {"size_bytes": 4 * 1024**2, "perplexity": 10.0, "device": "cpu"},
            "compressed": {"size_bytes": 1024**2, "perplexity": 10.5, "device": "cpu"},
        }
    )
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "baseline", "compressed", "change"]
    assert lines[1].split() == ["size_bytes", "4.0", "MiB", "1.0", "MiB", "-75.0%"]
    assert lines[2].split() == ["perplexity", "10", "10.5", "+5.0%"]
    assert len(lines) == 3


# --- Errors as the user sees them -------------------------------------------------------------


@pytest.fixture(scope="module")
def slimformer() -> click.Group:
    register_client_commands(cli)
    return cli


def test_a_service_that_is_not_running_is_named(slimformer):
    with serve(lambda handler: None) as (url, _):
        pass  # the port is now free: nothing listens there
    result = CliRunner().invoke(slimformer, ["jobs", "--url", url])
    assert result.exit_code == 2
    assert f"isn't running at {url}" in result.stderr


def test_api_errors_print_code_and_message_and_exit_2(slimformer):
    def route(handler: Handler) -> None:
        handler.send_json(
            409,
            {
                "error": {
                    "code": "conflict",
                    "param": None,
                    "message": "job job_1 already succeeded",
                }
            },
        )

    with serve(route) as (url, requests):
        result = CliRunner().invoke(
            slimformer, ["cancel", "job_1", "--url", url, "--api-key", "sk_test"]
        )
    assert result.exit_code == 2
    assert result.stderr.strip() == "conflict: job job_1 already succeeded"
    assert requests[0]["method"] == "POST" and requests[0]["path"] == "/v1/jobs/job_1/cancel"
    assert requests[0]["headers"]["Authorization"] == "Bearer sk_test"


def test_download_extract_names_each_job_and_unpacks_the_model_itself(slimformer, tmp_path):
    """Two jobs' models side by side: each archive named after model and job (an artifact from
    before the server named them gets its job id in front), each unpacked into one folder of
    that name holding the model's files, not `model/model/`."""
    archive = tar_with(
        tmp_path,
        member("model", tarfile.DIRTYPE),
        member("model/config.json", size=3),
        name="source.tar.gz",
    )
    content = archive.read_bytes()
    sha = hashlib.sha256(content).hexdigest()
    names = {"job_1": "all-MiniLM-L6-v2-job_1.tar.gz", "job_2": "model.tar.gz"}

    def route(handler: Handler) -> None:
        path, _ = handler.url
        job = path.split("/")[3]
        if path.endswith("/artifacts"):
            artifact = {"id": f"art_{job}", "job_id": job, "kind": "model", "sha256": sha}
            handler.send_json(200, {"data": [{**artifact, "filename": names[job]}]})
        else:
            artifact_route(content, sha)(handler)

    out = tmp_path / "downloads"
    with serve(route) as (url, _):
        for job in names:
            result = CliRunner().invoke(
                slimformer, ["download", job, "--extract", "-o", str(out), "--url", url]
            )
            assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "all-MiniLM-L6-v2-job_1",
        "all-MiniLM-L6-v2-job_1.tar.gz",
        "job_2-model",
        "job_2-model.tar.gz",
    ]
    for folder in ("all-MiniLM-L6-v2-job_1", "job_2-model"):
        assert [p.name for p in (out / folder).iterdir()] == ["config.json"]
        assert stat.S_IMODE((out / folder).stat().st_mode) == 0o777 & ~current_umask()
