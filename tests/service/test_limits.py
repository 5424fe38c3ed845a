"""Rate limits per API key and per-project quotas, on an API with tiny limits and no worker (queued
jobs stay queued: nothing runs, so nothing here costs a real job)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import BACKEND, REDIS_URL, Service, builtin_id

pytestmark = pytest.mark.service

RATE = 1.0  # tokens per second
BURST = 30
MAX_LIVE_JOBS = 3
MAX_STORED_BYTES = 10_000


@pytest.fixture(scope="module")
def limited(idle_service: Service) -> Service:
    """An API process of its own with tiny limits, on the session's service without a worker."""
    return idle_service.with_api(
        SLIMFORMER_RATE_LIMIT_PER_S=str(RATE),
        SLIMFORMER_RATE_LIMIT_BURST=str(BURST),
        SLIMFORMER_MAX_LIVE_JOBS_PER_PROJECT=str(MAX_LIVE_JOBS),
        SLIMFORMER_MAX_STORED_BYTES_PER_PROJECT=str(MAX_STORED_BYTES),
    )


def _job_spec(client: httpx.Client) -> dict:
    return {
        "model_id": builtin_id(client, "models", "all-MiniLM-L6-v2"),
        "recipe": {"stages": [{"method": "dynamic_int8"}]},
    }


def _upload(client: httpx.Client, name: str, size: int) -> httpx.Response:
    body = b"".join(b"line %06d\n" % i for i in range(size // 12 + 1))[:size]
    return client.post("/v1/datasets", files={"file": (f"{name}.txt", body)}, data={"name": name})


def _stored_datasets(svc: Service) -> list[Path]:
    return sorted((svc.data_dir / "storage" / "datasets").glob("*/data"))


def test_a_key_past_its_burst_is_429_with_retry_after_and_other_keys_are_not(
    limited: Service,
) -> None:
    with limited.client("rate-a") as first, limited.client("rate-b") as second:
        started = time.monotonic()
        answered = 0
        response = first.get("/v1/jobs")
        while response.status_code == 200 and answered < 3 * BURST:
            answered += 1
            response = first.get("/v1/jobs")
        elapsed = time.monotonic() - started
        assert response.status_code == 429, response.text
        # The bucket held BURST requests, plus what refilled while they were answered.
        assert BURST <= answered <= BURST + RATE * elapsed + 1
        error = response.json()["error"]
        assert error["code"] == "rate_limited" and error["request_id"]
        assert "1/s" in error["message"] and str(BURST) in error["message"]
        retry_after = int(response.headers["Retry-After"])
        assert 1 <= retry_after <= 1 / RATE + 1
        # Another key has its own bucket; the limited one is served again after Retry-After.
        assert second.get("/v1/jobs").status_code == 200
        time.sleep(retry_after)
        assert first.get("/v1/jobs").status_code == 200
        # Unauthenticated and health routes spend nothing: no bucket, no 429.
        assert httpx.get(f"{limited.base_url}/v1/jobs").status_code == 401
        assert httpx.get(f"{limited.base_url}/healthz").status_code == 200
    if BACKEND == "postgres":  # the bucket is in the broker's Redis, shared by API processes
        import redis

        from app.projects.service import hash_key

        prefix = limited.env["SLIMFORMER_QUEUE_PREFIX"]
        bucket = f"{prefix}ratelimit:{hash_key(limited.key('rate-a'))}"
        assert redis.Redis.from_url(REDIS_URL).exists(bucket)


def test_live_jobs_past_the_quota_are_409_naming_limit_and_usage(limited: Service) -> None:
    with limited.client("jobs-quota") as client:
        spec = _job_spec(client)
        # Submitted at once: the project lock lets exactly the quota through.
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _: client.post("/v1/jobs", json=spec), range(6)))
        accepted = [r for r in responses if r.status_code == 202]
        refused = [r for r in responses if r.status_code != 202]
        assert len(accepted) == MAX_LIVE_JOBS, [r.text for r in responses]
        for response in refused:
            assert response.status_code == 409, response.text
            error = response.json()["error"]
            assert error["code"] == "quota_exceeded"
            assert error["quota"] == {
                "name": "live_jobs",
                "limit": MAX_LIVE_JOBS,
                "usage": MAX_LIVE_JOBS,
            }
            assert f"{MAX_LIVE_JOBS} live jobs" in error["message"]
        live = client.get("/v1/jobs", params={"status": "queued,running,cancelling"}).json()
        assert len(live["data"]) == MAX_LIVE_JOBS
        # A cancelled job frees its place; a retry of it is a new job and counts like one.
        cancelled = accepted[0].json()["id"]
        assert client.post(f"/v1/jobs/{cancelled}/cancel").status_code == 202
        assert client.post("/v1/jobs", json=spec).status_code == 202
        retry = client.post(f"/v1/jobs/{cancelled}/retry")
        assert retry.status_code == 409 and retry.json()["error"]["code"] == "quota_exceeded"
    # The quota is per project: another one submits freely.
    with limited.client("jobs-quota-other") as other:
        assert other.post("/v1/jobs", json=spec).status_code == 202


def test_stored_bytes_past_the_quota_are_409_and_keep_nothing(limited: Service) -> None:
    with limited.client("bytes-quota") as client:
        first = _upload(client, "first", 6_000)
        assert first.status_code == 201, first.text
        before = _stored_datasets(limited)
        # Past the room left: refused while streaming, nothing kept, the error says why.
        second = _upload(client, "second", 6_000)
        assert second.status_code == 409, second.text
        error = second.json()["error"]
        assert error["code"] == "quota_exceeded"
        assert error["quota"] == {"name": "stored_bytes", "limit": MAX_STORED_BYTES, "usage": 6_000}
        assert "6000 bytes stored" in error["message"]
        assert _stored_datasets(limited) == before
        # With an Idempotency-Key the upload is stored first, then refused in the transaction.
        keyed = client.post(
            "/v1/datasets",
            files={"file": ("keyed.txt", b"x\n" * 3_000)},
            data={"name": "keyed"},
            headers={"Idempotency-Key": "keyed-upload"},
        )
        assert keyed.status_code == 409 and keyed.json()["error"]["quota"]["usage"] == 6_000
        assert _stored_datasets(limited) == before
        # Filling the quota exactly is allowed; then uploads and jobs are refused at once.
        fill = _upload(client, "fill", MAX_STORED_BYTES - 6_000)
        assert fill.status_code == 201, fill.text
        full = _upload(client, "more", 10)
        assert full.status_code == 409 and full.json()["error"]["quota"]["usage"] == 10_000
        job = client.post("/v1/jobs", json=_job_spec(client))
        assert job.status_code == 409, job.text
        assert job.json()["error"]["quota"]["name"] == "stored_bytes"
        # Deleting frees the room.
        assert client.delete(f"/v1/datasets/{first.json()['id']}").status_code == 204
        assert _upload(client, "after-delete", 6_000).status_code == 201
