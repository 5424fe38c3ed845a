"""Service numbers on this machine: queue-to-running latency on each broker, and a real MiniLM
dynamic_int8 job's wall time, size and cosine. Writes bench/results/service.{json,md}.

    .venv/bin/python -m bench.service_bench            # both backends (needs PostgreSQL + Redis)
    .venv/bin/python -m bench.service_bench --backend embedded
    .venv/bin/python -m bench.service_bench --scenario stale --stale 200

`--scenario stale`: N jobs submitted and cancelled while no worker runs, then a worker starts and one
real job is submitted; how long it waits to start behind what the cancelled jobs left in the broker
(bench/results/stale_messages.{json,md}).

It starts the real API and a real Celery worker as processes (the same harness the service tests
use), submits jobs over HTTP while the worker is idle, and reads the timestamps the service records.
Medians, because these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from datetime import datetime
from pathlib import Path

from bench import results_file


def _seconds(job: dict, start: str, end: str) -> float:
    return (datetime.fromisoformat(job[end]) - datetime.fromisoformat(job[start])).total_seconds()


def _harness(backend: str):  # noqa: ANN202 - the tests' module, reloaded for this backend
    os.environ["SLIMFORMER_TEST_BACKEND"] = backend
    import importlib

    import tests.conftest as harness

    return importlib.reload(harness)  # BACKEND is read at import


def _service(harness, backend: str):  # noqa: ANN001, ANN202
    data_dir = Path(tempfile.mkdtemp(prefix=f"slimformer-bench-{backend}-"))
    # The tests' fast timings (short leases, 0.1 s broker polling, one thread) would flatter or
    # hobble the numbers: measure the shipped defaults.
    env, cleanup = harness.service_env(
        data_dir,
        SLIMFORMER_LEASE_S="60",
        SLIMFORMER_REAPER_INTERVAL_S="15",
        SLIMFORMER_REQUEUE_AFTER_S="300",
        SLIMFORMER_PROGRESS_MIN_INTERVAL_S="0.5",
        SLIMFORMER_BROKER_POLLING_INTERVAL_S="0.2",
        OMP_NUM_THREADS=str(os.cpu_count()),
    )
    service = harness.Service(
        env=env, data_dir=data_dir, base_url=f"http://127.0.0.1:{harness.free_port()}"
    )
    return service, cleanup


def run_backend(backend: str, repeats: int) -> dict:
    harness = _harness(backend)
    service, cleanup = _service(harness, backend)
    try:
        service.cli("migrate")
        service.start_api()
        service.start_worker()
        with service.client() as client:
            model_id = harness.builtin_id(client, "models", "all-MiniLM-L6-v2")
            quick = {
                "model_id": model_id,
                "recipe": {"stages": [{"method": "dynamic_int8"}]},
                "evaluation": {"metrics": ["size"]},
            }
            harness.wait_for(
                client, client.post("/v1/jobs", json=quick).json()["id"], {"succeeded"}, timeout=600
            )  # warm-up: worker imports torch
            queue_latency = []
            for _ in range(repeats):
                job = client.post("/v1/jobs", json=quick).json()
                job = harness.wait_for(client, job["id"], {"succeeded", "failed"}, timeout=600)
                queue_latency.append(_seconds(job, "created_at", "started_at"))
            full = {"model_id": model_id, "recipe": {"stages": [{"method": "dynamic_int8"}]}}
            job = client.post("/v1/jobs", json=full).json()
            job = harness.wait_for(client, job["id"], {"succeeded", "failed"}, timeout=1200)
            assert job["status"] == "succeeded", job
        metrics = job["metrics"]
        return {
            "backend": backend,
            "queue_to_running_s": {
                "median": statistics.median(queue_latency),
                "min": min(queue_latency),
                "max": max(queue_latency),
                "samples": queue_latency,
            },
            "minilm_dynamic_int8": {
                "job_wall_s": _seconds(job, "created_at", "finished_at"),
                "run_s": _seconds(job, "started_at", "finished_at"),
                "embedding_cosine": metrics["compressed"]["embedding_cosine"],
                "embedding_cosine_min": metrics["compressed"]["embedding_cosine_min"],
                "size_bytes": {
                    "baseline": metrics["baseline"]["size_bytes"],
                    "compressed": metrics["compressed"]["size_bytes"],
                },
                "latency_ms_p50": {
                    "baseline": metrics["baseline"].get("latency_ms_p50"),
                    "compressed": metrics["compressed"].get("latency_ms_p50"),
                },
                "evaluation_settings": metrics["settings"],
            },
        }
    finally:
        service.stop()
        cleanup()


def _queued_messages(service, backend: str) -> int:  # noqa: ANN001
    """Messages waiting in the job queues, read from the broker itself."""
    if backend == "embedded":
        return len(list((service.data_dir / "broker" / "queue").glob("*.msg")))
    import redis

    client = redis.Redis.from_url(service.env["SLIMFORMER_BROKER_URL"])
    prefix = service.env["SLIMFORMER_QUEUE_PREFIX"]
    return sum(client.llen(f"{prefix}{queue}") for queue in ("cpu", "gpu"))


def run_stale(backend: str, cancelled: int, resend: bool = False) -> dict:
    """`cancelled` jobs submitted and cancelled with no worker up; then a worker starts, and one
    real job is submitted once it is ready: its wait to start, and what the worker did. With
    `resend`, a message for each cancelled job is sent again before the worker starts (what a
    broker that cannot withdraw a message keeps, or a duplicate re-send)."""
    import subprocess
    import sys
    import time

    harness = _harness(backend)
    service, cleanup = _service(harness, backend)
    try:
        service.cli("migrate")
        service.start_api()
        with service.client() as client:
            model_id = harness.builtin_id(client, "models", "all-MiniLM-L6-v2")
            quick = {
                "model_id": model_id,
                "recipe": {"stages": [{"method": "dynamic_int8"}]},
                "evaluation": {"metrics": ["size"]},
            }
            started = time.monotonic()
            for _ in range(cancelled):
                job = client.post("/v1/jobs", json=quick).json()
                assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
            submit_and_cancel_s = time.monotonic() - started
            if resend:
                ids, after = [], None
                while True:
                    params = {"limit": 100, **({"after": after} if after else {})}
                    page = client.get("/v1/jobs", params=params).json()
                    ids += [j["id"] for j in page["data"]]
                    if not page["has_more"]:
                        break
                    after = ids[-1]
                subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        "import sys; from app import broker\n"
                        "for job_id in sys.argv[1:]: broker.send_run_job(job_id, 'cpu')",
                        *ids,
                    ],
                    env=service.env,
                    check=True,
                    timeout=600,
                )
            left_in_broker = _queued_messages(service, backend)
            service.start_worker()
            deadline = time.monotonic() + 300
            while not any(w["live"] for w in client.get("/v1/workers").json()["data"]):
                assert time.monotonic() < deadline, "the worker did not come up"
                time.sleep(0.2)
            job = client.post("/v1/jobs", json=quick).json()
            job = harness.wait_for(client, job["id"], {"succeeded", "failed"}, timeout=1200)
            assert job["status"] == "succeeded", job
        log = next(service.data_dir.glob("worker-*.log")).read_text(errors="replace")
        return {
            "backend": backend,
            "cancelled_jobs": cancelled,
            "messages_sent_again": resend,
            "submit_and_cancel_s": submit_and_cancel_s,
            "messages_left_in_broker": left_in_broker,
            "next_job_queue_to_running_s": _seconds(job, "created_at", "started_at"),
            "worker_log": {
                "stale_dropped_before_the_pool": log.count("dropped a stale message"),
                "not_queued_in_a_pool_child": log.count("is not queued"),
            },
        }
    finally:
        service.stop()
        cleanup()


async def http_load(
    base_url: str,
    path: str,
    headers: dict[str, str],
    clients: int,
    seconds: float,
    *,
    body: bytes | None = None,
    expect: int = 200,
) -> list[float]:
    """`clients` keep-alive HTTP/1.1 connections each sending GET `path` back to back for `seconds`;
    the latency of every answer. A few lines over raw asyncio streams rather than an HTTP client
    library: the load generator shares the machine's cores with the server, and an httpx client
    spends about as much CPU per request as the API does, so it would measure itself."""
    import asyncio
    import time
    from urllib.parse import urlsplit

    url = urlsplit(base_url)
    sent = {k: v for k, v in headers.items() if k.lower() not in ("host", "content-length")}
    if body is not None:
        sent |= {"Content-Type": "application/json", "Content-Length": str(len(body))}
    request = (
        f"{'GET' if body is None else 'POST'} {path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in sent.items())
        + "\r\n"
    ).encode() + (body or b"")
    latencies: list[float] = []
    stop = time.monotonic() + seconds

    async def one_client() -> None:
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        try:
            while time.monotonic() < stop:
                started = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                if status != expect:
                    raise AssertionError(f"{path} answered {status}")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - started)
        finally:
            writer.close()

    await asyncio.gather(*(one_client() for _ in range(clients)))
    return latencies


MINILM_INT8 = {"stages": [{"method": "dynamic_int8"}]}


def _started_api(harness, service) -> tuple[dict, dict[str, str]]:  # noqa: ANN001
    """Migrate, start the API, and return the body of a MiniLM dynamic_int8 job (not submitted)
    with the client's auth headers."""
    service.cli("migrate")
    service.start_api()
    with service.client() as client:
        job = {
            "model_id": harness.builtin_id(client, "models", "all-MiniLM-L6-v2"),
            "recipe": MINILM_INT8,
        }
        return job, dict(client.headers)


