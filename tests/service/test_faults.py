"""Whatever dies, a job runs to success exactly once and nothing is lost."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import BACKEND, Service, free_port, service_env, wait_for, wait_for_model
from tests.service.conftest import tar_gz

pytestmark = [pytest.mark.service, pytest.mark.faults]

# Slow enough to be caught in the middle: thousands of latency runs on the tiny model.
SLOW_EVAL = {
    "metrics": ["embedding_cosine", "size", "latency"],
    "max_samples": 16,
    "seq_len": 32,
    "latency": {"batch_size": 32, "seq_len": 256, "runs": 1000, "warmup": 1},
}


def start_service(tmp_path: Path, **overrides: str) -> tuple[Service, callable]:
    env, cleanup = service_env(tmp_path, **overrides)
    svc = Service(env=env, data_dir=tmp_path, base_url=f"http://127.0.0.1:{free_port()}")
    svc.cli("migrate")
    svc.start_api()
    return svc, cleanup


@pytest.fixture
def fault_service(tmp_path: Path) -> Iterator[Service]:
    svc, cleanup = start_service(tmp_path)
    try:
        yield svc
    finally:
        svc.stop()
        cleanup()


def upload_ready(client: httpx.Client, folder: Path) -> str:
    model = client.post(
        "/v1/models", files={"file": ("m.tar.gz", tar_gz(folder))}, data={"name": "tiny"}
    ).json()
    model = wait_for_model(client, model)
    assert model["status"] == "ready", model
    return model["id"]


def wait_for_stage(client: httpx.Client, job_id: str, stage: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "running" and job["progress"].get("stage") == stage:
            return
        assert job["status"] in {"queued", "running"}, job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never reached stage {stage}")


def stored_under(service: Service, prefix: str) -> list[Path]:
    root = service.data_dir / "storage" / prefix
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_sigkill_worker_mid_job_then_new_worker_finishes_it_once(
    fault_service: Service, tiny_bert: Path
) -> None:
    svc = fault_service
    worker = svc.start_worker("first")
    with svc.client() as client:
        model_id = upload_ready(client, tiny_bert)
        job = client.post(
            "/v1/jobs",
            json={
                "model_id": model_id,
                "evaluation": SLOW_EVAL,
                "recipe": {"stages": [{"method": "dynamic_int8"}]},
            },
        ).json()
        wait_for_stage(client, job["id"], "baseline")
        svc.kill_worker(worker)
        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
        svc.start_worker("second")
        final = wait_for(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=400)
        assert final["status"] == "succeeded", (final, svc.logs())
        assert final["attempt"] == 2
        artifacts = client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
        assert sorted(a["kind"] for a in artifacts) == ["model", "report"]
        events = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
        statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
        assert statuses == ["queued", "running", "queued", "running", "succeeded"]
        assert any("worker lost" in e["message"] for e in events)
        # Only the winning attempt's files remain in storage.
        files = stored_under(svc, f"jobs/{job['id']}")
        assert {p.parent.name for p in files} == {"attempt-2"}


def test_cancel_running_job_keeps_nothing(fault_service: Service, tiny_bert: Path) -> None:
    svc = fault_service
    svc.start_worker()
    with svc.client() as client:
        model_id = upload_ready(client, tiny_bert)
        job = client.post(
            "/v1/jobs",
            json={
                "model_id": model_id,
                "evaluation": SLOW_EVAL,
                "recipe": {"stages": [{"method": "dynamic_int8"}]},
            },
        ).json()
        wait_for_stage(client, job["id"], "baseline")
        response = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert response.status_code == 202 and response.json()["status"] == "cancelling"
        final = wait_for(client, job["id"], {"cancelled", "succeeded", "failed"}, timeout=120)
        assert final["status"] == "cancelled", final
        assert final["artifact_ids"] == []
        assert stored_under(svc, f"jobs/{job['id']}") == []
        statuses = [
            e["data"]["status"]
            for e in client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()[
                "data"
            ]
            if e["type"] == "status"
        ]
        assert statuses == ["queued", "running", "cancelling", "cancelled"]


def test_lost_broker_messages_are_resent(tmp_path: Path, tiny_bert: Path) -> None:
    """Redis restarted (it keeps nothing on disk) while jobs were queued: none is lost.
    On the embedded broker the same loss is its queue folder being wiped."""
    redis_process = None
    overrides = {}
    if BACKEND == "postgres":
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed")
        port = free_port()
        redis_dir = tmp_path / "redis"
        redis_dir.mkdir()
        command = [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(redis_dir),
        ]
        redis_process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        time.sleep(0.5)
        overrides["SLIMFORMER_BROKER_URL"] = f"redis://127.0.0.1:{port}/0"
    svc, cleanup = start_service(tmp_path / "svc", **overrides)
    try:
        with svc.client() as client:
            svc.start_worker("validator")
            model_id = upload_ready(client, tiny_bert)
            svc.kill_worker(svc.workers[-1])
            fast = {**SLOW_EVAL, "latency": {"runs": 3, "warmup": 1, "seq_len": 16}}
            ids = [
                client.post(
                    "/v1/jobs",
                    json={
                        "model_id": model_id,
                        "evaluation": fast,
                        "recipe": {"stages": [{"method": "dynamic_int8"}]},
                    },
                ).json()["id"]
                for _ in range(3)
            ]
            if redis_process is not None:
                redis_process.terminate()
                redis_process.wait()
                redis_process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
                time.sleep(0.5)
            else:
                queue = svc.data_dir / "broker" / "queue"
                for message in queue.glob("*"):
                    message.unlink()
            assert all(client.get(f"/v1/jobs/{i}").json()["status"] == "queued" for i in ids)
            svc.start_worker("after-restart")
            for job_id in ids:
                final = wait_for(client, job_id, {"succeeded", "failed", "cancelled"}, timeout=240)
                assert final["status"] == "succeeded", (final, svc.logs())
                assert final["attempt"] == 1
    finally:
        svc.stop()
        cleanup()
        if redis_process is not None:
            redis_process.terminate()
            redis_process.wait()


def dynamic_int8_minilm_job(tmp_path: Path, **env: str) -> dict:
    """A MiniLM dynamic_int8 job on a service started with `env`, waited for to the end."""
    svc, cleanup = start_service(tmp_path, **env)
    try:
        svc.start_worker()
        with svc.client() as client:
            models = client.get("/v1/models", params={"limit": 100}).json()["data"]
            minilm = next(m for m in models if m["name"] == "all-MiniLM-L6-v2")
            job = client.post(
                "/v1/jobs",
                json={"model_id": minilm["id"], "recipe": {"stages": [{"method": "dynamic_int8"}]}},
            ).json()
            return wait_for(client, job["id"], {"succeeded", "failed"}, timeout=120)
    finally:
        svc.stop()
        cleanup()


def test_preflight_refuses_a_job_that_cannot_fit(tmp_path: Path) -> None:
    final = dynamic_int8_minilm_job(tmp_path, SLIMFORMER_MEMORY_LIMIT_BYTES=str(300 * 1024**2))
    assert final["status"] == "failed"
    assert final["error"]["code"] == "insufficient_memory"
    assert "GB" in final["error"]["message"] and final["artifact_ids"] == []


def test_preflight_refuses_a_job_whose_files_would_not_fit_on_disk(tmp_path: Path) -> None:
    """The worker may write 20 MB: MiniLM's export (87 MB of float32 weights, int8 after
    dynamic_int8) and its archive do not fit, so the job fails with the numbers before loading
    anything, and leaves nothing behind."""
    final = dynamic_int8_minilm_job(tmp_path, SLIMFORMER_DISK_LIMIT_BYTES=str(20 * 1024**2))
    assert final["status"] == "failed"
    assert final["error"]["code"] == "insufficient_disk"
    message = final["error"]["message"]
    assert "GB" in message and "0.02 GB is free" in message, message
    assert final["artifact_ids"] == [] and final["error"]["retryable"] is False


def submit_training(
    client: httpx.Client, model_id: str, *, steps: int, checkpoint_every: int
) -> dict:
    """A distillation job on the tiny BERT (2 -> 1 blocks) that checkpoints every few steps."""
    stage = {
        "method": "distill",
        "student": {"num_layers": 1},
        "steps": steps,
        "batch_size": 4,
        "seq_len": 32,
        "checkpoint_every": checkpoint_every,
    }
    return client.post(
        "/v1/jobs",
        json={
            "model_id": model_id,
            "evaluation": {"metrics": ["embedding_cosine"], "max_samples": 16, "seq_len": 32},
            "recipe": {"stages": [stage]},
        },
    ).json()


# Training resume and cancel are storage and engine logic, the same on both backends: run once.
@pytest.mark.skipif(BACKEND != "embedded", reason="backend-independent; run on the embedded one")
def test_sigkill_worker_mid_training_resumes_from_the_checkpoint(
    fault_service: Service, tiny_bert: Path
) -> None:
    svc = fault_service
    worker = svc.start_worker("first")
    with svc.client() as client:
        model_id = upload_ready(client, tiny_bert)
        job = submit_training(client, model_id, steps=600, checkpoint_every=10)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            progress = client.get(f"/v1/jobs/{job['id']}").json()["progress"]
            if progress.get("stage") == "distill" and (progress.get("step") or 0) >= 25:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("training never reached step 25")
        svc.kill_worker(worker)
        svc.start_worker("second")
        final = wait_for(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=600)
        assert final["status"] == "succeeded", (final, svc.logs())
    assert final["attempt"] == 2
    stage = final["metrics"]["stages"][0]
    assert stage["resumed_from_step"] >= 20 and stage["resumed_from_step"] % 10 == 0
    assert stage["held_out"][0]["step"] == 0  # the killed attempt's history came back too
    # The training checkpoints are gone once the job is done.
    assert stored_under(svc, "checkpoints") == []


# Training resume and cancel are storage and engine logic, the same on both backends: run once.
@pytest.mark.skipif(BACKEND != "embedded", reason="backend-independent; run on the embedded one")
def test_cancel_during_training_stops_at_the_next_step_and_keeps_nothing(
    fault_service: Service, tiny_bert: Path
) -> None:
    svc = fault_service
    svc.start_worker()
    with svc.client() as client:
        model_id = upload_ready(client, tiny_bert)
        job = submit_training(client, model_id, steps=100_000, checkpoint_every=5)
        wait_for_stage(client, job["id"], "distill")
        deadline = time.monotonic() + 120
        while not stored_under(svc, "checkpoints") and time.monotonic() < deadline:
            time.sleep(0.2)  # a training checkpoint exists: cancel must remove it too
        assert stored_under(svc, "checkpoints"), "no training checkpoint was written"
        response = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert response.status_code == 202
        final = wait_for(client, job["id"], {"cancelled", "succeeded", "failed"}, timeout=60)
        assert final["status"] == "cancelled", final
        assert final["progress"]["step"] < 100_000
    assert final["artifact_ids"] == []
    assert stored_under(svc, f"jobs/{job['id']}") == []
    assert stored_under(svc, "checkpoints") == []
