"""Deleting a job deletes its search trials; deleting a model deletes what its jobs left in storage
besides their results: the search trials of its jobs and the baseline cache's state measured on its bytes (kept while another model of the
project has the same bytes). A real search job, on the real storage (the local filesystem)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import builtin_id, running_service, wait_for, wait_for_model
from tests.service.conftest import tar_gz

pytestmark = pytest.mark.service


def stored(storage: Path, prefix: str) -> list[str]:
    root = storage / prefix
    return sorted(str(p.relative_to(storage)) for p in root.rglob("*") if p.is_file())


def test_deleting_a_model_deletes_its_trials_and_baseline_state(tmp_path: Path, tiny_bert) -> None:  # noqa: ANN001
    with running_service(tmp_path) as service:
        storage = service.data_dir / "storage"
        with service.client() as client:
            archive = tar_gz(tiny_bert)
            models = []
            for name in ("tiny", "tiny-again"):  # the same bytes twice
                response = client.post(
                    "/v1/models", files={"file": ("m.tar.gz", archive)}, data={"name": name}
                )
                assert response.status_code == 201, response.text
                model = wait_for_model(client, response.json())
                assert model["status"] == "ready", model
                models.append(model)
            first, twin = models
            search = {
                "model_id": first["id"],
                "evaluation": {
                    "dataset_id": builtin_id(client, "datasets", "lee-sentences"),
                    "metrics": ["embedding_cosine", "size"],
                    "max_samples": 16,
                    "seq_len": 32,
                },
                "targets": {
                    "min_metric": {"embedding_cosine": 0.5},
                    "budget": {"max_trials": 2},
                },
            }
            response = client.post("/v1/jobs", json=search)
            assert response.status_code == 202, response.text
            job = wait_for(client, response.json()["id"], {"succeeded", "failed"}, timeout=600)
            assert job["status"] == "succeeded", (job, service.logs())
            assert job["metrics"]["trials"]
            assert stored(storage, "search/trials") == [f"search/trials/{job['id']}.json"]

            # The same search on the twin, then that job deleted: its trials go, not the other's.
            response = client.post("/v1/jobs", json={**search, "model_id": twin["id"]})
            assert response.status_code == 202, response.text
            other = wait_for(client, response.json()["id"], {"succeeded", "failed"}, timeout=600)
            assert other["status"] == "succeeded", (other, service.logs())
            assert len(stored(storage, "search/trials")) == 2
            assert client.delete(f"/v1/jobs/{other['id']}").status_code == 204
            assert stored(storage, "search/trials") == [f"search/trials/{job['id']}.json"]
            baseline = stored(storage, "baseline-cache")
            assert len(baseline) == 1 and baseline[0].endswith(".safetensors"), baseline

            # The twin has the same bytes: the baseline state stays for it, the trials go.
            assert client.delete(f"/v1/models/{first['id']}").status_code == 204
            assert stored(storage, "search/trials") == []
            assert stored(storage, "baseline-cache") == baseline
            # The last model with those bytes: its baseline state goes.
            assert client.delete(f"/v1/models/{twin['id']}").status_code == 204
            assert stored(storage, "baseline-cache") == []
            # The job's own result is still there to read.
            assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"
