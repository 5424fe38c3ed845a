"""Shared test fixtures.

Service tests run the real thing: the API (uvicorn) and a Celery worker as separate processes, on the
backend chosen by SLIMFORMER_TEST_BACKEND: `embedded` (SQLite + kombu filesystem broker, the default)
or `postgres` (a fresh PostgreSQL database and a private Redis queue prefix, both dropped afterwards).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
BACKEND = os.environ.get("SLIMFORMER_TEST_BACKEND", "embedded")
PG_ADMIN_URL = os.environ.get(
    "SLIMFORMER_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("SLIMFORMER_TEST_REDIS", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Service:
    """A running Slimformer: its environment, API process, worker processes and clients."""

    env: dict[str, str]
    data_dir: Path
    base_url: str
    processes: list[subprocess.Popen] = field(default_factory=list)
    workers: list[subprocess.Popen] = field(default_factory=list)
    api_process: subprocess.Popen | None = None
    keys: dict[str, str] = field(default_factory=dict)

    def client(self, project: str = "alpha") -> httpx.Client:
        headers = {}
        if self.env.get("SLIMFORMER_AUTH") != "false":
            headers["Authorization"] = f"Bearer {self.key(project)}"
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60)

    def key(self, project: str) -> str:
        if project not in self.keys:
            out = self.cli("keys", "create", "--project", project)
            self.keys[project] = out.strip().splitlines()[-1]
        return self.keys[project]

    def cli(self, *args: str, timeout: float = 300) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "slimformer.cli", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise RuntimeError(f"slimformer {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout

    def start_api(self, *args: str) -> None:
        port = int(self.base_url.rsplit(":", 1)[1])
        first = not (self.data_dir / "api.log").exists()
        log = "api.log" if first else f"api-{port}.log"  # another API (`with_api`) beside it
        self.api_process = self._spawn("api", "--port", str(port), *args, log=log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.api_process.poll() is not None:
                raise RuntimeError(f"API exited:\n{self.logs()}")
            time.sleep(0.2)
        raise RuntimeError("API did not start")

    def with_api(self, *args: str, **overrides: str) -> Service:
        """Another API on this service's backend, started with `args` (`--workers 2`) and
        `overrides` in its environment (settings of its own, e.g. limits). It shares keys, data
        and processes with this one, so it stops with it."""
        other = replace(
            self,
            env={**self.env, **overrides},
            base_url=f"http://127.0.0.1:{free_port()}",
            api_process=None,
        )
        other.start_api(*args)
        return other

    def start_worker(
        self, name: str | None = None, *, memory_cgroup: Path | None = None, args: tuple = ()
    ) -> subprocess.Popen:
        """A worker process (`args`: more `slimformer worker` options); with `memory_cgroup` (a
        cgroup v1 memory folder) it and everything it starts run inside that cgroup's memory limit
        from the first instruction."""
        name = name or f"w{len(self.workers)}"
        process = self._spawn(
            "worker",
            *args,
            "--hostname",
            f"{name}@%h",
            log=f"worker-{name}.log",
            preexec=None if memory_cgroup is None else partial(_join_cgroup, memory_cgroup),
        )
        self.workers.append(process)
        return process

    def kill_worker(self, process: subprocess.Popen) -> None:
        """SIGKILL the whole worker: the main process and its pool children."""
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def _spawn(self, *args: str, log: str, preexec=None) -> subprocess.Popen:  # noqa: ANN001
        handle = (self.data_dir / log).open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "slimformer.cli", *args],
            env=self.env,
            cwd=ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec,
        )
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}"
            for path in sorted(self.data_dir.glob("*.log"))
        )


def _join_cgroup(folder: Path) -> None:
    """In the child, before exec: move this process into the cgroup."""
    (folder / "cgroup.procs").write_text(str(os.getpid()))


def service_env(data_dir: Path, **overrides: str) -> tuple[dict[str, str], callable]:
    """Environment for a service on the chosen backend, and a function that drops what it made."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLIMFORMER_")}
    env.update(
        {
            "SLIMFORMER_DATA_DIR": str(data_dir),
            "SLIMFORMER_AUTH": "true",
            "SLIMFORMER_LEASE_S": "4",
            "SLIMFORMER_REAPER_INTERVAL_S": "1",
            "SLIMFORMER_REQUEUE_AFTER_S": "6",
            "SLIMFORMER_WORKER_HEARTBEAT_S": "1",  # a killed worker is lost after 3 s
            "SLIMFORMER_MAX_UPLOAD_BYTES": str(8 * 1024 * 1024),
            "SLIMFORMER_MODEL_PATH_ROOTS": json.dumps([str(data_dir / "registered")]),
            "SLIMFORMER_PROGRESS_MIN_INTERVAL_S": "0.2",
            "SLIMFORMER_BROKER_POLLING_INTERVAL_S": "0.1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT),
        }
    )
    cleanups = []
    if BACKEND == "postgres":
        import psycopg

        name = f"slimformer_test_{secrets.token_hex(6)}"
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
        prefix = f"sftest-{secrets.token_hex(4)}-"
        env.update(
            {
                "SLIMFORMER_DATABASE_URL": f"{base}/{name}",
                "SLIMFORMER_BROKER_URL": REDIS_URL,
                "SLIMFORMER_QUEUE_PREFIX": prefix,
            }
        )

        def drop() -> None:
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            import redis

            client = redis.Redis.from_url(REDIS_URL)
            for key in client.scan_iter(f"*{prefix}*"):
                client.delete(key)

        cleanups.append(drop)
    env.update(overrides)

    def cleanup() -> None:
        for step in cleanups:
            step()

    return env, cleanup


