"""Stale messages are cheap: cancelling a queued job removes its message from the broker, a message
for a job no longer queued is dropped by the worker's main process before the pool, and the reaper
re-sends only messages that are really lost, not those of jobs merely waiting in line.

No job runs here: the jobs ask for a GPU, and the service has a CPU worker only, so they wait in the
`gpu` queue for as long as the test needs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import BACKEND, ROOT, Service, builtin_id

pytestmark = pytest.mark.service


def _queue_name(svc: Service, queue: str) -> str:
    return svc.env.get("SLIMFORMER_QUEUE_PREFIX", "") + queue


def redis_lists(name: str) -> list[str]:
    """kombu's Redis transport keeps priority 0 in the queue's list and levels 1-9 beside it
    (`sep` ":", `priority_steps` 0-9 in app/broker.py); a job's priority picks the list."""
    return [name, *(f"{name}:{level}" for level in range(1, 10))]


def messages_for(svc: Service, queue: str, resource_id: str) -> int:
    """How many messages in the broker's `queue` carry `resource_id`, read off the broker."""
    name = _queue_name(svc, queue)
    if BACKEND == "postgres":
        import redis

        client = redis.Redis.from_url(svc.env["SLIMFORMER_BROKER_URL"])
        return sum(
            resource_id.encode() in item
            for key in redis_lists(name)
            for item in client.lrange(key, 0, -1)
        )
    folder = svc.data_dir / "broker" / "queue"
    return sum(
        resource_id in path.read_text(errors="replace")
        for path in folder.glob(f"*.{name}.msg")
        if path.exists()
    )


def lose_messages_for(svc: Service, queue: str, resource_id: str) -> None:
    """What a broker that loses messages does (a Redis restart without persistence, a wiped
    folder): the message is gone, the job still queued."""
    name = _queue_name(svc, queue)
    if BACKEND == "postgres":
        import redis

        client = redis.Redis.from_url(svc.env["SLIMFORMER_BROKER_URL"])
        for key in redis_lists(name):
            for item in client.lrange(key, 0, -1):
                if resource_id.encode() in item:
                    client.lrem(key, 0, item)
        return
    for path in (svc.data_dir / "broker" / "queue").glob(f"*.{name}.msg"):
        if resource_id in path.read_text(errors="replace"):
            path.unlink()


def send_run_job(svc: Service, job_ids: list[str], queue: str) -> None:
    """Messages for these jobs, sent as the API and the reaper send them."""
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from app import broker\n"
            "for job_id in sys.argv[2:]: assert broker.send_run_job(job_id, sys.argv[1])",
            queue,
            *job_ids,
        ],
        env=svc.env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )


def worker_log(svc: Service) -> str:
    return "".join(path.read_text(errors="replace") for path in svc.data_dir.glob("worker-*.log"))


def until(condition, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.3)


def gpu_job(client: httpx.Client) -> dict:
    spec = {
        "model_id": builtin_id(client, "models", "all-MiniLM-L6-v2"),
        "recipe": {"stages": [{"method": "rtn", "bits": 4, "group_size": 64}]},
        "resources": {"device": "gpu"},
    }
    response = client.post("/v1/jobs", json=spec)
    assert response.status_code == 202, response.text
    return response.json()


def test_a_cancelled_job_leaves_no_message_and_stale_ones_never_reach_the_pool(
    service: Service,
) -> None:
    with service.client("stale") as client:
        jobs = [gpu_job(client) for _ in range(10)]
        for job in jobs:
            assert messages_for(service, "gpu", job["id"]) == 1
            assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
            assert messages_for(service, "gpu", job["id"]) == 0  # removed from the broker
        # Messages the broker could not take back (a duplicate re-send, another queue) or for
        # jobs that were deleted: the CPU worker receives them and drops each before its pool.
        stale = [job["id"] for job in jobs] + [f"job_deleted{i:02d}" for i in range(5)]
        before = worker_log(service)
        send_run_job(service, stale, "cpu")
        until(
            lambda: all(f"stale message for {job_id}" in worker_log(service) for job_id in stale),
            120,
            "the worker did not drop every stale message",
        )
        new = worker_log(service)[len(before) :]
        for job_id in stale:
            assert new.count(f"dropped a stale message for {job_id} ") == 1, job_id
            assert f"job {job_id} is not queued" not in new  # the pool's claim never saw it
        assert re.search(r"dropped a stale message for job_deleted00 \(deleted\)", new)
        assert f"dropped a stale message for {jobs[0]['id']} (cancelled)" in new
        assert all(messages_for(service, "cpu", job_id) == 0 for job_id in stale)


def test_the_reaper_resends_only_a_message_really_lost(service: Service) -> None:
    requeue_after_s = float(service.env["SLIMFORMER_REQUEUE_AFTER_S"])
    with service.client("stale") as client:
        before = worker_log(service)
        waiting = gpu_job(client)
        job_id = waiting["id"]
        assert messages_for(service, "gpu", job_id) == 1
        assert "gpu" in waiting["progress"]["message"]  # told why it waits
        # Past requeue_after_s (and a few reaper passes), its message is still in line: the
        # reaper looked and left it there.
        time.sleep(requeue_after_s + 3)
        assert messages_for(service, "gpu", job_id) == 1
        assert re.search(r"'in_line': [1-9]", worker_log(service)[len(before) :])
        # Now the broker loses it: the next look re-sends it.
        lose_messages_for(service, "gpu", job_id)
        assert messages_for(service, "gpu", job_id) == 0
        until(
            lambda: messages_for(service, "gpu", job_id) == 1,
            3 * requeue_after_s,
            "the reaper did not re-send a lost message",
        )
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
        assert messages_for(service, "gpu", job_id) == 0
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "cancelled" and job["attempt"] == 0


def test_a_message_in_line_elsewhere_is_not_in_line_where_the_job_goes_now(
    service: Service,
) -> None:
    """An `any` job sent to GPU workers that have died since is routed to the CPU queue now: its
    message waiting in the gpu queue does not keep it in line there (the reaper re-routes it)."""
    job_id = "job_rerouted00"
    send_run_job(service, [job_id], "gpu")
    check = (
        "import json, sys; from workers.reaper import _lost\n"
        "print(json.dumps([_lost({sys.argv[1]: 'gpu'}), _lost({sys.argv[1]: 'cpu'})]))"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", check, job_id],
            env=service.env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert json.loads(result.stdout.strip().splitlines()[-1]) == [[], [job_id]]
    finally:
        lose_messages_for(service, "gpu", job_id)
