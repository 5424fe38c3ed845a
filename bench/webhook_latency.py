"""Webhook delivery latency: from the committed status change (the payload's `timestamp`) to the
signed request arriving at a real local receiver, on each backend, with the shipped defaults.
Writes bench/results/webhooks.{json,md}.

    .venv/bin/python -m bench.webhook_latency                     # both backends
    .venv/bin/python -m bench.webhook_latency --backend embedded

The event is `job.cancelled` of a job that waits for a GPU worker (there is none), cancelled over
HTTP: the transition happens in the API, the delivery in the worker's webhook companion, so the
number is outbox row → broker → delivery worker → receiver, without a job's run time in it.
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


def run_backend(backend: str, repeats: int) -> dict:
    os.environ["SLIMFORMER_TEST_BACKEND"] = backend
    import importlib

    import tests.conftest as harness
    from tests.service.test_webhooks import start_receiver

    importlib.reload(harness)  # BACKEND is read at import
    receiver, server = start_receiver()
    data_dir = Path(tempfile.mkdtemp(prefix=f"slimformer-bench-hooks-{backend}-"))
    env, cleanup = harness.service_env(
        data_dir,
        SLIMFORMER_LEASE_S="60",
        SLIMFORMER_REAPER_INTERVAL_S="15",
        SLIMFORMER_REQUEUE_AFTER_S="300",
        SLIMFORMER_BROKER_POLLING_INTERVAL_S="0.2",
        SLIMFORMER_WEBHOOK_ALLOWED_HOSTS=json.dumps(["127.0.0.1"]),
    )
    service = harness.Service(
        env=env, data_dir=data_dir, base_url=f"http://127.0.0.1:{harness.free_port()}"
    )
    latencies = []
    try:
        service.cli("migrate")
        service.start_api()
        service.start_worker()
        with service.client() as client:
            hook = client.post(
                "/v1/webhook-endpoints",
                json={"url": receiver.url("/bench"), "events": ["job.cancelled"]},
            ).json()
            receiver.secrets["/bench"] = hook["secret"]
            model_id = harness.builtin_id(client, "models", "all-MiniLM-L6-v2")
            time.sleep(5)  # let the webhook worker finish starting
            for index in range(repeats):
                job = client.post(
                    "/v1/jobs",
                    json={
                        "model_id": model_id,
                        "recipe": {"stages": [{"method": "rtn"}]},
                        "resources": {"device": "gpu"},
                    },
                ).json()
                assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
                got = receiver.wait("/bench", lambda got, n=index + 1: len(got) >= n)
                arrival = got[index]
                assert arrival.verified and arrival.payload["data"]["id"] == job["id"]
                sent = datetime.fromisoformat(arrival.payload["timestamp"])
                latencies.append((arrival.received_at - sent).total_seconds())
    finally:
        service.stop()
        cleanup()
        server.shutdown()
    return {
        "backend": backend,
        "repeats": repeats,
        "delivery_latency_s_median": round(statistics.median(latencies), 3),
        "delivery_latency_s_max": round(max(latencies), 3),
        "latencies_s": [round(value, 3) for value in latencies],
        "broker_polling_interval_s": 0.2 if backend == "embedded" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["embedded", "postgres", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    backends = ["embedded", "postgres"] if args.backend == "both" else [args.backend]
    rows = [run_backend(backend, args.repeats) for backend in backends]
    RESULTS.mkdir(exist_ok=True)
    record = {
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "results": rows,
        "measured_at": datetime.now(UTC).isoformat(),
    }
    (RESULTS / "webhooks.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# Webhook delivery latency (committed change → signed request at the receiver)",
        "",
        "| backend | repeats | median s | max s |",
        "|---|---|---|---|",
        *(
            f"| {row['backend']} | {row['repeats']} | {row['delivery_latency_s_median']} | "
            f"{row['delivery_latency_s_max']} |"
            for row in rows
        ),
        "",
        "The max is the first delivery after start (the webhook worker's first task and database",
        "connection); every later one is near the median. All latencies are in webhooks.json.",
    ]
    (RESULTS / "webhooks.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
