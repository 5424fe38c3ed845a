"""422 messages say what is wrong in our words: no pydantic prefixes, a missing method named."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.errors import install_error_handlers
from app.jobs.schemas import JobCreate


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/jobs")
    def create(spec: JobCreate) -> dict:
        return {}

    return TestClient(app)


def error(client: TestClient, stages: list[dict]) -> dict:
    response = client.post("/jobs", json={"model_id": "mdl_x", "recipe": {"stages": stages}})
    assert response.status_code == 422, response.text
    return response.json()["error"]


def test_a_missing_method_says_it_is_missing(client):
    found = error(client, [{"bits": 4}])
    assert found["param"] == "recipe.stages[0].method"
    assert found["message"].startswith("Missing method; expected one of: ")
    assert "rtn" in found["message"]


def test_an_unknown_method_says_it_is_unknown(client):
    found = error(client, [{"method": "int3"}])
    assert found["message"].startswith("Unknown method; expected one of: ")


def test_validator_messages_carry_no_library_prefix(client):
    found = error(client, [{"method": "smoothquant"}])  # a recipe-level check
    assert "Value error" not in found["message"]
    assert "follow it with w8a8" in found["message"], found
