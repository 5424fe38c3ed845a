"""Service numbers on this machine: queue-to-running latency on each broker, and a real MiniLM
dynamic_int8 job's wall time, size and cosine. Writes bench/results/service.{json,md}.

    .venv/bin/python -m bench.service_bench            # both backends (needs PostgreSQL + Redis)
    .venv/bin/python -m bench.service_bench --backend embedded

It starts the real API and a real Celery worker as processes (the same harness the service tests
use), submits jobs over HTTP while the worker is idle, and reads the timestamps the service records.
Medians, because these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from datetime import datetime
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _seconds(job: dict, start: str, end: str) -> float:
    return (datetime.fromisoformat(job[end]) - datetime.fromisoformat(job[start])).total_seconds()


def run_backend(backend: str, repeats: int) -> dict:
    os.environ["SLIMFORMER_TEST_BACKEND"] = backend
    import importlib

    import tests.conftest as harness

    importlib.reload(harness)  # BACKEND is read at import
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


def markdown(results: list[dict]) -> str:
    lines = [
        "| backend | queue→running median (s) | MiniLM job wall (s) | cosine (mean / min) "
        "| size MB (fp32 → int8) | latency p50 ms (fp32 → int8) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r["minilm_dynamic_int8"]
        lines.append(
            f"| {r['backend']} | {r['queue_to_running_s']['median']:.2f} | {m['job_wall_s']:.1f} "
            f"| {m['embedding_cosine']:.4f} / {m['embedding_cosine_min']:.4f} "
            f"| {m['size_bytes']['baseline'] / 1e6:.1f} → {m['size_bytes']['compressed'] / 1e6:.1f} "
            f"| {m['latency_ms_p50']['baseline']:.1f} → {m['latency_ms_p50']['compressed']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["embedded", "postgres", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    backends = ["embedded", "postgres"] if args.backend == "both" else [args.backend]
    results = [run_backend(backend, args.repeats) for backend in backends]
    RESULTS.mkdir(exist_ok=True)
    body = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "command": "python -m bench.service_bench --backend " + args.backend,
        "results": results,
    }
    (RESULTS / "service.json").write_text(json.dumps(body, indent=2) + "\n")
    table = markdown(results)
    (RESULTS / "service.md").write_text(
        "# Service benchmark\n\nMiniLM `dynamic_int8`, default evaluation (lee-sentences, 256 "
        "texts, seq 512; latency batch 1 × 128, 20 runs). Reproduce: `"
        + body["command"]
        + "`.\n\n"
        + table
    )
    print(table)


if __name__ == "__main__":
    main()
