"""Jobs run on the device class they ask for, and workers say who and where they are.

The install here has CPU workers only: a `gpu` job waits `queued`, saying that no GPU worker is
live, while a `cpu` job submitted after it runs. Workers register themselves (`GET /v1/workers`,
`/readyz`, `/metrics`), and one that is killed stops being live once it has missed its beats.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Service, free_port, service_env, wait_for
from tests.service.test_api import FAST_EVAL
from tests.service.test_faults import upload_ready

pytestmark = pytest.mark.service

GPU_WAITING = "waiting for a gpu worker: none is live"


@pytest.fixture(scope="module")
def cpu_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    data_dir = tmp_path_factory.mktemp("cpu-only")
    env, cleanup = service_env(data_dir)
    svc = Service(env=env, data_dir=data_dir, base_url=f"http://127.0.0.1:{free_port()}")
    try:
        svc.cli("migrate")
        svc.start_api()
        svc.start_worker("cpu0")
        yield svc
    finally:
        svc.stop()
        cleanup()


def workers_by_name(client: httpx.Client) -> dict[str, dict]:
    body = client.get("/v1/workers").json()
    assert body["object"] == "list"
    return {worker["hostname"].split("@", 1)[0]: worker for worker in body["data"]}


def wait_until(condition, timeout: float = 90, what: str = "condition") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_gpu_job_waits_for_a_gpu_worker_while_a_cpu_job_runs(
    cpu_service: Service, tiny_bert: Path
) -> None:
    with cpu_service.client() as client:
        wait_until(lambda: "cpu0" in workers_by_name(client), what="the worker to register")
        model_id = upload_ready(client, tiny_bert)
        gpu = client.post(
            "/v1/jobs",
            json={
                "model_id": model_id,
                "recipe": {"stages": [{"method": "rtn", "bits": 8, "group_size": -1}]},
                "evaluation": FAST_EVAL,
                "resources": {"device": "gpu"},
            },
        )
        assert gpu.status_code == 202, gpu.text
        gpu = gpu.json()
        assert gpu["resources"] == {"device": "gpu"}
        assert gpu["status"] == "queued" and gpu["progress"]["message"] == GPU_WAITING

        cpu = client.post(
            "/v1/jobs",
            json={
                "model_id": model_id,
                "recipe": {"stages": [{"method": "dynamic_int8"}]},
                "evaluation": FAST_EVAL,
                "resources": {"device": "cpu"},
            },
        ).json()
        assert cpu["progress"]["message"] == "waiting for a cpu worker"
        cpu = wait_for(client, cpu["id"], {"succeeded", "failed"})
        assert cpu["status"] == "succeeded", cpu
        assert cpu["resources"] == {"device": "cpu"}
        events = client.get(f"/v1/jobs/{cpu['id']}/events", params={"limit": 1000}).json()["data"]
        (running,) = [e for e in events if (e["data"] or {}).get("status") == "running"]
        # Named after the Celery node, which is how the registry tells a busy worker.
        assert running["data"]["worker"].startswith("cpu0@"), running

        # Past requeue_after_s the reaper has re-sent the gpu job's message (to the gpu queue
        # again, nobody consumes it): still queued, still saying why.
        time.sleep(float(cpu_service.env["SLIMFORMER_REQUEUE_AFTER_S"]) + 2)
        gpu = client.get(f"/v1/jobs/{gpu['id']}").json()
        assert gpu["status"] == "queued" and gpu["attempt"] == 0, gpu
        assert gpu["progress"]["message"] == GPU_WAITING

        # dynamic_int8 runs on the CPU only: a gpu request for it is refused, `any` becomes cpu.
        refused = client.post(
            "/v1/jobs",
            json={
                "model_id": model_id,
                "recipe": {"stages": [{"method": "dynamic_int8"}]},
                "resources": {"device": "gpu"},
            },
        )
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["param"] == "resources.device"
        narrowed = client.post(
            "/v1/jobs",
            json={
                "model_id": model_id,
                "recipe": {"stages": [{"method": "dynamic_int8"}]},
                "evaluation": FAST_EVAL,
            },
        ).json()
        assert narrowed["resources"] == {"device": "cpu"}
        assert client.post(f"/v1/jobs/{narrowed['id']}/cancel").status_code == 202
        assert client.post(f"/v1/jobs/{gpu['id']}/cancel").json()["status"] == "cancelled"


def test_workers_register_and_a_killed_one_is_lost(cpu_service: Service) -> None:
    doomed = cpu_service.start_worker("doomed")
    with cpu_service.client() as client:
        wait_until(lambda: "doomed" in workers_by_name(client), what="the worker to register")
        listed = workers_by_name(client)
        for name in ("cpu0", "doomed"):
            worker = listed[name]
            assert worker["object"] == "worker" and worker["id"].startswith("wkr_")
            assert worker["device"] == "cpu" and worker["live"] is True
            assert worker["status"] in ("idle", "busy")
            assert worker["queues"] == ["cpu", "validate"]
            assert worker["memory_bytes"] > 0
        ready = client.get("/readyz").json()
        assert ready["live_workers"] == {"cpu": 2, "gpu": 0, "validate": 2}
        metrics = client.get("/metrics").text
        assert 'slimformer_live_workers{device="cpu"} 2.0' in metrics
        assert 'slimformer_live_workers{device="gpu"} 0.0' in metrics

        cpu_service.kill_worker(doomed)
        window = float(cpu_service.env["SLIMFORMER_WORKER_HEARTBEAT_S"]) * 3
        started = time.monotonic()
        wait_until(
            lambda: workers_by_name(client)["doomed"]["live"] is False,
            timeout=window + 30,
            what="the killed worker to be lost",
        )
        assert time.monotonic() - started > window - 1.5  # not before its beats were missed
        listed = workers_by_name(client)
        assert listed["doomed"]["status"] == "lost"
        assert listed["cpu0"]["live"] is True
        assert client.get("/readyz").json()["live_workers"]["cpu"] == 1
        # Another project sees the same install-wide list, and nothing of anyone's jobs in it.
        with cpu_service.client("other") as other:
            assert set(workers_by_name(other)) == {"cpu0", "doomed"}
