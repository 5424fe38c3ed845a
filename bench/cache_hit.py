"""Result-cache hit latency: a MiniLM `dynamic_int8` job, then identical jobs that reuse it, on each
backend with one idle worker. Writes bench/results/cache.{json,md}.

    .venv/bin/python -m bench.cache_hit                     # both backends
    .venv/bin/python -m bench.cache_hit --backend embedded

Times are the job row's own: `created_at` (the API committed it) → `finished_at` (succeeded), so
the number is the whole path of a hit (broker → worker claim → fingerprint → one transaction), and
`started_at` → `finished_at` is the worker's part of it. The first run is the fresh job they reuse.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
EVALUATION = {"metrics": ["embedding_cosine", "size"], "max_samples": 8, "seq_len": 32}


def seconds(job: dict, start: str, end: str) -> float:
    return (datetime.fromisoformat(job[end]) - datetime.fromisoformat(job[start])).total_seconds()


def run_backend(backend: str, repeats: int) -> dict:
    os.environ["SLIMFORMER_TEST_BACKEND"] = backend
    import importlib

    import tests.conftest as harness

    importlib.reload(harness)  # BACKEND is read at import
    data_dir = Path(tempfile.mkdtemp(prefix=f"slimformer-bench-cache-{backend}-"))
    env, cleanup = harness.service_env(
        data_dir,
        SLIMFORMER_LEASE_S="60",
        SLIMFORMER_REAPER_INTERVAL_S="15",
        SLIMFORMER_REQUEUE_AFTER_S="300",
        SLIMFORMER_BROKER_POLLING_INTERVAL_S="0.2",
    )
    service = harness.Service(
        env=env, data_dir=data_dir, base_url=f"http://127.0.0.1:{harness.free_port()}"
    )
    hits = []
    try:
        service.cli("migrate")
        service.start_api()
        service.start_worker()
        with service.client() as client:
            body = {
                "model_id": harness.builtin_id(client, "models", "all-MiniLM-L6-v2"),
                "recipe": {"stages": [{"method": "dynamic_int8"}]},
                "evaluation": {
                    "dataset_id": harness.builtin_id(client, "datasets", "lee-sentences"),
                    **EVALUATION,
                },
            }
            fresh = client.post("/v1/jobs", json=body).json()
            fresh = harness.wait_for(client, fresh["id"], {"succeeded", "failed"}, timeout=600)
            assert fresh["status"] == "succeeded", fresh
            for _ in range(repeats):
                job = client.post("/v1/jobs", json=body).json()
                job = harness.wait_for(client, job["id"], {"succeeded", "failed"})
                assert job["metrics"]["reused_from"] == fresh["id"], job
                hits.append(job)
    finally:
        service.stop()
        cleanup()
    total = [seconds(job, "created_at", "finished_at") for job in hits]
    worker = [seconds(job, "started_at", "finished_at") for job in hits]
    return {
        "backend": backend,
        "repeats": repeats,
        "fresh_job_s": round(seconds(fresh, "created_at", "finished_at"), 3),
        "hit_s_median": round(statistics.median(total), 3),
        "hit_s_max": round(max(total), 3),
        "hit_worker_s_median": round(statistics.median(worker), 3),
        "hits_s": [round(value, 3) for value in total],
        "broker_polling_interval_s": 0.2 if backend == "embedded" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["embedded", "postgres", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    backends = ["embedded", "postgres"] if args.backend == "both" else [args.backend]
    started = time.monotonic()
    rows = [run_backend(backend, args.repeats) for backend in backends]
    RESULTS.mkdir(exist_ok=True)
    record = {
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "results": rows,
        "wall_s": round(time.monotonic() - started, 1),
        "measured_at": datetime.now(UTC).isoformat(),
    }
    (RESULTS / "cache.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# Result-cache hits (MiniLM dynamic_int8, tiny evaluation; job created → succeeded)",
        "",
        "| backend | fresh job s | hits | hit median s | hit max s | worker part median s |",
        "|---|---|---|---|---|---|",
        *(
            f"| {row['backend']} | {row['fresh_job_s']} | {row['repeats']} | "
            f"{row['hit_s_median']} | {row['hit_s_max']} | {row['hit_worker_s_median']} |"
            for row in rows
        ),
        "",
        f"{record['cpus']} CPUs, load average {', '.join(f'{v:.1f}' for v in record['load_average'])}"
        " at the end (shared machine). A hit's time is mostly the broker's delivery (the",
        "filesystem broker polls every 0.2 s); the worker's part is the claim, the fingerprint and",
        "one transaction. All hits are in cache.json.",
    ]
    (RESULTS / "cache.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
