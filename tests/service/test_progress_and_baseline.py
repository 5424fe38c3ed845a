"""What a running job shows and what a second job on the same model skips, over HTTP with the real
worker and MiniLM, on both backends: progress inside the measurements with one fraction that only
grows to 1.0 and one ETA; the original model's metrics measured once per project and evaluation
settings, latency excepted (workers/baseline_cache.py)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Service, builtin_id, running_service, wait_for

pytestmark = [pytest.mark.service, pytest.mark.real_model]

# 40 texts: two embedding batches of 32; a short latency run.
EVALUATION = {
    "metrics": ["embedding_cosine", "latency", "size"],
    "max_samples": 40,
    "seq_len": 32,
    "latency": {"runs": 3, "warmup": 1, "seq_len": 16},
}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """Progress events unthrottled, so that every step of these short phases is recorded."""
    with running_service(
        tmp_path_factory.mktemp("progress"), SLIMFORMER_PROGRESS_MIN_INTERVAL_S="0"
    ) as svc:
        yield svc


def run(client: httpx.Client, *, model_id: str, dataset_id: str, stage: dict, **evaluation) -> dict:
    response = client.post(
        "/v1/jobs",
        json={
            "model_id": model_id,
            "recipe": {"stages": [stage]},
            "evaluation": {"dataset_id": dataset_id, **EVALUATION, **evaluation},
        },
    )
    assert response.status_code == 202, response.text
    job = wait_for(client, response.json()["id"], {"succeeded", "failed"}, timeout=300)
    assert job["status"] == "succeeded", job
    return job


def events(client: httpx.Client, job_id: str) -> list[dict]:
    seen: list[dict] = []
    while True:
        params = {"limit": 100, "after": seen[-1]["seq"] if seen else 0}
        body = client.get(f"/v1/jobs/{job_id}/events", params=params).json()
        seen += body["data"]
        if not body["has_more"]:
            return seen


def worker_progress(seen: list[dict]) -> list[dict]:
    """The running job's progress (a queued job's notes about routing carry no numbers)."""
    return [e["data"] for e in seen if e["type"] == "progress" and "fraction" in (e["data"] or {})]


def test_progress_and_the_baseline_cache(service: Service) -> None:
    with service.client() as client:
        model_id = builtin_id(client, "models", "all-MiniLM-L6-v2")
        dataset_id = builtin_id(client, "datasets", "lee-sentences")
        common = {"model_id": model_id, "dataset_id": dataset_id}
        first = run(client, **common, stage={"method": "dynamic_int8"})

        seen = events(client, first["id"])
        progress = worker_progress(seen)
        labels = [data["label"] for data in progress]
        # Inside the long phases, as a person counts them.
        assert "measuring the original · batch 2/2" in labels
        assert "measuring the original · latency run 3/3" in labels
        assert "measuring the compressed model · batch 1/2" in labels
        assert "stage 1 of 1 · dynamic_int8 · layer 36/36" in labels
        fractions = [data["fraction"] for data in progress]
        assert fractions == sorted(fractions) and fractions[-1] == 1.0
        assert seen[-1]["type"] == "status" and seen[-2]["data"]["fraction"] == 1.0
        assert first["progress"]["fraction"] == 1.0 and first["progress"]["label"] == "done"
        # One ETA: a number once the job has run a while, and no other one in the messages.
        assert all("eta_s" in data for data in progress)
        assert any(isinstance(data["eta_s"], int | float) for data in progress[:-1])
        assert not any(" left" in event["message"] for event in seen)
        assert {d["recipe_num_stages"] for d in progress} == {1}
        assert first["metrics"]["baseline"]["cached"] is False

        # Another recipe (no result-cache hit), the same model and evaluation: the baseline is
        # read, not measured -- but its latency is measured again, in this job.
        second = run(client, **common, stage={"method": "dynamic_int8", "per_channel": False})
        baseline = second["metrics"]["baseline"]
        assert baseline["cached"] is True and baseline["cached_from"] == first["id"]
        for metric in ("size_bytes", "parameters", "bits_per_weight"):
            assert baseline[metric] == first["metrics"]["baseline"][metric]
        assert baseline["latency_runs"] == 3 and baseline["latency_ms_p50"] > 0
        labels = [
            e["data"]["label"] for e in events(client, second["id"]) if e["type"] == "progress"
        ]
        assert not any(label.startswith("measuring the original · batch") for label in labels)
        assert "measuring the original · latency run 3/3" in labels
        # The compressed model is still compared with the original's embeddings (from the cache).
        cosine = second["metrics"]["compressed"]["embedding_cosine"]
        assert 0.9 < cosine < 1.0

        # A changed evaluation setting measures the original again.
        third = run(client, **common, stage={"method": "dynamic_int8"}, max_samples=33)
        assert third["metrics"]["baseline"]["cached"] is False
