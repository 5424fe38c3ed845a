"""Every non-2xx answer is the JSON error envelope with a request id: bounded integers, NUL bytes
refused before the database, a bug is a 500 `internal_error`, a database that cannot be reached a
503 `unavailable` with `Retry-After`."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    BACKEND,
    Service,
    builtin_id,
    free_port,
    running_service,
    service_env,
)

pytestmark = pytest.mark.service


def envelope(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["request_id"] and error["request_id"] == response.headers["x-request-id"]
    return error


@pytest.fixture(scope="module")
def queued_job(service: Service) -> str:
    with service.client() as client:
        model_id = builtin_id(client, "models", "all-MiniLM-L6-v2")
        job = client.post(
            "/v1/jobs",
            json={"model_id": model_id, "recipe": {"stages": [{"method": "dynamic_int8"}]}},
        ).json()
        client.post(f"/v1/jobs/{job['id']}/cancel")
        return job["id"]


def test_huge_integers_are_422(service: Service, queued_job: str) -> None:
    with service.client() as client:
        for after in ("99999999999999999999999", str(2**31), str(2**63)):
            response = client.get(f"/v1/jobs/{queued_job}/events", params={"after": after})
            assert envelope(response, 422, "invalid_request")["param"] == "after"
        response = client.get(
            f"/v1/jobs/{queued_job}/events",
            headers={"Accept": "text/event-stream", "Last-Event-ID": str(2**40)},
        )
        assert envelope(response, 422, "invalid_request")["param"] == "Last-Event-ID"
        for path in ("/v1/jobs", "/v1/models", "/v1/datasets", "/v1/workers"):
            response = client.get(path, params={"limit": str(2**70)})
            assert envelope(response, 422, "invalid_request")["param"] == "limit"


def test_nul_bytes_never_reach_the_database(service: Service, queued_job: str) -> None:
    with service.client() as client:
        before = client.get("/v1/jobs", params={"limit": 100}).json()["data"]
        for path in (
            "/v1/jobs/job_%00x",
            f"/v1/jobs/{queued_job}%00",
            "/v1/models/%00",
            "/v1/datasets/ds%00/records",
            "/v1/artifacts/art_%00",
        ):
            envelope(client.get(path), 404, "not_found")
        envelope(client.delete("/v1/models/mdl_%00"), 404, "not_found")
        for params, name in (
            ({"status": "queued\x00"}, "status"),
            ({"after": "job_\x00"}, "after"),
            ({"model_id": "\x00"}, "model_id"),
            ({"metadata.team": "a\x00b"}, "metadata.team"),
        ):
            error = envelope(client.get("/v1/jobs", params=params), 422, "invalid_request")
            assert error["param"] == name
        model_id = builtin_id(client, "models", "all-MiniLM-L6-v2")
        recipe = {"stages": [{"method": "dynamic_int8"}]}
        for body, name in (
            ({"model_id": "mdl_\x00", "recipe": recipe}, "model_id"),
            ({"model_id": model_id, "recipe": recipe, "metadata": {"k": "v\x00"}}, "metadata.k"),
            (
                {"model_id": model_id, "recipe": recipe, "metadata": {"k\x00": "v"}},
                "metadata.k\x00",
            ),
        ):
            error = envelope(client.post("/v1/jobs", json=body), 422, "invalid_request")
            assert error["param"] == name
        assert client.get("/v1/jobs", params={"limit": 100}).json()["data"] == before


def test_a_server_error_is_a_500_envelope(tmp_path: Path) -> None:
    """A real fault the code does not expect (a table gone from under it) answers the envelope."""
    with running_service(tmp_path, worker=False) as service:
        url = service.env.get("SLIMFORMER_DATABASE_URL")
        if url is None:
            with sqlite3.connect(tmp_path / "slimformer.db") as conn:
                conn.execute("ALTER TABLE workers RENAME TO workers_gone")
        else:
            import psycopg

            with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
                conn.execute("ALTER TABLE workers RENAME TO workers_gone")
        with service.client() as client:
            response = client.get("/v1/workers", headers={"X-Request-ID": "trace-123"})
            error = envelope(response, 500, "internal_error")
            assert error["request_id"] == "trace-123" and "trace-123" in error["message"]
            assert client.get("/v1/jobs").status_code == 200  # the rest still answers
        assert "trace-123" in (tmp_path / "api.log").read_text()


def test_database_unreachable_is_503_with_retry_after(tmp_path: Path) -> None:
    if BACKEND == "postgres":
        url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/slimformer"  # nothing there
    else:
        url = f"sqlite:///{tmp_path / 'missing' / 'slimformer.db'}"  # cannot be opened
    env, cleanup = service_env(tmp_path, SLIMFORMER_DATABASE_URL=url, SLIMFORMER_AUTH="true")
    service = Service(env=env, data_dir=tmp_path, base_url=f"http://127.0.0.1:{free_port()}")
    try:
        service.start_api()
        headers = {"Authorization": "Bearer sk_anything"}
        with httpx.Client(base_url=service.base_url, headers=headers, timeout=60) as client:
            for method, path in (
                ("GET", "/v1/jobs"),
                ("GET", "/v1/models/mdl_x"),
                ("POST", "/v1/jobs"),
                ("GET", "/v1/workers"),
            ):
                response = client.request(method, path, json={} if method == "POST" else None)
                envelope(response, 503, "unavailable")
                assert int(response.headers["retry-after"]) > 0
    finally:
        service.stop()
        cleanup()
