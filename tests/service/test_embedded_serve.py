"""`slimformer serve` alone: migrations, API and a real worker on SQLite + the filesystem broker, no
configuration; auth off and saying so; Ctrl-C stops everything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import BACKEND, ROOT, builtin_id, free_port, wait_for
from tests.service.test_webhooks import start_receiver
from workers.compression.runtime.int8 import FULL_RANGE_ACTIVATIONS

pytestmark = [
    pytest.mark.service,
    pytest.mark.skipif(BACKEND != "embedded", reason="the embedded default is its own backend"),
]


def processes_using(data_dir: Path) -> list[int]:
    marker = f"SLIMFORMER_DATA_DIR={data_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def clean_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLIMFORMER_")}
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    return env


def start_serve(
    tmp_path: Path, env: dict[str, str], name: str = "serve"
) -> tuple[subprocess.Popen, str]:
    """`slimformer serve` on a free port and `tmp_path/data`, its output in `tmp_path/<name>.log`;
    returns once /readyz answers 200."""
    port = free_port()
    log = (tmp_path / f"{name}.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "slimformer.cli",
            "serve",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "data"),
        ],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return process, base
        except httpx.HTTPError:
            pass
        assert process.poll() is None, (tmp_path / f"{name}.log").read_text()
        time.sleep(0.3)
    raise AssertionError((tmp_path / f"{name}.log").read_text())


def test_serve_runs_a_real_job_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    env = clean_env()
    # The only setting: the test's own webhook receiver is on loopback, refused unless allowed.
    env["SLIMFORMER_WEBHOOK_ALLOWED_HOSTS"] = '["127.0.0.1"]'
    receiver, receiver_server = start_receiver()
    process, base = start_serve(tmp_path, env)
    try:
        output = (tmp_path / "serve.log").read_text()
        assert "authentication is OFF" in output
        assert (tmp_path / "data" / "slimformer.db").is_file()

        with httpx.Client(base_url=base, timeout=30) as client:  # no API key needed
            model_id = builtin_id(client, "models", "all-MiniLM-L6-v2")
            job = client.post(
                "/v1/jobs",
                json={
                    "model_id": model_id,
                    "recipe": {"stages": [{"method": "dynamic_int8"}]},
                    "evaluation": {
                        "max_samples": 16,
                        "seq_len": 64,
                        "metrics": ["embedding_cosine"],
                        "latency": {"runs": 2, "warmup": 0},
                    },
                    "webhook": {"url": receiver.url("/serve"), "events": ["job.succeeded"]},
                },
            ).json()
            receiver.secrets["/serve"] = job["webhook"]["secret"]
            final = wait_for(client, job["id"], {"succeeded", "failed"}, timeout=300)
            assert final["status"] == "succeeded", (tmp_path / "serve.log").read_text()[-3000:]
            # serve's worker brings its webhook worker: the delivery arrives, signed.
            hooks = receiver.wait("/serve", lambda got: len(got) >= 1)
            assert [(a.type, a.verified) for a in hooks] == [("job.succeeded", True)]
            # fbgemm quantizes activations to 7 bits without VNNI (runtime/int8.py): ~0.975 there.
            floor = 0.98 if FULL_RANGE_ACTIVATIONS else 0.965
            assert final["metrics"]["compressed"]["embedding_cosine"] > floor

        assert len(processes_using(tmp_path / "data")) >= 2  # the worker and its pool child
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        process.wait(timeout=60)
        time.sleep(0.5)
        # the worker, its pool and its webhook worker are gone too
        assert processes_using(tmp_path / "data") == []
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{base}/healthz", timeout=2)
    finally:
        receiver_server.shutdown()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def cmdline(pid: int) -> list[str]:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def test_serve_supervises_its_workers_and_stops_on_sigterm(tmp_path: Path) -> None:
    """One serve per data dir; a worker killed under serve comes back and takes the next job;
    validation has its own consumer; SIGTERM (what systemd and docker send) leaves nothing."""
    env = clean_env()
    process, base = start_serve(tmp_path, env)
    try:
        # Two supervised children, each a Celery worker: the job worker and the validator.
        workers = {
            "validate" if "validator@%h" in cmdline(pid) else "jobs": pid
            for pid in children_of(process.pid)
        }
        assert sorted(workers) == ["jobs", "validate"], [cmdline(p) for p in workers.values()]

        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "slimformer.cli",
                "serve",
                "--port",
                str(free_port()),
                "--data-dir",
                str(tmp_path / "data"),
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode != 0
        assert f"another `slimformer serve` (pid {process.pid}) is using" in second.stderr

        os.kill(workers["jobs"], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            current = [
                pid for pid in children_of(process.pid) if "validator@%h" not in cmdline(pid)
            ]
            if current and current != [workers["jobs"]]:
                break
            time.sleep(0.3)
        else:
            raise AssertionError((tmp_path / "serve.log").read_text()[-3000:])
        assert (
            "the worker exited (killed by SIGKILL); restarting it"
            in (tmp_path / "serve.log").read_text()
        )

        with httpx.Client(base_url=base, timeout=30) as client:
            job = client.post(
                "/v1/jobs",
                json={
                    "model_id": builtin_id(client, "models", "all-MiniLM-L6-v2"),
                    "recipe": {"stages": [{"method": "dynamic_int8"}]},
                    "evaluation": {
                        "max_samples": 8,
                        "seq_len": 32,
                        "metrics": ["embedding_cosine"],
                        "latency": {"runs": 1, "warmup": 0},
                    },
                },
            ).json()
            final = wait_for(client, job["id"], {"succeeded", "failed"}, timeout=300)
            assert final["status"] == "succeeded", (tmp_path / "serve.log").read_text()[-3000:]
            assert final["attempt"] == 1
            ready = client.get("/readyz").json()
            assert ready["live_workers"]["cpu"] >= 1 and ready["live_workers"]["validate"] >= 1

        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        assert processes_using(tmp_path / "data") == []
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
