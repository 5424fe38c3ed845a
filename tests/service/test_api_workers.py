"""`slimformer api --workers 2`: two API processes on one port. Event streams in either process see
a change made through the other (each process has its own notifier, fed by the database), and
/metrics adds up the request histograms of both."""

from __future__ import annotations

import json
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import Service, builtin_id

pytestmark = pytest.mark.service

STREAMS = 6
GETS = 40


def _statuses(base_url: str, headers: dict, job_id: str) -> list[str]:
    """Follow the job's event stream on a connection of its own until it ends."""
    seen = []
    with (
        httpx.Client(base_url=base_url, headers=headers, timeout=60) as client,
        client.stream(
            "GET", f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}
        ) as stream,
    ):
        for line in stream.iter_lines():
            if line.startswith("data:"):
                data = json.loads(line.removeprefix("data:").strip()).get("data") or {}
                if "status" in data:
                    seen.append(data["status"])
    return seen


def test_two_api_processes_share_streams_and_metrics(idle_service: Service) -> None:
    api = idle_service.with_api("--workers", "2")
    children = subprocess.run(
        ["pgrep", "-P", str(api.api_process.pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    assert len(children) >= 2, children  # uvicorn's two workers (and its process watcher)
    with api.client("api-workers") as client:
        spec = {
            "model_id": builtin_id(client, "models", "all-MiniLM-L6-v2"),
            "recipe": {"stages": [{"method": "dynamic_int8"}]},
        }
        job = client.post("/v1/jobs", json=spec).json()  # no worker: it stays queued
        headers = dict(client.headers)
        with ThreadPoolExecutor(STREAMS) as pool:
            streams = [
                pool.submit(_statuses, api.base_url, headers, job["id"]) for _ in range(STREAMS)
            ]
            # Every stream has connected (each on a connection of its own, so the kernel spreads
            # them over both processes) before the change is made, on yet another connection.
            for _ in range(GETS):
                response = httpx.get(f"{api.base_url}/v1/jobs/{job['id']}", headers=headers)
                assert response.status_code == 200
            assert (
                httpx.post(
                    f"{api.base_url}/v1/jobs/{job['id']}/cancel", headers=headers
                ).status_code
                == 202
            )
            for stream in streams:
                assert stream.result(timeout=60)[-1] == "cancelled"
        metrics = client.get("/metrics").text
    counted = re.search(
        r'slimformer_http_request_duration_seconds_count\{method="GET",'
        r'route="/v1/jobs/\{job_id\}",status="200"\} ([0-9.e+]+)',
        metrics,
    )
    assert counted and float(counted.group(1)) >= GETS, metrics[:2000]
