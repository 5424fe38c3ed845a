"""A PostgreSQL outage shorter than a job's lease costs nothing: the running job keeps its attempt,
the queue moves again within seconds of the database coming back.

The database is a private cluster this test starts (and stops, and starts again): never the system
one. PostgreSQL backend only.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import BACKEND, Service, builtin_id, free_port, service_env

pytestmark = [
    pytest.mark.service,
    pytest.mark.faults,
    pytest.mark.skipif(
        BACKEND != "postgres",
        reason="a database outage is a PostgreSQL fault (the embedded SQLite file cannot go away)",
    ),
]

# Shorter than the lease below, as the promise says: "a blip shorter than its lease".
OUTAGE_S = float(os.environ.get("SLIMFORMER_TEST_OUTAGE_S", "8"))
LEASE_S = 30
# Enough latency runs on MiniLM that the job is still working when the database goes away.
SLOW_EVAL = {
    "metrics": ["embedding_cosine", "size", "latency"],
    "max_samples": 8,
    "seq_len": 32,
    "latency": {"batch_size": 8, "seq_len": 128, "runs": 12, "warmup": 1},
}
QUICK_EVAL = {"max_samples": 8, "seq_len": 32, "latency": {"runs": 1, "warmup": 0}}


class Cluster:
    """A throw-away PostgreSQL cluster owned by the `postgres` OS user (initdb refuses root)."""

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not found:
            pytest.skip("PostgreSQL server binaries are not installed")
        self.bin = Path(found[-1]).parent
        # Not under pytest's tmp_path: that is private to root, and the server runs as postgres.
        self.root = Path(tempfile.mkdtemp(prefix="slimformer-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.root.chmod(0o755)
        shutil.chown(self.root, "postgres", "postgres")
        self._as_postgres(
            str(self.bin / "initdb"), "-D", str(self.data), "--auth=trust", "-U", "postgres"
        )

    def _as_postgres(self, *command: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *command], check=True, capture_output=True, timeout=120)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        options = f"-k {self.root} -p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"),
            "-o", options, "-w", "start",
        )  # fmt: skip

    def stop(self) -> None:
        self._as_postgres(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"
        )

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._as_postgres(
                str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"
            )
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("runuser is needed to run initdb as postgres")
    db = Cluster()
    try:
        db.start()
        yield db
    finally:
        db.remove()


def poll(client: httpx.Client, job_id: str) -> dict | None:
    """The job, or None while the API cannot answer (its database is down)."""
    try:
        response = client.get(f"/v1/jobs/{job_id}", timeout=5)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def test_a_database_outage_shorter_than_the_lease_loses_no_attempt(
    tmp_path: Path, cluster: Cluster
) -> None:
    """A job runs on one worker when the database goes away for OUTAGE_S; a second job's message
    reaches the other worker during the outage (it was held stopped until then). The running job
    succeeds on its first attempt; the delivered one is retried, not dropped, and starts within
    seconds of the database coming back."""
    env, cleanup = service_env(
        tmp_path,
        SLIMFORMER_DATABASE_URL=cluster.url,
        SLIMFORMER_LEASE_S=str(LEASE_S),
        SLIMFORMER_REQUEUE_AFTER_S="120",  # no re-sent message may rescue the queued job
    )
    svc = Service(env=env, data_dir=tmp_path, base_url=f"http://127.0.0.1:{free_port()}")
    held = None
    try:
        svc.cli("migrate")
        svc.start_api()
        workers = {name: svc.start_worker(name) for name in ("a", "b")}
        with svc.client() as client:
            model_id = builtin_id(client, "models", "all-MiniLM-L6-v2")

            def submit(evaluation: dict) -> str:
                body = {
                    "model_id": model_id,
                    "evaluation": evaluation,
                    "recipe": {"stages": [{"method": "dynamic_int8"}]},
                }
                response = client.post("/v1/jobs", json=body)
                assert response.status_code == 202, response.text
                return response.json()["id"]

            running = submit(SLOW_EVAL)
            deadline = time.monotonic() + 120
            while True:  # past loading: the job is measuring the original model
                job = poll(client, running)
                assert job and job["status"] in {"queued", "running"}, (job, svc.logs())
                if job["status"] == "running" and job["progress"].get("stage") == "baseline":
                    break
                assert time.monotonic() < deadline, job
                time.sleep(0.2)
            # The idle worker is held stopped, so the next job's message reaches it only once
            # the database is down.
            idle = next(
                name
                for name in workers
                if "received" not in (tmp_path / f"worker-{name}.log").read_text(errors="replace")
            )
            held = workers[idle]
            os.killpg(held.pid, signal.SIGSTOP)
            queued = submit(QUICK_EVAL)

            cluster.stop()
            os.killpg(held.pid, signal.SIGCONT)
            held = None
            time.sleep(OUTAGE_S)
            cluster.start()
            recovered = time.monotonic()

            first = second = None
            started_after = None
            deadline = recovered + 120
            while time.monotonic() < deadline:
                second = poll(client, queued) or second
                if started_after is None and second and second["status"] != "queued":
                    started_after = time.monotonic() - recovered
                first = poll(client, running) or first
                if all(j and j["status"] not in {"queued", "running"} for j in (first, second)):
                    break
                time.sleep(0.2)
            print(f"outage {OUTAGE_S:.0f} s: the queue moved again {started_after} s after it")
            assert first and first["status"] == "succeeded", (first, svc.logs())
            assert first["attempt"] == 1, first  # the outage cost the running job no attempt
            assert second and second["status"] == "succeeded", (second, svc.logs())
            assert second["attempt"] == 1, second
            assert started_after is not None and started_after <= 15, started_after
            # It was the message delivered during the outage, retried, that ran the job.
            log = (tmp_path / f"worker-{idle}.log").read_text(errors="replace")
            assert "Retry in" in log, log[-3000:]
    finally:
        if held is not None:
            os.killpg(held.pid, signal.SIGCONT)
        svc.stop()
        cleanup()


def test_a_database_blip_inside_a_jobs_first_reads_loses_no_attempt(
    tmp_path: Path, cluster: Cluster
) -> None:
    """The job's own first reads (its row, model, datasets, the result cache's lookups: before
    the heartbeat's writes and the engine) ride out a blip too. The read is caught at a known
    point: the `datasets` table is held under an exclusive lock when the worker claims the job,
    so its first read of it waits; the database then goes away under it and comes back."""
    import psycopg

    env, cleanup = service_env(
        tmp_path,
        SLIMFORMER_DATABASE_URL=cluster.url,
        SLIMFORMER_LEASE_S=str(LEASE_S),
        SLIMFORMER_REQUEUE_AFTER_S="120",
    )
    svc = Service(env=env, data_dir=tmp_path, base_url=f"http://127.0.0.1:{free_port()}")
    worker = None
    try:
        svc.cli("migrate")
        svc.start_api()
        worker = svc.start_worker("a")
        with svc.client() as client:
            deadline = time.monotonic() + 120
            while not any(w["live"] for w in client.get("/v1/workers").json()["data"]):
                assert time.monotonic() < deadline, svc.logs()
                time.sleep(0.2)
            os.killpg(worker.pid, signal.SIGSTOP)  # the job is submitted before it can claim
            response = client.post(
                "/v1/jobs",
                json={
                    "model_id": builtin_id(client, "models", "all-MiniLM-L6-v2"),
                    "evaluation": QUICK_EVAL,
                    "recipe": {"stages": [{"method": "dynamic_int8"}]},
                },
            )
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            url = cluster.url.replace("+psycopg", "")
            holder, watch = psycopg.connect(url), psycopg.connect(url, autocommit=True)
            try:
                holder.execute("LOCK TABLE datasets IN ACCESS EXCLUSIVE MODE")
                os.killpg(worker.pid, signal.SIGCONT)
                deadline = time.monotonic() + 120
                while not watch.execute(
                    "SELECT count(*) FROM pg_locks WHERE relation = 'datasets'::regclass"
                    " AND NOT granted"
                ).fetchone()[0]:
                    assert time.monotonic() < deadline, svc.logs()
                    time.sleep(0.1)
                cluster.stop()  # the waiting read's connection drops: a blip mid-read
            finally:
                holder.close()
                watch.close()
            time.sleep(2)
            cluster.start()
            job = None
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                job = poll(client, job_id) or job
                if job and job["status"] not in {"queued", "running"}:
                    break
                time.sleep(0.3)
            assert job and job["status"] == "succeeded", (job, svc.logs())
            assert job["attempt"] == 1, job
        log = (tmp_path / "worker-a.log").read_text(errors="replace")
        assert f"job {job_id}: sha256s: database unreachable" in log, log[-3000:]
    finally:
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGCONT)
        svc.stop()
        cleanup()