def _queued_job(harness, service) -> tuple[dict, dict[str, str]]:  # noqa: ANN001
    """A started API with one queued MiniLM job (no job worker runs): the job and auth headers."""
    body, headers = _started_api(harness, service)
    with service.client() as client:
        return client.post("/v1/jobs", json=body).json(), headers


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its children: the API's processes."""
    import psutil

    processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return sum(sum(process.cpu_times()[:2]) for process in processes)


def run_reads(
    backend: str, workers: list[int], clients: int, seconds: float, repeats: int
) -> list[dict]:
    """GET /v1/jobs/{id} from `clients` concurrent keep-alive clients for `seconds`, `repeats`
    times, against `slimformer api --workers N` for each N (no job worker: the job stays queued).
    The row quotes the median run (by requests per second)."""
    import asyncio

    harness = _harness(backend)
    service, cleanup = _service(harness, backend)
    rows = []
    try:
        job, headers = _queued_job(harness, service)

        for count in workers:
            api = service.with_api("--workers", str(count))
            path = f"/v1/jobs/{job['id']}"
            asyncio.run(http_load(api.base_url, path, headers, clients, 3.0))  # warm-up
            runs = []
            for _ in range(repeats):
                cpu_before = _cpu_seconds(api.api_process.pid)
                latencies = sorted(
                    asyncio.run(http_load(api.base_url, path, headers, clients, seconds))
                )
                cpu = _cpu_seconds(api.api_process.pid) - cpu_before
                runs.append(
                    {
                        "requests_per_s": len(latencies) / seconds,
                        "p50_ms": 1000 * latencies[len(latencies) // 2],
                        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
                        # the API's own CPU per answer: what the shared machine's load hides
                        "api_cpu_ms_per_request": 1000 * cpu / len(latencies),
                    }
                )
            median = sorted(runs, key=lambda run: run["requests_per_s"])[len(runs) // 2]
            rows.append(
                {
                    "backend": backend,
                    "api_workers": count,
                    "clients": clients,
                    "seconds": seconds,
                    **median,
                    "runs": runs,
                }
            )
            os.killpg(api.api_process.pid, 15)
            api.api_process.wait(timeout=30)
        return rows
    finally:
        service.stop()
        cleanup()


def _percentiles(latencies: list[float], seconds: float) -> dict:
    latencies = sorted(latencies)
    return {
        "requests": len(latencies),
        "requests_per_s": len(latencies) / seconds,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
    }


def run_posts(backend: str, clients: int, seconds: float, repeats: int, workers: int = 1) -> dict:
    """POST /v1/jobs (a MiniLM dynamic_int8 job; no job worker, so they stay queued) from
    `clients` concurrent keep-alive clients for `seconds`, `repeats` times, against `slimformer
    api --workers N`: the median run (by p99)."""
    import asyncio

    harness = _harness(backend)
    service, cleanup = _service(harness, backend)
    try:
        job, headers = _started_api(harness, service)
        api = service.with_api("--workers", str(workers)) if workers > 1 else service
        body = json.dumps(job).encode()
        load = http_load(api.base_url, "/v1/jobs", headers, clients, 3.0, body=body, expect=202)
        asyncio.run(load)  # warm-up
        runs = []
        for _ in range(repeats):
            cpu_before = _cpu_seconds(api.api_process.pid)
            latencies = asyncio.run(
                http_load(
                    api.base_url, "/v1/jobs", headers, clients, seconds, body=body, expect=202
                )
            )
            cpu = _cpu_seconds(api.api_process.pid) - cpu_before
            # the API's own CPU per answer: what the shared machine's load hides
            api_cpu = {"api_cpu_ms_per_request": 1000 * cpu / max(len(latencies), 1)}
            runs.append(_percentiles(latencies, seconds) | api_cpu)
        median = sorted(runs, key=lambda run: run["p99_ms"])[len(runs) // 2]
        return {
            "scenario": "post",
            "backend": backend,
            "api_workers": workers,
            "clients": clients,
            **median,
            "runs": runs,
        }
    finally:
        service.stop()
        cleanup()


def run_sse(backend: str, streams: int, clients: int, seconds: float) -> dict:
    """`streams` Server-Sent-Events clients held open on one queued job, then GET /v1/jobs/{id}
    from `clients` keep-alive clients for `seconds` alongside: GET latency, the API's RSS growth
    for the streams, and how many streams were still open at the end."""
    import asyncio
    import time
    from urllib.parse import urlsplit

    import psutil

    harness = _harness(backend)
    service, cleanup = _service(harness, backend)
    try:
        job, headers = _queued_job(harness, service)
        api = psutil.Process(service.api_process.pid)
        path = f"/v1/jobs/{job['id']}"
        url = urlsplit(service.base_url)
        request = (
            f"GET {path}/events HTTP/1.1\r\nHost: {url.netloc}\r\nAccept: text/event-stream\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items() if k.lower() != "host")
            + "\r\n"
        ).encode()

        async def scenario() -> dict:
            await http_load(service.base_url, path, headers, clients, 2.0)  # warm-up
            rss_before = api.memory_info().rss
            opened: list[asyncio.StreamWriter] = []
            open_streams = 0
            first_events: list[float] = []  # when each stream got its first event

            async def stream() -> None:
                nonlocal open_streams
                reader, writer = await asyncio.open_connection(url.hostname, url.port)
                opened.append(writer)
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                assert head[9:12] == b"200", head
                open_streams += 1
                try:
                    while chunk := await reader.read(65536):
                        # the job's events, then heartbeats (the head comes before any event)
                        if b"data:" in chunk:
                            first_events.append(time.monotonic())
                            break
                    while await reader.read(65536):
                        pass
                finally:
                    open_streams -= 1

            started = time.monotonic()
            tasks = [asyncio.create_task(stream()) for _ in range(streams)]
            while open_streams < streams:
                assert time.monotonic() - started < 120, f"{open_streams} streams open"
                failed = [t for t in tasks if t.done() and t.exception()]
                assert not failed, failed[0].exception()
                await asyncio.sleep(0.1)
            connect_s = time.monotonic() - started
            await asyncio.sleep(2.0)
            rss_held = api.memory_info().rss
            cpu_before = _cpu_seconds(api.pid)
            served_before_load = len(first_events)
            latencies = await http_load(service.base_url, path, headers, clients, seconds)
            cpu = _cpu_seconds(api.pid) - cpu_before
            still_open = open_streams
            served = len(first_events)
            for writer in opened:
                writer.close()
            await asyncio.gather(*tasks, return_exceptions=True)
            return {
                "scenario": "sse",
                "backend": backend,
                "streams": streams,
                "streams_open_after_the_load": still_open,
                "seconds_to_open_all": connect_s,
                # streams answer their head before their first read: how many had had their
                # first event when the GETs began, and when the last one had it
                "streams_with_an_event_at_load_start": served_before_load,
                "seconds_to_first_event_all": (
                    max(first_events) - started if served == streams else None
                ),
                "api_rss_growth_mb": (rss_held - rss_before) / 2**20,
                "clients": clients,
                **_percentiles(latencies, seconds),
                # the API's own CPU per answer (its streams' heartbeats included): what the
                # shared machine's load hides
                "api_cpu_ms_per_request": 1000 * cpu / max(len(latencies), 1),
            }

        return asyncio.run(scenario())
    finally:
        service.stop()
        cleanup()


def load_markdown(rows: list[dict]) -> str:
    def cells(r: dict) -> list:
        sse = r["scenario"] == "sse"
        return [
            "POST /v1/jobs" if r["scenario"] == "post" else "GET /v1/jobs/{id} beside SSE",
            r["backend"],
            r["api_workers"],
            r["clients"],
            f"{r['streams']} ({r['streams_open_after_the_load']})" if sse else "-",
            r.get("streams_with_an_event_at_load_start", "-"),
            f"{r['api_rss_growth_mb']:.0f}" if sse else "-",
            f"{r['requests_per_s']:.0f}",
            f"{r['p50_ms']:.1f}",
            f"{r['p99_ms']:.1f}",
            f"{r['api_cpu_ms_per_request']:.1f}" if "api_cpu_ms_per_request" in r else "-",
        ]

    header = ["scenario", "backend", "API processes", "clients"]
    header += [
        "SSE streams held (open at the end)",
        "streams with their first event when GETs began",
    ]
    header += ["API RSS growth MB", "req/s", "p50 ms", "p99 ms", "API CPU ms per request"]
    return results_file.table(header, map(cells, rows))


def write_load(results: list[dict], args: argparse.Namespace) -> None:
    """bench/results/service_load.{json,md}: rows kept per (label, scenario, backend, API
    processes), so the runs before a change and after it sit together."""
    commands = {
        "post": "python -m bench.service_bench --scenario post --clients 50 --repeats 3 "
        "--seconds 10 --api-workers 1,2 --label <label>",
        "sse": "python -m bench.service_bench --scenario sse --streams 1000 --clients 20",
    }
    tables = results_file.write_labelled(
        "service_load",
        results,
        label=args.label,
        key=lambda row: (
            row.get("label", ""),
            row["scenario"],
            row["backend"],
            row.get("api_workers", 1),
        ),
        render=load_markdown,
        intro="# POST p99 at 50 clients; GET beside 1,000 SSE streams\n\nOne API process unless "
        "the row says more; the load "
        "generator (raw asyncio streams) runs on the same 2 cores, and the machine was shared "
        "with other work (noisy). A stream's head is answered before its first read: the "
        "streams column after it counts those that had their first event when the GETs began "
        "(the others were still being served alongside). Reproduce: `"
        + "`, `".join(commands.values())
        + "` (add `--backend embedded|postgres`).\n\n",
        body={"commands": commands},
        defaults={"label": "", "api_workers": 1},  # rows from before labels and --api-workers
    )
    print(tables)


def reads_markdown(rows: list[dict]) -> str:
    header = ["backend", "API processes", "clients", "GET /v1/jobs/{id} req/s", "p50 ms"]
    header += ["p99 ms", "API CPU ms per request"]
    return results_file.table(
        header,
        (
            [r["backend"], r["api_workers"], r["clients"], f"{r['requests_per_s']:.0f}"]
            + [f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['api_cpu_ms_per_request']:.2f}"]
            for r in rows
        ),
    )


def stale_markdown(results: list[dict]) -> str:
    header = ["backend", "cancelled jobs", "sent again", "messages left in the broker"]
    header += ["next job queue→running (s)", "dropped before the pool"]
    header += ["no-op runs in a pool child"]
    return results_file.table(
        header,
        (
            [r["backend"], r["cancelled_jobs"], r.get("messages_sent_again", False)]
            + [r["messages_left_in_broker"], f"{r['next_job_queue_to_running_s']:.2f}"]
            + [r["worker_log"]["stale_dropped_before_the_pool"]]
            + [r["worker_log"]["not_queued_in_a_pool_child"]]
            for r in results
        ),
    )


def markdown(results: list[dict]) -> str:
    header = ["backend", "queue→running median (s)", "MiniLM job wall (s)", "cosine (mean / min)"]
    header += ["size MB (fp32 → int8)", "latency p50 ms (fp32 → int8)"]
    rows = []
    for r in results:
        m = r["minilm_dynamic_int8"]
        size, latency = m["size_bytes"], m["latency_ms_p50"]
        rows.append(
            [r["backend"], f"{r['queue_to_running_s']['median']:.2f}", f"{m['job_wall_s']:.1f}"]
            + [f"{m['embedding_cosine']:.4f} / {m['embedding_cosine_min']:.4f}"]
            + [f"{size['baseline'] / 1e6:.1f} → {size['compressed'] / 1e6:.1f}"]
            + [f"{latency['baseline']:.1f} → {latency['compressed']:.1f}"]
        )
    return results_file.table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["embedded", "postgres", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--scenario", choices=["jobs", "stale", "reads", "post", "sse"], default="jobs"
    )
    parser.add_argument("--streams", type=int, default=1000, help="SSE clients held (sse)")
    parser.add_argument("--api-workers", default="1,2", help="API processes to try (reads, post)")
    parser.add_argument("--clients", type=int, default=20, help="concurrent clients (reads)")
    parser.add_argument("--seconds", type=float, default=10.0, help="load per setting (reads)")
    parser.add_argument("--stale", type=int, default=200, help="cancelled jobs (--scenario stale)")
    parser.add_argument("--label", default="", help="a name for this run's rows")
    parser.add_argument(
        "--resend", action="store_true", help="send the cancelled jobs' messages again (stale)"
    )
    args = parser.parse_args()
    backends = ["embedded", "postgres"] if args.backend == "both" else [args.backend]
    if args.scenario == "reads":
        counts = [int(n) for n in args.api_workers.split(",")]
        rows = [
            row
            for backend in backends
            for row in run_reads(backend, counts, args.clients, args.seconds, args.repeats)
        ]
        write_reads(rows, args)
        return
    if args.scenario == "post":
        write_load(
            [
                run_posts(backend, args.clients, args.seconds, args.repeats, workers)
                for backend in backends
                for workers in (int(n) for n in args.api_workers.split(","))
            ],
            args,
        )
        return
    if args.scenario == "sse":
        write_load(
            [run_sse(backend, args.streams, args.clients, args.seconds) for backend in backends],
            args,
        )
        return
    if args.scenario == "stale":
        write_stale([run_stale(backend, args.stale, args.resend) for backend in backends], args)
        return
    results = [run_backend(backend, args.repeats) for backend in backends]
    body = {
        "machine": results_file.machine(),
        "command": "python -m bench.service_bench --backend " + args.backend,
        "results": results,
    }
    table = markdown(results)
    results_file.write(
        "service",
        body,
        "# Service benchmark\n\nMiniLM `dynamic_int8`, default evaluation (lee-sentences, 256 "
        "texts, seq 512; latency batch 1 × 128, 20 runs). Reproduce: `"
        + body["command"]
        + "`.\n\n"
        + table,
    )
    print(table)


def write_reads(results: list[dict], args: argparse.Namespace) -> None:
    """bench/results/reads.{json,md}; rows are kept per (label, backend, processes, clients), so
    the runs before a change and after it sit together."""
    command = (
        f"python -m bench.service_bench --scenario reads --backend {args.backend} "
        f"--api-workers {args.api_workers} --clients {args.clients} --seconds {args.seconds:g} "
        f"--repeats {args.repeats} --label <label>"
    )
    tables = results_file.write_labelled(
        "reads",
        results,
        label=args.label,
        key=lambda row: (row["label"], row["backend"], row["api_workers"], row["clients"]),
        render=reads_markdown,
        intro="# GET /v1/jobs/{id} throughput\n\nKeep-alive clients on raw asyncio streams (the "
        "load generator runs on the same 2 cores as the API, and the machine was shared with "
        "other work: noisy). Each row: the median of its runs by req/s. Reproduce: `"
        + command
        + "`.\n\n",
        body={"command": command},
    )
    print(tables)


def write_stale(results: list[dict], args: argparse.Namespace) -> None:
    """Rows are kept per (label, backend), so a run before a change and one after sit together."""
    command = f"python -m bench.service_bench --scenario stale --stale {args.stale}" + (
        " --resend" if args.resend else ""
    )
    tables = results_file.write_labelled(
        "stale_messages",
        results,
        label=args.label,
        key=lambda row: (row["label"], row["backend"]),
        render=stale_markdown,
        intro="# Stale messages\n\nJobs submitted and cancelled with no worker up, then a worker "
        "starts and one real MiniLM `dynamic_int8` job (size only) is submitted once the worker is "
        "live: how long it waits to start. `before`: the code before stale messages were made "
        "cheap (the worker's pool ran each one, a child forked anew every 20). `sent again` "
        "(`--resend`): each cancelled job's message is sent again before the worker starts, as a "
        "broker that cannot withdraw a message would keep it. Reproduce: `python -m "
        "bench.service_bench --scenario stale --stale 200 [--resend] --label NAME`.\n\n",
        body={"command": command},
    )
    print(tables)


if __name__ == "__main__":
    main()
