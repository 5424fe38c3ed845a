"""Another project's ids answer 404, never 403, and nothing of theirs changes."""

from __future__ import annotations

import pytest

from tests.conftest import Service, wait_for
from tests.service.conftest import tar_gz
from tests.service.test_api import FAST_EVAL

pytestmark = pytest.mark.service


def test_project_b_sees_nothing_of_project_a(service: Service, tiny_bert) -> None:  # noqa: ANN001
    with service.client("tenant-a") as a, service.client("tenant-b") as b:
        model = a.post(
            "/v1/models",
            files={"file": ("m.tar.gz", tar_gz(tiny_bert))},
            data={"name": "a-private"},
        ).json()
        dataset = a.post("/v1/datasets", files={"file": ("d.txt", b"one\ntwo\nthree\n")}).json()
        job = a.post(
            "/v1/jobs",
            json={
                "model_id": model["id"],
                "recipe": {"stages": [{"method": "dynamic_int8"}]},
                "evaluation": FAST_EVAL,
            },
        ).json()
        job = wait_for(a, job["id"], {"succeeded", "failed"})
        assert job["status"] == "succeeded", job
        artifact_id = job["artifact_ids"][0]

        for path in (
            f"/v1/models/{model['id']}",
            f"/v1/datasets/{dataset['id']}",
            f"/v1/jobs/{job['id']}",
            f"/v1/jobs/{job['id']}/events",
            f"/v1/jobs/{job['id']}/artifacts",
            f"/v1/artifacts/{artifact_id}/content",
        ):
            response = b.get(path)
            assert response.status_code == 404, path
            assert response.json()["error"]["code"] == "not_found"
        assert b.post(f"/v1/jobs/{job['id']}/cancel").status_code == 404
        assert b.post(f"/v1/jobs/{job['id']}/retry").status_code == 404
        assert b.delete(f"/v1/jobs/{job['id']}").status_code == 404
        assert b.delete(f"/v1/models/{model['id']}").status_code == 404
        # B cannot use A's model or dataset in a job either.
        stolen = b.post(
            "/v1/jobs",
            json={"model_id": model["id"], "recipe": {"stages": [{"method": "dynamic_int8"}]}},
        )
        assert stolen.status_code == 404
        assert model["id"] not in {m["id"] for m in b.get("/v1/models?limit=100").json()["data"]}
        assert b.get("/v1/jobs").json()["data"] == []
        # ...and A still has everything.
        assert a.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"
        assert a.get(f"/v1/artifacts/{artifact_id}/content").status_code == 200
