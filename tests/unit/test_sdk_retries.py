"""The SDK's retries against a real HTTP peer (stdlib `http.server` in a thread) that answers 503 or
429 with `Retry-After` before it answers 200, and against a port nobody listens on yet."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from slimformer.client import (
    AsyncClient,
    Client,
    RetryPolicy,
    ServiceUnreachable,
    SlimformerError,
)

DATASET = {
    "id": "dset_1",
    "object": "dataset",
    "name": "lines",
    "status": "ready",
    "format": "txt",
    "num_records": 3,
    "created_at": "2026-01-01T00:00:00Z",
}


class Peer(BaseHTTPRequestHandler):
    """Answers `busy` (a list of (status, Retry-After); status None: answer normally) in turn,
    then 201/200 with a dataset."""

    def handle_any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        server: Any = self.server
        server.seen.append(
            {
                "method": self.command,
                "path": self.path,
                "key": self.headers.get("Idempotency-Key"),
                "body": body,
                "at": time.monotonic(),
            }
        )
        status, retry_after = server.busy.pop(0) if server.busy else (None, "")
        if status is not None:
            code = "rate_limited" if status == 429 else "unavailable"
            self.send(
                status,
                {"error": {"code": code, "message": "try later", "param": None}},
                {"Retry-After": retry_after, "X-Request-ID": "req_peer"},
            )
            return
        self.send(201 if self.command == "POST" else 200, DATASET, {})

    do_GET = do_POST = handle_any

    def send(self, status: int, body: Any, headers: dict[str, str]) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def peer(
    busy: list[tuple[int, str]], *, port: int = 0, start_after_s: float = 0.0
) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []
    box: dict[str, ThreadingHTTPServer] = {}

    def run() -> None:
        time.sleep(start_after_s)
        server = ThreadingHTTPServer(("127.0.0.1", port), Peer)
        server.busy, server.seen = list(busy), seen  # type: ignore[attr-defined]
        box["server"] = server
        server.serve_forever(0.05)

    if port == 0:  # bind now, so the URL is known
        server = ThreadingHTTPServer(("127.0.0.1", 0), Peer)
        server.busy, server.seen = list(busy), seen  # type: ignore[attr-defined]
        box["server"] = server
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        port = server.server_port
    else:
        thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        deadline = time.monotonic() + 5
        while "server" not in box and time.monotonic() < deadline:
            time.sleep(0.05)
        box["server"].shutdown()
        box["server"].server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_503_with_retry_after_twice_then_200_is_waited_out():
    with peer([(503, "1"), (503, "1")]) as (url, seen), Client(url, api_key="sk_test") as client:
        dataset = client.datasets.get("dset_1")
    assert dataset.id == "dset_1" and dataset.num_records == 3
    assert len(seen) == 3
    gaps = [b["at"] - a["at"] for a, b in zip(seen, seen[1:], strict=False)]
    assert all(gap >= 0.95 for gap in gaps), gaps  # Retry-After: 1 is honoured each time


def test_a_create_retried_after_429_sends_the_same_idempotency_key_and_body(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("one\ntwo\nthree\n")
    retry = RetryPolicy(max_retries=3, backoff_s=0.01)
    with peer([(429, "0"), (503, "0")]) as (url, seen), Client(url, retry=retry) as client:
        dataset = client.datasets.upload(lines, name="lines")
    assert dataset.name == "lines"
    keys = {request["key"] for request in seen}
    assert len(seen) == 3 and len(keys) == 1 and next(iter(keys)).startswith("sdk-")
    assert all(
        b"one\ntwo\nthree" in request["body"] for request in seen
    )  # the whole file each time


def test_when_the_retries_run_out_the_error_carries_the_envelope():
    retry = RetryPolicy(max_retries=1, backoff_s=0.01)
    with (
        peer([(503, "0"), (503, "0"), (503, "0")]) as (url, seen),
        Client(url, retry=retry) as client,
        pytest.raises(SlimformerError) as raised,
    ):
        client.jobs.get("job_1")
    error = raised.value
    assert (error.status, error.code, error.message) == (503, "unavailable", "try later")
    assert error.request_id == "req_peer" and error.param is None
    assert len(seen) == 2


def test_a_service_that_comes_up_late_is_reached_after_connection_retries():
    port = free_port()
    retry = RetryPolicy(max_retries=6, backoff_s=0.1, max_delay_s=0.5)
    with peer([], port=port, start_after_s=0.4) as (url, seen), Client(url, retry=retry) as client:
        assert client.datasets.get("dset_1").id == "dset_1"
    assert len(seen) == 1
    with (
        Client(url, retry=RetryPolicy(max_retries=1, backoff_s=0.01)) as client,
        pytest.raises(ServiceUnreachable) as raised,
    ):
        client.datasets.get("dset_1")
    assert raised.value.code == "service_unreachable" and raised.value.status is None


def test_the_async_client_honours_retry_after_too(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_bytes(b"line\n" * 50_000)

    async def main() -> tuple[Any, Any, float]:
        async with AsyncClient(url, retry=RetryPolicy(backoff_s=0.01)) as client:
            uploaded = await client.datasets.upload(lines, name="lines")
            started = time.monotonic()
            dataset = await client.datasets.get("dset_1")
            return dataset, uploaded, time.monotonic() - started

    with peer([(503, "0"), (None, ""), (429, "1")]) as (url, seen):
        dataset, uploaded, took = asyncio.run(main())
    assert dataset.id == "dset_1" and took >= 0.95
    assert uploaded.id == "dset_1" and len(seen) == 4
    posts = [request for request in seen if request["method"] == "POST"]
    assert len(posts) == 2 and posts[0]["key"] == posts[1]["key"]
    assert all(lines.read_bytes() in request["body"] for request in posts)


def test_the_sdk_imports_neither_torch_nor_the_service():
    probe = (
        "import sys, slimformer.client; "
        "print(sorted(m for m in ('torch', 'transformers', 'app', 'workers', 'tqdm') "
        "if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"
