"""The result cache, priorities and the per-project cap, over HTTP with real workers, on both
backends. One service for the module (no worker at first), with a cap of one running job per
project; the cheap jobs that only need to start fail at once on a model whose validation rejects it.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.conftest import Service, builtin_id, running_service, wait_for

pytestmark = pytest.mark.service

TERMINAL = {"succeeded", "failed", "cancelled"}
CHEAP_EVAL = {"metrics": ["embedding_cosine", "size"], "max_samples": 8, "seq_len": 32}
ENGINE_STARTED = "preparing the model"  # the first progress message of `runner.execute`


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_service(
        tmp_path_factory.mktemp("fair"),
        worker=False,
        SLIMFORMER_MAX_RUNNING_PER_PROJECT="1",
        # The per-job webhook goes to the test's own receiver.
        SLIMFORMER_WEBHOOK_ALLOWED_HOSTS='["127.0.0.1"]',
    ) as svc:
        yield svc


def rejected_model(client: httpx.Client) -> str:
    """A model whose validation fails (a config and no weights): a job on it fails as soon as a
    worker starts it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        body = json.dumps({"model_type": "bert"}).encode()
        info = tarfile.TarInfo("config.json")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    response = client.post(
        "/v1/models",
        files={"file": ("broken.tar.gz", buffer.getvalue())},
        data={"name": "broken"},
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def submit(client: httpx.Client, body: dict) -> dict:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def events(client: httpx.Client, job_id: str) -> list[dict]:
    return client.get(f"/v1/jobs/{job_id}/events", params={"limit": 100}).json()["data"]


def wait_for_event(client: httpx.Client, job_id: str, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in event["message"] for event in events(client, job_id)):
            return
        time.sleep(0.3)
    raise AssertionError(f"{job_id} never said {text!r}: {events(client, job_id)}")


def started(job: dict) -> datetime:
    return datetime.fromisoformat(job["started_at"])


def ensure_workers(svc: Service, count: int) -> None:
    """`count` workers running and registered live (each takes one job at a time)."""
    while len(svc.workers) < count:
        svc.start_worker()
    deadline = time.monotonic() + 120
    with svc.client() as client:
        while time.monotonic() < deadline:
            live = [w for w in client.get("/v1/workers").json()["data"] if w["status"] != "lost"]
            if len(live) >= count:
                return
            time.sleep(0.3)
    raise AssertionError(f"{count} workers did not come up:\n{svc.logs()}")


def test_higher_priority_starts_first(service: Service) -> None:
    assert not service.workers, "this test queues its jobs with no worker running"
    with service.client("prio") as client:
        model_id = rejected_model(client)
        body = {"model_id": model_id, "recipe": {"stages": [{"method": "dynamic_int8"}]}}
        low = [submit(client, {**body, "priority": 0})["id"] for _ in range(5)]
        high = submit(client, {**body, "priority": 9})["id"]
        service.start_worker()
        jobs = {job_id: wait_for(client, job_id, TERMINAL) for job_id in [*low, high]}
    assert {job["status"] for job in jobs.values()} == {"failed"}, jobs
    order = sorted(jobs, key=lambda job_id: started(jobs[job_id]))
    assert order[0] == high, [(j, jobs[j]["priority"], jobs[j]["started_at"]) for j in order]
    assert order[1:] == low  # first in, first out within a priority
    # The next test's second worker starts while pytest moves on (one webhook companion is enough).
    service.start_worker(args=("--no-webhooks",))


def test_cap_defers_a_projects_second_job_and_the_cache_reuses_the_first(
    service: Service,
) -> None:
    ensure_workers(service, 2)
    with service.client("alpha") as alpha, service.client("beta") as beta, receiving() as receiver:
        body = {
            "model_id": builtin_id(alpha, "models", "all-MiniLM-L6-v2"),
            "recipe": {"stages": [{"method": "dynamic_int8"}]},
            "evaluation": {
                "dataset_id": builtin_id(alpha, "datasets", "lee-sentences"),
                **CHEAP_EVAL,
            },
        }
        first = submit(alpha, body)["id"]
        wait_for(alpha, first, {"running", *TERMINAL})
        # The same inputs while the first runs: over alpha's cap of one, it waits, deferred;
        # beta's job runs meanwhile on the other worker.
        hook = {"url": f"http://127.0.0.1:{receiver.server_port}/", "events": ["job.succeeded"]}
        second = submit(alpha, {**body, "webhook": hook})["id"]
        other = submit(beta, {"model_id": rejected_model(beta), "recipe": body["recipe"]})["id"]

        done = wait_for(alpha, first, TERMINAL, timeout=300)
        assert done["status"] == "succeeded", (done["error"], service.logs())
        reused = wait_for(alpha, second, TERMINAL)
        beta_job = wait_for(beta, other, TERMINAL)

        # Fairness: beta ran while alpha was at its cap; alpha's second job waited, not failed.
        assert beta_job["status"] == "failed"
        assert started(beta_job) < datetime.fromisoformat(done["finished_at"])
        second_events = events(alpha, second)
        assert any("waiting for a slot" in e["message"] for e in second_events), second_events
        assert started(reused) >= datetime.fromisoformat(done["finished_at"])

        # The cache: the second succeeded from the first's artifacts, without the engine, with
        # its events and its webhook.
        assert reused["status"] == "succeeded", (reused, service.logs())
        assert reused["metrics"]["reused_from"] == first
        assert "reused_from" not in done["metrics"]
        assert reused["metrics"]["compressed"] == done["metrics"]["compressed"]
        messages = [e["message"] for e in second_events]
        assert not any(ENGINE_STARTED in m for m in messages), messages
        assert not any(e["type"] == "metric" for e in second_events)
        log = [e for e in second_events if e["type"] == "log" and e["data"]]
        assert log and log[-1]["data"]["reused_from"] == first
        assert second_events[-1]["data"] == {"status": "succeeded", "reused_from": first}
        arrived = receiver.wait_for(lambda got: got)
        assert [(a["type"], a["data"]["id"]) for a in arrived] == [("job.succeeded", second)]

        original = artifacts_by_name(alpha, first)
        copies = artifacts_by_name(alpha, second)
        # The same artifacts, named as the first job's (model and job: the bytes are its).
        archive = f"all-MiniLM-L6-v2-{first}.tar.gz"
        assert set(copies) == set(original) == {archive, f"all-MiniLM-L6-v2-{first}.report.json"}
        for name, artifact in copies.items():
            assert artifact["sha256"] == original[name]["sha256"]
            assert artifact["id"] != original[name]["id"]

        # One input differs, or `cache: false`: a fresh run (seen starting the engine, then
        # cancelled: only the miss matters here). Each waits for the other under the cap.
        variants = [
            submit(alpha, {**body, "cache": False}),
            submit(alpha, {**body, "evaluation": {**body["evaluation"], "seq_len": 24}}),
        ]
        assert [job["cache"] for job in variants] == [False, True]
        for _ in variants:
            running = wait_for_one_running(alpha, [job["id"] for job in variants])
            wait_for_event(alpha, running, ENGINE_STARTED)
            assert alpha.post(f"/v1/jobs/{running}/cancel").status_code == 202
            ended = wait_for(alpha, running, TERMINAL)
            assert ended["status"] == "cancelled" and not (ended["metrics"] or {})

        # Deleting the first keeps the bytes the second still points at; deleting the second
        # too removes them.
        stored = service.data_dir / "storage" / "jobs" / first / "attempt-1" / archive
        assert stored.is_file()
        assert alpha.delete(f"/v1/jobs/{first}").status_code == 204
        content = alpha.get(f"/v1/artifacts/{copies[archive]['id']}/content")
        assert content.status_code == 200
        assert hashlib.sha256(content.content).hexdigest() == copies[archive]["sha256"]
        assert alpha.delete(f"/v1/jobs/{second}").status_code == 204
        deadline = time.monotonic() + 10
        while stored.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not stored.exists()


def artifacts_by_name(client: httpx.Client, job_id: str) -> dict[str, dict]:
    listed = client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    return {artifact["filename"]: artifact for artifact in listed}


def wait_for_one_running(client: httpx.Client, job_ids: list[str], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for job_id in job_ids:
            if client.get(f"/v1/jobs/{job_id}").json()["status"] == "running":
                return job_id
        time.sleep(0.3)
    raise AssertionError(f"none of {job_ids} started")


class Receiver(ThreadingHTTPServer):
    """A real local HTTP server that accepts every delivery and keeps its JSON body."""

    def __init__(self) -> None:
        self.arrivals: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.arrivals.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    def wait_for(self, predicate, timeout: float = 60) -> list[dict]:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(list(self.arrivals)):
                return list(self.arrivals)
            time.sleep(0.2)
        raise AssertionError(f"deliveries: {self.arrivals}")


@contextmanager
def receiving() -> Iterator[Receiver]:
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        yield receiver
    finally:
        receiver.shutdown()
        receiver.server_close()
