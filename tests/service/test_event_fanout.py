"""Many Server-Sent Event streams on one job cost no database connection each: 300 streams stay
open with heartbeats while GET traffic is answered, and all of them end with the terminal status."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import httpx
import pytest

from tests.conftest import builtin_id, running_service

pytestmark = pytest.mark.service

STREAMS = int(os.environ.get("FANOUT_STREAMS", "300"))
GET_CLIENTS = 10
GETS_EACH = 20
GUARD_S = 300


class Stream:
    def __init__(self) -> None:
        self.events: list[dict] = []
        self.pings = 0
        self.first = asyncio.Event()
        self.pinged = asyncio.Event()
        self.ended = False


async def follow(client: httpx.AsyncClient, job_id: str, stream: Stream) -> None:
    async with client.stream(
        "GET", f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}
    ) as response:
        assert response.status_code == 200, await response.aread()
        data = None
        async for line in response.aiter_lines():
            if line.startswith(":"):
                stream.pings += 1
                stream.pinged.set()
            elif line.startswith("data:"):
                data = json.loads(line[5:].strip())
            elif not line and data is not None:
                stream.events.append(data)
                stream.first.set()
                data = None
    stream.ended = True


async def get_traffic(client: httpx.AsyncClient, job_id: str) -> list[int]:
    codes = []
    for index in range(GETS_EACH):
        url = f"/v1/jobs/{job_id}" if index % 2 else "/v1/jobs?limit=5"
        codes.append((await client.get(url)).status_code)
    return codes


async def scenario(base_url: str, headers: dict[str, str], job_id: str) -> None:
    limits = httpx.Limits(max_connections=STREAMS + GET_CLIENTS + 10)
    timeout = httpx.Timeout(120)
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, limits=limits, timeout=timeout
    ) as client:
        streams = [Stream() for _ in range(STREAMS)]
        followers = [asyncio.create_task(follow(client, job_id, s)) for s in streams]
        await asyncio.gather(*(s.first.wait() for s in streams))
        # Every stream is open and idle now: GETs alongside are all answered.
        results = await asyncio.gather(*(get_traffic(client, job_id) for _ in range(GET_CLIENTS)))
        codes = [code for batch in results for code in batch]
        assert codes == [200] * (GET_CLIENTS * GETS_EACH), sorted(set(codes))
        # Idle streams get heartbeat comment lines.
        await asyncio.gather(*(s.pinged.wait() for s in streams))
        cancelled = await client.post(f"/v1/jobs/{job_id}/cancel")
        assert cancelled.status_code == 202, cancelled.text
        await asyncio.gather(*followers)
    for stream in streams:
        assert stream.ended
        seqs = [event["seq"] for event in stream.events]
        assert seqs == sorted(set(seqs)) and seqs[0] == 1
        assert stream.events[-1]["data"]["status"] == "cancelled"


def test_300_streams_on_one_job_leave_the_api_answering(tmp_path: Path) -> None:
    with running_service(tmp_path, worker=False, SLIMFORMER_SSE_HEARTBEAT_S="1") as service:
        with service.client() as client:
            model_id = builtin_id(client, "models", "all-MiniLM-L6-v2")
            job = client.post(
                "/v1/jobs",
                json={"model_id": model_id, "recipe": {"stages": [{"method": "dynamic_int8"}]}},
            ).json()
            assert job["status"] == "queued", job  # no worker: it waits, and its streams idle
            headers = dict(client.headers)
        asyncio.run(
            scenario(service.base_url, {"Authorization": headers["authorization"]}, job["id"])
        )
        log = (service.data_dir / "api.log").read_text(errors="replace")
        assert "QueuePool limit" not in log and "Traceback" not in log, log[-3000:]
