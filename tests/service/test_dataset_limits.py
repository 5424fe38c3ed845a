"""A dataset line over the per-record byte limit is a 422 naming the line, and nothing is kept."""

from __future__ import annotations

import json

import pytest

from tests.conftest import Service

pytestmark = pytest.mark.service

LIMIT = 1024 * 1024  # the default SLIMFORMER_MAX_RECORD_BYTES


def test_a_record_over_the_byte_limit_is_refused_naming_its_line(service: Service) -> None:
    ok = json.dumps({"text": "fine"}).encode() + b"\n"
    huge = json.dumps({"text": "x" * (3 * LIMIT)}).encode() + b"\n"  # one valid, 3 MB line
    with service.client() as client:
        before = client.get("/v1/datasets", params={"limit": 100}).json()["data"]
        response = client.post(
            "/v1/datasets",
            files={"file": ("big.jsonl", ok * 2 + huge + ok)},
            data={"name": "too-long"},
        )
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_request" and error["param"] == "file"
        assert error["message"].startswith("Line 3:") and str(LIMIT) in error["message"]
        assert client.get("/v1/datasets", params={"limit": 100}).json()["data"] == before
        stored = list((service.data_dir / "storage" / "datasets").glob("*/data"))
        assert all(path.stat().st_size < LIMIT for path in stored)
        # A line just under the limit is a record like any other.
        fits = json.dumps({"text": "y" * (LIMIT - 100)}).encode() + b"\n"
        accepted = client.post(
            "/v1/datasets", files={"file": ("fits.jsonl", ok + fits)}, data={"name": "fits"}
        )
        assert accepted.status_code == 201, accepted.text
        assert accepted.json()["num_records"] == 2
