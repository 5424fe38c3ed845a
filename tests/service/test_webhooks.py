"""Webhooks against a real local HTTP receiver that checks every signature with the Standard
Webhooks reference library (`standardwebhooks`), on both backends."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from tests.conftest import (
    Service,
    builtin_id,
    free_port,
    service_env,
    wait_for,
    wait_for_model,
)
from tests.service.conftest import tar_gz

pytestmark = pytest.mark.service

FAST_EVAL = {
    "metrics": ["embedding_cosine", "size"],
    "max_samples": 8,
    "seq_len": 16,
}
RETRY_WINDOW_S = 8


@dataclass
class Arrival:
    path: str
    webhook_id: str
    type: str
    payload: dict
    verified: bool
    received_at: datetime


@dataclass
class Receiver:
    """A real HTTP server. Each path has a secret to verify with and, optionally, the status codes
    to answer in turn (then 200), or a gate: the first request waits until the test opens it."""

    port: int
    secrets: dict[str, str] = field(default_factory=dict)
    answers: dict[str, list[int]] = field(default_factory=dict)
    gates: dict[str, tuple[threading.Event, threading.Event]] = field(default_factory=dict)
    arrivals: list[Arrival] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str) -> list[Arrival]:
        with self.lock:
            return [arrival for arrival in self.arrivals if arrival.path == path]

    def wait(self, path: str, predicate, timeout: float = 120) -> list[Arrival]:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.at(path)
            if predicate(got):
                return got
            time.sleep(0.2)
        raise AssertionError(f"{path}: {[(a.type, a.webhook_id) for a in self.at(path)]}")


def start_receiver() -> tuple[Receiver, ThreadingHTTPServer]:
    receiver = Receiver(port=free_port())

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            received_at = datetime.now(UTC)
            headers = {key.lower(): value for key, value in self.headers.items()}
            verified = True
            try:
                payload = Webhook(receiver.secrets[self.path]).verify(body, headers)
            except (WebhookVerificationError, KeyError):
                verified, payload = False, json.loads(body or b"{}")
            with receiver.lock:
                receiver.arrivals.append(
                    Arrival(
                        self.path,
                        headers.get("webhook-id", ""),
                        payload.get("type", ""),
                        payload,
                        verified,
                        received_at,
                    )
                )
                pending = receiver.answers.get(self.path) or []
                status = pending.pop(0) if pending else 200
                gate = receiver.gates.pop(self.path, None)
            if gate is not None:
                arrived, release = gate
                arrived.set()
                release.wait(60)
            self.send_response(status if verified else 400)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", receiver.port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return receiver, server


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    found, server = start_receiver()
    yield found
    server.shutdown()


@pytest.fixture(scope="module")
def hooks_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    data_dir = tmp_path_factory.mktemp("webhooks")
    env, cleanup = service_env(
        data_dir,
        SLIMFORMER_WEBHOOK_ALLOWED_HOSTS=json.dumps(["127.0.0.1"]),
        SLIMFORMER_WEBHOOK_TIMEOUT_S="3",
        SLIMFORMER_WEBHOOK_BACKOFF_BASE_S="0.3",
        SLIMFORMER_WEBHOOK_RETRY_WINDOW_S=str(RETRY_WINDOW_S),
        SLIMFORMER_WEBHOOK_SWEEP_AFTER_S="2",
        SLIMFORMER_WEBHOOK_PROGRESS_INTERVAL_S="3600",
    )
    svc = Service(env=env, data_dir=data_dir, base_url=f"http://127.0.0.1:{free_port()}")
    try:
        svc.cli("migrate")
        svc.start_api()
        svc.start_worker()  # a job worker brings its webhook worker along
        yield svc
    finally:
        svc.stop()
        cleanup()


def endpoint(client: httpx.Client, receiver: Receiver, path: str, events: list[str]) -> dict:
    response = client.post(
        "/v1/webhook-endpoints",
        json={"url": receiver.url(path), "events": events, "description": path},
    )
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["secret"].startswith("whsec_") and created["id"].startswith("whk_")
    receiver.secrets[path] = created["secret"]
    return created


def upload_model(client: httpx.Client, folder: Path) -> dict:
    response = client.post(
        "/v1/models", files={"file": ("m.tar.gz", tar_gz(folder))}, data={"name": "tiny"}
    )
    assert response.status_code == 201, response.text
    return wait_for_model(client, response.json())


def deliveries(client: httpx.Client, endpoint_id: str) -> list[dict]:
    response = client.get(f"/v1/webhook-endpoints/{endpoint_id}/deliveries")
    assert response.status_code == 200, response.text
    return response.json()["data"]


def test_endpoints_show_the_secret_once_and_follow_tenancy(
    hooks_service: Service, receiver: Receiver
) -> None:
    with hooks_service.client("alpha") as alpha, hooks_service.client("beta") as beta:
        created = endpoint(alpha, receiver, "/crud", ["job.succeeded"])
        shown = alpha.get(f"/v1/webhook-endpoints/{created['id']}").json()
        assert shown["secret"] is None and shown["url"] == created["url"]
        assert shown["status"] == "enabled" and shown["events"] == ["job.succeeded"]
        assert created["id"] in [
            row["id"] for row in alpha.get("/v1/webhook-endpoints").json()["data"]
        ]
        assert beta.get("/v1/webhook-endpoints").json()["data"] == []
        base = f"/v1/webhook-endpoints/{created['id']}"
        for method, path in (
            ("GET", base),
            ("DELETE", base),
            ("POST", f"{base}/rotate-secret"),
            ("GET", f"{base}/deliveries"),
            ("POST", f"{base}/deliveries/msg_nope/redeliver"),
        ):
            response = beta.request(method, path)
            assert response.status_code == 404, (method, path, response.text)
            assert response.json()["error"]["code"] == "not_found"
        rotated = alpha.post(f"{base}/rotate-secret").json()
        assert rotated["secret"].startswith("whsec_") and rotated["secret"] != created["secret"]
        bad = alpha.post(
            "/v1/webhook-endpoints", json={"url": receiver.url("/x"), "events": ["job.exploded"]}
        )
        assert bad.status_code == 422 and bad.json()["error"]["param"].startswith("events")
        assert alpha.delete(base).status_code == 204
        assert alpha.get(base).status_code == 404


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.2:8080/hook",  # loopback, not the allow-listed address
        "http://[::1]/hook",
        "http://169.254.169.254/latest/meta-data",  # cloud metadata
        "http://10.1.2.3/hook",
        "http://192.168.0.1/hook",
        "ftp://example.com/hook",
        "file:///etc/passwd",
    ],
)
def test_unsafe_destinations_are_refused(hooks_service: Service, url: str) -> None:
    with hooks_service.client("alpha") as client:
        response = client.post("/v1/webhook-endpoints", json={"url": url, "events": ["job.failed"]})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["request_id"].startswith("req_")  # every error names its request
        assert error == {
            "code": "invalid_request",
            "message": error["message"],
            "param": "url",
            "request_id": error["request_id"],
        }
        before = client.get("/v1/jobs").json()["data"]
        job = client.post(
            "/v1/jobs",
            json={
                "model_id": builtin_id(client, "models", "all-MiniLM-L6-v2"),
                "recipe": {"stages": [{"method": "dynamic_int8"}]},
                "webhook": {"url": url},
            },
        )
        assert job.status_code == 422, job.text
        assert job.json()["error"]["param"] == "webhook.url"
        assert client.get("/v1/jobs").json()["data"] == before  # no job was created


def test_job_lifecycle_delivers_started_then_succeeded(
    hooks_service: Service, receiver: Receiver, tiny_bert: Path
) -> None:
    with hooks_service.client("alpha") as client:
        project_hook = endpoint(
            client,
            receiver,
            "/project",
            ["job.started", "job.progress", "job.succeeded", "model.ready"],
        )
        model = upload_model(client, tiny_bert)
        assert model["status"] == "ready"
        response = client.post(
            "/v1/jobs",
            json={
                "model_id": model["id"],
                "recipe": {"stages": [{"method": "dynamic_int8"}]},
                "evaluation": FAST_EVAL,
                "webhook": {"url": receiver.url("/job-own"), "events": ["job.succeeded"]},
            },
        )
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["webhook"]["secret"].startswith("whsec_")
        receiver.secrets["/job-own"] = job["webhook"]["secret"]
        assert client.get(f"/v1/jobs/{job['id']}").json()["webhook"]["secret"] is None
        assert wait_for(client, job["id"], {"succeeded", "failed"})["status"] == "succeeded"

        got = receiver.wait("/project", lambda got: "job.succeeded" in [a.type for a in got])
        own = receiver.wait("/job-own", lambda got: len(got) >= 1)
    assert all(arrival.verified for arrival in got + own)
    types = [arrival.type for arrival in got]
    model_ready = [a for a in got if a.type == "model.ready"]
    assert len(model_ready) == 1 and model_ready[0].payload["data"]["id"] == model["id"]
    job_types = [t for t in types if t != "job.progress" and t.startswith("job.")]
    assert job_types == ["job.started", "job.succeeded"]
    assert types.count("job.progress") == 1  # throttled: one per endpoint per interval
    succeeded = next(a for a in got if a.type == "job.succeeded").payload
    assert succeeded["data"]["id"] == job["id"] and succeeded["data"]["object"] == "job"
    assert succeeded["data"]["status"] == "succeeded"
    assert succeeded["data"]["link"].endswith(f"/v1/jobs/{job['id']}")
    assert [a.type for a in own] == ["job.succeeded"]  # its own events, only those it asked for
    with hooks_service.client("alpha") as client:
        logged = deliveries(client, project_hook["id"])
    assert {row["event"] for row in logged} >= {"job.started", "job.succeeded", "model.ready"}
    for row in logged:
        assert row["status"] == "delivered", row
        assert row["attempts"][-1]["status_code"] == 200
        assert row["attempts"][-1]["latency_ms"] > 0


def test_failed_deliveries_are_retried_with_the_same_webhook_id(
    hooks_service: Service, receiver: Receiver, tiny_bert: Path
) -> None:
    receiver.answers["/flaky"] = [500, 500]
    with hooks_service.client("alpha") as client:
        hook = endpoint(client, receiver, "/flaky", ["model.ready"])
        model = upload_model(client, tiny_bert)
        got = receiver.wait("/flaky", lambda got: len(got) >= 3)
        assert all(arrival.verified for arrival in got)
        assert {arrival.webhook_id for arrival in got} == {got[0].webhook_id}
        assert got[0].payload["data"]["id"] == model["id"]
        deadline = time.monotonic() + 30
        while (logged := deliveries(client, hook["id"]))[0]["status"] != "delivered":
            assert time.monotonic() < deadline, logged
            time.sleep(0.2)
        assert len(logged) == 1 and logged[0]["id"] == got[0].webhook_id
        attempts = logged[0]["attempts"]
        assert [row["status_code"] for row in attempts] == [500, 500, 200]
        assert [row["attempt"] for row in attempts] == [1, 2, 3]
        assert attempts[0]["error"] == "HTTP 500" and attempts[2]["error"] is None

        redelivered = client.post(
            f"/v1/webhook-endpoints/{hook['id']}/deliveries/{logged[0]['id']}/redeliver"
        )
        assert redelivered.status_code == 202, redelivered.text
        again = receiver.wait("/flaky", lambda got: len(got) >= 4)
        assert again[-1].webhook_id == got[0].webhook_id and again[-1].verified


def test_an_endpoint_failing_for_the_whole_window_is_disabled(
    hooks_service: Service, receiver: Receiver, tiny_bert: Path
) -> None:
    receiver.answers["/down"] = [503] * 1000
    with hooks_service.client("alpha") as client:
        hook = endpoint(client, receiver, "/down", ["model.ready"])
        upload_model(client, tiny_bert)
        deadline = time.monotonic() + RETRY_WINDOW_S + 60
        while (shown := client.get(f"/v1/webhook-endpoints/{hook['id']}").json())[
            "status"
        ] == "enabled":
            assert time.monotonic() < deadline, shown
            time.sleep(0.3)
        assert shown["status"] == "disabled" and "HTTP 503" in shown["disabled_reason"]
        logged = deliveries(client, hook["id"])
        assert logged[0]["status"] == "failed" and len(logged[0]["attempts"]) >= 2
    arrivals = receiver.at("/down")
    assert len({arrival.webhook_id for arrival in arrivals}) == 1
    assert all(arrival.verified for arrival in arrivals)


@pytest.mark.faults
def test_sigkill_between_transition_and_delivery_still_delivers_once(
    hooks_service: Service, receiver: Receiver, tiny_bert: Path
) -> None:
    """The worker (and its webhook worker) dies with the delivery in flight, its outcome unknown;
    the outbox row survives, the sweeper re-sends it, and the receiver sees one webhook-id."""
    arrived, release = threading.Event(), threading.Event()
    receiver.gates["/killed"] = (arrived, release)
    with hooks_service.client("alpha") as client:
        hook = endpoint(client, receiver, "/killed", ["job.succeeded"])
        model = upload_model(client, tiny_bert)
        job = client.post(
            "/v1/jobs",
            json={
                "model_id": model["id"],
                "recipe": {"stages": [{"method": "dynamic_int8"}]},
                "evaluation": FAST_EVAL,
            },
        ).json()
        assert arrived.wait(300), hooks_service.logs()
        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"
        for worker in list(hooks_service.workers):
            hooks_service.kill_worker(worker)
        hooks_service.workers.clear()
        release.set()
        assert [row["status"] for row in deliveries(client, hook["id"])] == ["pending"]
        hooks_service.start_worker("second")
        got = receiver.wait("/killed", lambda got: len(got) >= 2)
        deadline = time.monotonic() + 60
        while (logged := deliveries(client, hook["id"]))[0]["status"] != "delivered":
            assert time.monotonic() < deadline, logged
            time.sleep(0.2)
    assert all(arrival.verified for arrival in got)
    assert [arrival.type for arrival in got] == ["job.succeeded"] * len(got)
    assert {arrival.webhook_id for arrival in got} == {logged[0]["id"]}
    assert len(logged) == 1