@contextmanager
def running_service(data_dir: Path, *, worker: bool = True, **overrides: str) -> Iterator[Service]:
    """A migrated service with its API up and, unless `worker` is False, one worker; stopped and
    its backend dropped on the way out. `overrides` are extra environment variables."""
    env, cleanup = service_env(data_dir, **overrides)
    svc = Service(env=env, data_dir=data_dir, base_url=f"http://127.0.0.1:{free_port()}")
    try:
        svc.cli("migrate")
        svc.start_api()
        if worker:
            svc.start_worker()
        yield svc
    finally:
        svc.stop()
        cleanup()


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One API and one worker for the whole session (tests that kill things make their own)."""
    with running_service(tmp_path_factory.mktemp("service")) as svc:
        yield svc


@contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """A real S3-compatible HTTP endpoint: moto's standalone server in a process of its own, on a
    free port. Yields the AWS environment that points boto3 (and so `S3Store`) at it."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(endpoint, timeout=1)
                break
            except httpx.HTTPError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.1)
        yield {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "slimformer-test",
            "AWS_SECRET_ACCESS_KEY": "slimformer-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)


@pytest.fixture(scope="session")
def s3_env() -> Iterator[dict[str, str]]:
    with s3_server() as env:
        yield env


@pytest.fixture(scope="session")
def idle_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """An API without a worker for the whole session: a job stays queued and costs nothing, so
    tests of the API alone (limits, fuzzing) share one migrated backend."""
    with running_service(tmp_path_factory.mktemp("idle"), worker=False) as svc:
        yield svc


def wait_for(client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} stayed {job.get('status')} (wanted {statuses}): {job}")


def wait_for_model(client: httpx.Client, model: dict, timeout: float = 120) -> dict:
    """Poll a just-created model until its validation in the worker has finished."""
    deadline = time.monotonic() + timeout
    while model["status"] == "validating" and time.monotonic() < deadline:
        time.sleep(0.3)
        model = client.get(f"/v1/models/{model['id']}").json()
    return model


def builtin_id(client: httpx.Client, kind: str, name: str) -> str:
    after = None
    while True:
        params = {"limit": 100, **({"after": after} if after else {})}
        body = client.get(f"/v1/{kind}", params=params).json()
        for item in body["data"]:
            if item["name"] == name:
                return item["id"]
        if not body["has_more"]:
            raise AssertionError(f"no {kind} named {name}")
        after = body["data"][-1]["id"]


# The files that take minutes go first, so that with two test processes (pytest-xdist, a file at a
# time) the long ones overlap instead of one finishing alone at the end.
SLOW_FIRST = (
    "service/test_big_model.py",
    "service/test_faults.py",
    "engine/test_pruning_real.py",
    "engine/test_quant_real.py",
    "engine/test_structured_real.py",
    "engine/test_streamed_real.py",
    "service/test_end_to_end.py",
    "engine/test_distill_real.py",
    "engine/test_search_real.py",
    "service/test_search_job.py",
    "service/test_progress_and_baseline.py",
    "engine/test_vllm_check.py",
    "engine/test_w8a8_convention.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0]
        return next(
            (i for i, slow in enumerate(SLOW_FIRST) if path.endswith(slow)), len(SLOW_FIRST)
        )

    items.sort(key=rank)  # stable: the order within a file and among the rest is kept
