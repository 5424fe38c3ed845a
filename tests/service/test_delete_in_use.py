"""DELETE of a model or dataset is 409 `conflict` while a live job reads it (API.md), wherever the
job names it, a recipe stage included: a distillation's student model and its training text.

The service here has no worker, so a job stays queued until it is cancelled: "live" is not a race
with a worker finishing it first, and nothing has to run.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Service, builtin_id, running_service

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def idle_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_service(tmp_path_factory.mktemp("idle-service"), worker=False) as svc:
        yield svc


def submit_distill(client: httpx.Client, stage: dict, **fields: object) -> dict:
    teacher = builtin_id(client, "models", "all-MiniLM-L6-v2")
    response = client.post(
        "/v1/jobs",
        json={
            "model_id": teacher,
            "recipe": {"stages": [{"method": "distill", **stage}]},
            **fields,
        },
    )
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "queued"
    return response.json()


def assert_in_use(response: httpx.Response, job_id: str) -> None:
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["code"] == "conflict" and job_id in error["message"]


def test_a_dataset_used_only_as_training_text_is_kept_while_the_job_lives(
    idle_service: Service,
) -> None:
    with idle_service.client() as client:
        upload = client.post("/v1/datasets", files={"file": ("train.txt", b"one\ntwo\nthree\n")})
        assert upload.status_code == 201, upload.text
        dataset_id = upload.json()["id"]
        sentences_id = builtin_id(client, "datasets", "lee-sentences")
        job = submit_distill(
            client,
            {"student": {"num_layers": 2}, "dataset_id": dataset_id},
            evaluation={"dataset_id": sentences_id},
        )
        assert job["calibration"] is None  # not the job's calibration or evaluation set either

        assert_in_use(client.delete(f"/v1/datasets/{dataset_id}"), job["id"])
        assert client.get(f"/v1/datasets/{dataset_id}").status_code == 200

        assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
        assert client.delete(f"/v1/datasets/{dataset_id}").status_code == 204
        assert client.get(f"/v1/datasets/{dataset_id}").status_code == 404


def test_a_model_used_only_as_the_student_is_kept_while_the_job_lives(
    idle_service: Service,
) -> None:
    folder = idle_service.data_dir / "registered" / "student"
    folder.mkdir(parents=True)  # never read: with no worker, the model stays `validating`
    with idle_service.client() as client:
        registered = client.post(
            "/v1/models",
            json={"name": "student", "source": {"type": "path", "path": str(folder)}},
        )
        assert registered.status_code == 201, registered.text
        student_id = registered.json()["id"]
        job = submit_distill(client, {"student": {"model_id": student_id}})
        # Resolved at submission, so the worker reads them instead of choosing again.
        sentences_id = builtin_id(client, "datasets", "lee-sentences")
        assert job["evaluation"]["dataset_id"] == sentences_id
        assert job["recipe"]["stages"][0]["dataset_id"] == sentences_id

        assert_in_use(client.delete(f"/v1/models/{student_id}"), job["id"])
        assert client.get(f"/v1/models/{student_id}").status_code == 200

        assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
        assert client.delete(f"/v1/models/{student_id}").status_code == 204
        assert client.get(f"/v1/models/{student_id}").status_code == 404
