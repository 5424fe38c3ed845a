"""schemathesis against a live server: the OpenAPI document is the contract, so every response
must be documented (status, content type, schema) and none may be a server error.

Bounded for CI: few examples per operation, a fixed seed (the same cases every run; change it
locally to explore), one worker (schemathesis's threads race in hypothesis's lambda parsing), no
job worker (a job the fuzzer manages to create stays queued and costs nothing).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import Service, builtin_id

pytestmark = pytest.mark.service

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "unsupported_method",  # 405 for a method the document does not list at a path
)
MAX_EXAMPLES = 5
SEED = 3


def test_schemathesis_finds_no_server_error_undocumented_status_or_schema_violation(
    idle_service: Service, tmp_path: Path
) -> None:
    fuzzed = idle_service
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        f"{fuzzed.base_url}/openapi.json",
        "--header",
        f"Authorization: Bearer {fuzzed.key('fuzz')}",
        "--checks",
        ",".join(CHECKS),
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--workers",
        "1",
        "--generation-database",
        "none",
        "--request-timeout",
        "30",
        "--no-color",
    ]
    result = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    report = result.stdout[-20_000:] + result.stderr[-5_000:]
    assert result.returncode == 0, report + fuzzed.logs()
    # It really exercised every operation the document lists.
    paths = httpx.get(f"{fuzzed.base_url}/openapi.json").json()["paths"]
    operations = sum(len(methods) for methods in paths.values())
    assert re.search(rf"Tested:\s+{operations}\b", report), report


def test_what_schemathesis_found_stays_fixed(idle_service: Service) -> None:
    with idle_service.client("fuzz-found") as client:
        model_id = builtin_id(client, "models", "all-MiniLM-L6-v2")
        # A job refused after its Idempotency-Key was written: on SQLite the key's savepoint
        # committed on its own, and the same request then answered 404 for a job never made.
        spec = {
            "model_id": model_id,
            "recipe": {"stages": [{"method": "dynamic_int8"}]},
            "webhook": {"url": "http://127.0.0.1/hook"},
        }
        for _ in range(2):
            refused = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "unsafe"})
            assert refused.status_code == 422, refused.text
            assert refused.json()["error"]["param"] == "webhook.url"
        # A body that is not UTF-8 is 422 like any body the API cannot read (FastAPI said 400).
        garbled = client.post(
            "/v1/webhook-endpoints",
            content=b"\xff\xfe{\x02",
            headers={"Content-Type": "application/json"},
        )
        assert garbled.status_code == 422, garbled.text
        assert garbled.json()["error"]["code"] == "invalid_request"
        # The replay of a key whose resource was deleted since: 409 saying so (it was 404).
        upload = {"file": ("a.txt", b"one\ntwo\n")}
        keyed = {"Idempotency-Key": "deleted-later"}
        first = client.post("/v1/datasets", files=upload, data={"name": "a"}, headers=keyed)
        assert first.status_code == 201, first.text
        assert client.delete(f"/v1/datasets/{first.json()['id']}").status_code == 204
        again = client.post("/v1/datasets", files=upload, data={"name": "a"}, headers=keyed)
        assert again.status_code == 409, again.text
        assert again.json()["error"]["param"] == "Idempotency-Key"
        assert first.json()["id"] in again.json()["error"]["message"]
        # A method the path does not serve is 405, even with a NUL byte in its JSON (it was 422).
        put = client.put("/v1/jobs", json={"name": "a\u0000b"})
        assert put.status_code == 405, put.text
        # An unknown model named by a new job is 404, and the document says so.
        unknown = client.post("/v1/jobs", json={**spec, "model_id": "mdl_nothing", "webhook": None})
        assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model_id"
        responses = client.get("/openapi.json").json()["paths"]["/v1/jobs"]["post"]["responses"]
        assert "404" in responses
