"""A pruning job through the API: Wanda on the real MiniLM, its reported sparsity and the smaller,
bitmask-compressed artifact the job measured."""

from __future__ import annotations

import pytest

from tests.conftest import Service, builtin_id, wait_for

pytestmark = [pytest.mark.service, pytest.mark.real_model]


def test_minilm_wanda_job_reports_its_sparsity(service: Service) -> None:
    with service.client() as client:
        model_id = builtin_id(client, "models", "all-MiniLM-L6-v2")
        sentences_id = builtin_id(client, "datasets", "lee-sentences")
        response = client.post(
            "/v1/jobs",
            json={
                "model_id": model_id,
                "recipe": {"stages": [{"method": "wanda", "sparsity": 0.5}]},
                "calibration": {"dataset_id": sentences_id, "num_samples": 16, "seq_len": 64},
                "evaluation": {
                    "dataset_id": sentences_id,
                    "metrics": ["embedding_cosine", "size"],
                    "max_samples": 64,
                    "seq_len": 128,
                },
            },
        )
        assert response.status_code == 202, response.text
        job = wait_for(client, response.json()["id"], {"succeeded", "failed"}, timeout=600)
        assert job["status"] == "succeeded", (job, service.logs())
    metrics = job["metrics"]
    stage = metrics["stages"][0]
    assert stage["method"] == "wanda" and stage["pruned_layers"] == 36
    assert stage["sparsity"] == 0.5 and stage["calibration_samples"] == 16
    assert set(stage["layer_sparsity"].values()) == {0.5}
    # Job artifacts keep the zeros dense so that plain transformers loads them (it cannot read
    # compressed-tensors' sparse layouts and would silently load random weights): same size.
    assert "sparse_layers_exact" not in metrics["export_check"]
    assert metrics["compressed"]["size_bytes"] > 0.95 * metrics["baseline"]["size_bytes"]
    assert metrics["compressed"]["embedding_cosine"] > 0.8  # measured 0.856
