"""The OpenAPI document is the contract: every documented error status with the real envelope, no
dangling schema reference, the right content types; OPTIONS answers the real `Allow`; `/metrics`
and `/readyz` details need a key when auth is on."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.conftest import Service, builtin_id

pytestmark = pytest.mark.service


def test_openapi_describes_the_real_errors(service: Service) -> None:
    doc = httpx.get(f"{service.base_url}/openapi.json").json()
    schemas = doc["components"]["schemas"]
    referenced = set(re.findall(r"#/components/schemas/([A-Za-z0-9_.-]+)", json.dumps(doc)))
    assert referenced <= set(schemas), referenced - set(schemas)
    assert "ModelRegister" in schemas
    assert schemas["Error"]["properties"]["error"]["required"] == ["code", "message", "param"]
    error_ref = {"$ref": "#/components/schemas/Error"}
    for path, operations in doc["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method, operation in operations.items():
            responses = operation["responses"]
            for status in ("401", "422", "429", "500", "503"):
                content = responses[status]["content"]["application/json"]
                assert content["schema"] == error_ref, (method, path, status)
            assert "Retry-After" in responses["503"]["headers"]
            assert "Retry-After" in responses["429"]["headers"]
            if "{" in path:
                assert "404" in responses, (method, path)
            if method == "delete":
                assert "409" in responses, (method, path)
    assert "413" in doc["paths"]["/v1/models"]["post"]["responses"]
    for path in ("/v1/jobs", "/v1/models", "/v1/datasets"):  # quota_exceeded
        assert "409" in doc["paths"][path]["post"]["responses"], path
    quota = schemas["Error"]["properties"]["error"]["properties"]["quota"]
    assert quota["required"] == ["name", "limit", "usage"]
    assert "304" in doc["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]
    assert "503" in doc["paths"]["/readyz"]["get"]["responses"]
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]


def test_options_answers_the_methods_served(service: Service) -> None:
    with service.client() as client:
        model_id = builtin_id(client, "models", "all-MiniLM-L6-v2")
        cases = {
            "/v1/jobs": "GET, OPTIONS, POST",
            "/v1/jobs/job_anything": "DELETE, GET, OPTIONS",
            "/v1/jobs/job_anything/cancel": "OPTIONS, POST",
            f"/v1/models/{model_id}": "DELETE, GET, OPTIONS",
            "/v1/artifacts/art_x/content": "GET, OPTIONS",
        }
        for path, allow in cases.items():
            response = client.options(path)
            assert response.status_code == 204, (path, response.text)
            assert response.headers["allow"] == allow, path
        assert client.options("/v1/nothing-here").status_code == 404


def test_metrics_and_readiness_details_need_a_key(service: Service) -> None:
    anonymous = httpx.get(f"{service.base_url}/metrics")
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "unauthorized"
    ready = httpx.get(f"{service.base_url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["live_workers"] is None
    assert set(ready.json()["checks"].values()) == {"ok"}  # no timings, hosts or ports
    with service.client() as client:
        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        detailed = client.get("/readyz").json()
        assert detailed["live_workers"] is not None
        assert all(value.startswith("ok (") for value in detailed["checks"].values())


def test_docs_work_offline(service: Service) -> None:
    """/docs is Swagger UI from the API's own files: nothing from a CDN (installs without internet
    would show a blank page)."""
    with httpx.Client(base_url=service.base_url, timeout=30) as client:
        page = client.get("/docs")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "cdn" not in page.text.lower() and "https://" not in page.text
        for asset in (
            "/static/vendor/swagger-ui-5.36.0/swagger-ui-bundle.js",
            "/static/vendor/swagger-ui-5.36.0/swagger-ui.css",
        ):
            assert asset in page.text
            response = client.get(asset)
            assert response.status_code == 200 and len(response.content) > 10_000
        assert '"/openapi.json"' in page.text or "'/openapi.json'" in page.text
