"""Where a POST /v1/jobs goes: SQL statements per submission, and the API's CPU and wall time per
submission with no HTTP, sockets or load generator in the way (the application driven in-process
through ASGI, one request at a time, on a migrated install with a key). Writes
bench/results/post_profile.{json,md}; rows kept per (label, backend).

    .venv/bin/python -m bench.post_profile --label after   # both backends
    .venv/bin/python -m bench.post_profile --backend embedded --label before

The wall time includes the broker publish (the embedded broker fsyncs each message file; Redis is
one round trip); the CPU time is the process's, every thread's, so it counts the thread pool's work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import results_file

ROOT = Path(__file__).resolve().parent.parent


def _post(app, body: bytes, key: str) -> int:  # noqa: ANN001
    """One POST /v1/jobs through the ASGI application; its status."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/jobs",
        "raw_path": b"/v1/jobs",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"bench"),
            (b"authorization", f"Bearer {key}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    sent = False
    status = 0

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    asyncio.get_event_loop().run_until_complete(app(scope, receive, send))
    return status


def measure(posts: int, batches: int) -> dict:
    """In a process whose environment names a migrated install (see `main`)."""
    from sqlalchemy import event, select

    from app.db.session import get_engine, session_scope
    from app.db.tables import Model
    from app.main import create_app

    key = os.environ["BENCH_KEY"]
    with session_scope() as session:
        model_id = session.scalar(select(Model.id).where(Model.name == "all-MiniLM-L6-v2"))
    body = json.dumps(
        {"model_id": model_id, "recipe": {"stages": [{"method": "dynamic_int8"}]}}
    ).encode()
    app = create_app()
    asyncio.set_event_loop(asyncio.new_event_loop())
    statements: list[str] = []
    event.listen(
        get_engine(),
        "before_cursor_execute",
        lambda _c, _cur, statement, *_: statements.append(statement.split(None, 1)[0]),
    )
    for _ in range(10):  # warm-up
        assert _post(app, body, key) == 202
    statements.clear()
    assert _post(app, body, key) == 202
    per_post = list(statements)
    walls, cpus = [], []
    for _ in range(batches):
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(posts):
            _post(app, body, key)
        walls.append(1000 * (time.perf_counter() - wall) / posts)
        cpus.append(1000 * (time.process_time() - cpu) / posts)
    return {
        "statements_per_post": len(per_post),
        "statements": per_post,
        "wall_ms_per_post": statistics.median(walls),
        "cpu_ms_per_post": statistics.median(cpus),
        "posts": posts * batches,
    }


def run_backend(backend: str, posts: int, batches: int) -> dict:
    os.environ["SLIMFORMER_TEST_BACKEND"] = backend
    import importlib

    import tests.conftest as harness

    harness = importlib.reload(harness)
    data_dir = Path(tempfile.mkdtemp(prefix=f"slimformer-post-profile-{backend}-"))
    env, cleanup = harness.service_env(data_dir)
    try:
        service = harness.Service(env=env, data_dir=data_dir, base_url="http://127.0.0.1:1")
        service.cli("migrate")
        env = {**env, "BENCH_KEY": service.key("bench")}
        out = subprocess.run(
            [sys.executable, "-m", "bench.post_profile", "--child", str(posts), str(batches)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        return {"backend": backend, **json.loads(out.stdout.strip().splitlines()[-1])}
    finally:
        cleanup()


def markdown(rows: list[dict]) -> str:
    return results_file.table(
        ["backend", "SQL statements per POST", "API CPU ms per POST", "wall ms per POST"],
        (
            [
                r["backend"],
                f"{r['statements_per_post']} ({', '.join(r['statements'])})",
                f"{r['cpu_ms_per_post']:.2f}",
                f"{r['wall_ms_per_post']:.2f}",
            ]
            for r in rows
        ),
    )


def write(results: list[dict], label: str) -> str:
    """bench/results/post_profile.{json,md}; rows are kept per (label, backend)."""
    command = "python -m bench.post_profile --posts 100 --batches 5 --label <label>"
    tables = results_file.write_labelled(
        "post_profile",
        results,
        label=label,
        key=lambda row: (row["label"], row["backend"]),
        render=markdown,
        intro="# POST /v1/jobs in-process\n\nThe application driven through ASGI in-process, one "
        "request at a time (no HTTP parsing, sockets or load generator): SQL statements per "
        "submission, the process's CPU per submission (all threads), and wall time per "
        "submission (which includes the broker publish: the embedded broker fsyncs each "
        "message file). Medians of the batches; the machine was shared with other work. "
        "Reproduce: `" + command + "`.\n\n",
        body={"command": command},
    )
    return tables


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(measure(int(sys.argv[2]), int(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["embedded", "postgres", "both"], default="both")
    parser.add_argument("--posts", type=int, default=100, help="submissions per batch")
    parser.add_argument("--batches", type=int, default=5, help="the row quotes their median")
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    backends = ["embedded", "postgres"] if args.backend == "both" else [args.backend]
    results = [run_backend(b, args.posts, args.batches) for b in backends]
    print(write(results, args.label))


if __name__ == "__main__":
    main()
