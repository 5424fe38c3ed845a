"""The HTTP contract (API.md) against the running service: success and error paths of each endpoint."""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest

from tests.conftest import Service, builtin_id, wait_for, wait_for_model
from tests.service.conftest import tar_gz
from workers.compression.examples import BUILTIN_MODELS

pytestmark = pytest.mark.service

FAST_EVAL = {
    "metrics": ["embedding_cosine", "size", "latency"],
    "max_samples": 16,
    "seq_len": 32,
    "latency": {"batch_size": 1, "seq_len": 16, "runs": 3, "warmup": 1},
}


def upload_model(
    client: httpx.Client, data: bytes, name: str = "tiny", **headers: str
) -> httpx.Response:
    return client.post(
        "/v1/models", files={"file": ("model.tar.gz", data)}, data={"name": name}, headers=headers
    )


@pytest.fixture(scope="module")
def tiny_model_id(service: Service, tiny_bert) -> str:  # noqa: ANN001
    with service.client() as client:
        response = upload_model(client, tar_gz(tiny_bert))
        assert response.status_code == 201, response.text
        model = response.json()
        assert model["status"] == "validating" and model["object"] == "model"
        model = wait_for_model(client, model)
        assert model["status"] == "ready", model
        assert model["architecture"] == "BertModel" and model["task"] == "feature-extraction"
        assert model["parameters"] > 900_000
        # Validation's progress stays on the model: every phase done (API-additions.md).
        progress = model["progress"]
        assert progress["stage"] == "done" and progress["label"] == "ready"
        assert progress["fraction"] == 1.0 and progress["eta_s"] == 0
        return model["id"]


def test_health_ready_metrics_and_openapi(service: Service) -> None:
    assert httpx.get(f"{service.base_url}/healthz").json() == {"status": "ok"}
    with service.client() as client:  # the details need a key with auth on (test_contract.py)
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert set(ready.json()["checks"]) == {"database", "broker", "storage"}
        metrics = client.get("/metrics").text
    assert "slimformer_jobs{" in metrics and "slimformer_queue_depth" in metrics
    assert "slimformer_http_request_duration_seconds" in metrics
    paths = httpx.get(f"{service.base_url}/openapi.json").json()["paths"]
    for path in (
        "/v1/models",
        "/v1/datasets",
        "/v1/jobs",
        "/v1/jobs/{job_id}/events",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/retry",
        "/v1/jobs/{job_id}/artifacts",
        "/v1/artifacts/{artifact_id}/content",
        "/v1/webhook-endpoints",
        "/v1/webhook-endpoints/{endpoint_id}/deliveries",
        "/v1/webhook-endpoints/{endpoint_id}/deliveries/{delivery_id}/redeliver",
    ):
        assert path in paths
    assert httpx.get(f"{service.base_url}/").status_code == 200


def test_auth_is_required(service: Service) -> None:
    assert httpx.get(f"{service.base_url}/v1/jobs").status_code == 401
    bad = httpx.get(f"{service.base_url}/v1/jobs", headers={"Authorization": "Bearer sk_nope"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "unauthorized"


def test_builtins_are_listed(service: Service) -> None:
    with service.client() as client:
        names = {m["name"]: m for m in client.get("/v1/models?limit=100").json()["data"]}
        assert names["all-MiniLM-L6-v2"]["source"]["type"] == "builtin"
        assert names["SmolLM2-135M-Instruct"]["task"] == "causal-lm"
        for name, builtin in BUILTIN_MODELS.items():  # the shipped weights file's
            weights = builtin.weights_file()
            assert names[name]["size_bytes"] == weights.stat().st_size
            assert names[name]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
            assert names[name]["progress"] is None  # never validated in a worker
        datasets = {d["name"]: d for d in client.get("/v1/datasets?limit=100").json()["data"]}
        assert {"enwiki-calibration", "enwiki-evaluation", "lee-sentences", "polarity"} <= set(
            datasets
        )
        assert datasets["polarity"]["num_records"] == 200


def test_model_etag_and_unknown_ids(service: Service, tiny_model_id: str) -> None:
    with service.client() as client:
        first = client.get(f"/v1/models/{tiny_model_id}")
        etag = first.headers["etag"]
        assert (
            client.get(f"/v1/models/{tiny_model_id}", headers={"If-None-Match": etag}).status_code
            == 304
        )
        for path in (
            "/v1/models/mdl_nope",
            "/v1/datasets/dset_nope",
            "/v1/jobs/job_nope",
            "/v1/jobs/job_nope/events",
            "/v1/artifacts/art_nope/content",
        ):
            response = client.get(path)
            assert response.status_code == 404, path
            assert response.json()["error"]["code"] == "not_found"


def test_dataset_upload_and_errors(service: Service) -> None:
    with service.client() as client:
        lines = "\n".join(json.dumps({"text": f"sentence {i}", "label": i % 2}) for i in range(7))
        created = client.post(
            "/v1/datasets", files={"file": ("d.jsonl", lines.encode())}, data={"name": "mine"}
        )
        assert created.status_code == 201, created.text
        dataset = created.json()
        assert (dataset["format"], dataset["num_records"], dataset["status"]) == (
            "jsonl",
            7,
            "ready",
        )
        bad = client.post(
            "/v1/datasets", files={"file": ("d.jsonl", b'{"text": "ok"}\nnot json\n')}
        )
        assert bad.status_code == 422 and "Line 2" in bad.json()["error"]["message"]
        assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
        assert client.get(f"/v1/datasets/{dataset['id']}").status_code == 404


@pytest.mark.parametrize(
    ("stage", "param"),
    [
        ({"method": "no_such_method"}, "recipe.stages[0].method"),
        ({"method": "dynamic_int8", "bits": 4}, "recipe.stages[0].bits"),
        ({"method": "dynamic_int8", "per_channel": "sometimes"}, "recipe.stages[0].per_channel"),
    ],
)
def test_invalid_recipes_are_422_with_param(
    service: Service, tiny_model_id: str, stage: dict, param: str
) -> None:
    with service.client() as client:
        before = client.get("/v1/jobs?limit=100").json()["data"]
        response = client.post(
            "/v1/jobs", json={"model_id": tiny_model_id, "recipe": {"stages": [stage]}}
        )
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_request" and error["param"] == param
        assert client.get("/v1/jobs?limit=100").json()["data"] == before


def test_out_of_range_field_and_unknown_model(service: Service, tiny_model_id: str) -> None:
    with service.client() as client:
        response = client.post(
            "/v1/jobs",
            json={
                "model_id": tiny_model_id,
                "recipe": {"stages": [{"method": "dynamic_int8"}]},
                "evaluation": {"latency": {"runs": 0}},
            },
        )
        assert response.status_code == 422
        assert response.json()["error"]["param"] == "evaluation.latency.runs"
        missing = client.post(
            "/v1/jobs",
            json={"model_id": "mdl_missing", "recipe": {"stages": [{"method": "dynamic_int8"}]}},
        )
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "model_id"
        assert missing.json()["error"]["message"] == "No model with id 'mdl_missing'."

        # A name where an id goes (the usual slip) gets the id it meant; a near miss too.
        minilm = builtin_id(client, "models", "all-MiniLM-L6-v2")
        calibration = builtin_id(client, "datasets", "enwiki-calibration")
        for given in ("all-MiniLM-L6-v2", "all-minilm-l6-v2", "all-MiniLM-L6"):
            named = client.post(
                "/v1/jobs", json={"model_id": given, "recipe": {"stages": [{"method": "rtn"}]}}
            )
            assert named.status_code == 404
            assert f"Did you mean {minilm} (all-MiniLM-L6-v2)?" in named.json()["error"]["message"]
        dataset = client.post(
            "/v1/jobs",
            json={
                "model_id": minilm,
                "recipe": {"stages": [{"method": "gptq"}]},
                "calibration": {"dataset_id": "enwiki-calibration"},
            },
        )
        assert (
            dataset.status_code == 404
            and dataset.json()["error"]["param"] == "calibration.dataset_id"
        )
        assert (
            f"Did you mean {calibration} (enwiki-calibration)?"
            in dataset.json()["error"]["message"]
        )


def test_idempotency(service: Service, tiny_model_id: str) -> None:
    with service.client() as client:
        body = {
            "model_id": tiny_model_id,
            "recipe": {"stages": [{"method": "dynamic_int8"}]},
            "evaluation": FAST_EVAL,
            "metadata": {"team": "idem"},
        }
        first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
        again = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
        assert first.status_code == again.status_code == 202
        assert first.json()["id"] == again.json()["id"]
        other = client.post(
            "/v1/jobs", json={**body, "priority": 5}, headers={"Idempotency-Key": "k-1"}
        )
        assert other.status_code == 409
        assert other.json()["error"]["code"] == "idempotency_mismatch"
        jobs = client.get("/v1/jobs", params={"metadata.team": "idem"}).json()["data"]
        assert [job["id"] for job in jobs] == [first.json()["id"]]
        wait_for(client, first.json()["id"], {"succeeded", "failed"})


def test_job_lifecycle_events_artifacts(service: Service, tiny_model_id: str) -> None:
    with service.client() as client:
        response = client.post(
            "/v1/jobs",
            json={
                "model_id": tiny_model_id,
                "recipe": {"stages": [{"method": "dynamic_int8"}]},
                "evaluation": FAST_EVAL,
                "metadata": {"team": "search"},
                # test_idempotency ran these inputs already: a cache hit would skip the engine
                # whose events this test reads.
                "cache": False,
            },
        )
        assert response.status_code == 202, response.text
        assert response.headers["location"] == f"/v1/jobs/{response.json()['id']}"
        job = response.json()
        assert job["recipe"]["stages"][0] == {
            "method": "dynamic_int8",
            "version": 1,
            "ignore": [],
            "modules": None,
            "per_channel": True,
        }
        job = wait_for(client, job["id"], {"succeeded", "failed"})
        assert job["status"] == "succeeded", (job["error"], service.logs())
        assert job["attempt"] == 1 and job["progress"]["fraction"] == 1.0
        metrics = job["metrics"]
        assert metrics["baseline"]["embedding_cosine"] == pytest.approx(1.0)
        assert 0.9 < metrics["compressed"]["embedding_cosine"] <= 1.0
        assert metrics["compressed"]["size_bytes"] < metrics["baseline"]["size_bytes"]

        etag = client.get(f"/v1/jobs/{job['id']}").headers["etag"]
        assert (
            client.get(f"/v1/jobs/{job['id']}", headers={"If-None-Match": etag}).status_code == 304
        )

        events = client.get(f"/v1/jobs/{job['id']}/events").json()["data"]
        seqs = [event["seq"] for event in events]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
        assert statuses == ["queued", "running", "succeeded"]
        measured = [e["data"] for e in events if e["type"] == "metric"]
        assert measured[0]["baseline"] == metrics["baseline"]
        assert measured[-1]["compressed"] == metrics["compressed"]
        assert any(e["type"] == "progress" and "fraction" in e["data"] for e in events)
        page = client.get(f"/v1/jobs/{job['id']}/events", params={"after": seqs[1], "limit": 2})
        assert [e["seq"] for e in page.json()["data"]] == seqs[2:4]
        assert page.json()["has_more"] is (len(seqs) > 4)

        artifacts = client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
        assert {a["kind"] for a in artifacts} == {"model", "report"}
        model_artifact = next(a for a in artifacts if a["kind"] == "model")
        url = f"/v1/artifacts/{model_artifact['id']}/content"
        whole = client.get(url)
        assert whole.status_code == 200
        assert whole.headers["etag"] == f'"{model_artifact["sha256"]}"'
        assert whole.headers["accept-ranges"] == "bytes"
        assert int(whole.headers["content-length"]) == model_artifact["size_bytes"]
        # The filesystem store has no presigned URLs: `?redirect=true` streams the same bytes.
        asked = client.get(url, params={"redirect": "true"})
        assert asked.status_code == 200 and asked.content == whole.content
        part = client.get(url, headers={"Range": "bytes=10-99"})
        assert part.status_code == 206 and part.content == whole.content[10:100]
        assert part.headers["content-range"] == f"bytes 10-99/{model_artifact['size_bytes']}"
        tail = client.get(url, headers={"Range": "bytes=-5"})
        assert tail.status_code == 206 and tail.content == whole.content[-5:]
        bad = client.get(url, headers={"Range": f"bytes={model_artifact['size_bytes']}-"})
        assert bad.status_code == 416
        assert bad.headers["content-range"] == f"bytes */{model_artifact['size_bytes']}"
        assert bad.json()["error"]["code"] == "range_not_satisfiable"

        # Finished jobs cannot be cancelled; they can be retried and deleted.
        assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409
        retry = client.post(f"/v1/jobs/{job['id']}/retry")
        assert retry.status_code == 202 and retry.json()["id"] != job["id"]
        assert retry.json()["recipe"] == job["recipe"]
        wait_for(client, retry.json()["id"], {"succeeded", "failed"})
        assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
        assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
        assert client.get(url).status_code == 404


def test_sse_stream_resumes_from_last_event_id(service: Service, tiny_model_id: str) -> None:
    with service.client() as client:
        job = client.post(
            "/v1/jobs",
            json={
                "model_id": tiny_model_id,
                "recipe": {"stages": [{"method": "dynamic_int8"}]},
                "evaluation": FAST_EVAL,
            },
        ).json()
        wait_for(client, job["id"], {"succeeded", "failed"})
        all_events = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()[
            "data"
        ]

        def stream(**headers: str) -> list[dict]:
            received = []
            with client.stream(
                "GET",
                f"/v1/jobs/{job['id']}/events",
                headers={"Accept": "text/event-stream", **headers},
            ) as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                current: dict = {}
                for line in response.iter_lines():
                    if line.startswith("id:"):
                        current["id"] = int(line[3:].strip())
                    elif line.startswith("data:"):
                        current["data"] = json.loads(line[5:].strip())
                    elif not line and "data" in current:
                        received.append(current)
                        current = {}
            return received

        everything = stream()
        assert [e["id"] for e in everything] == [e["seq"] for e in all_events]
        assert everything[-1]["data"]["data"]["status"] == "succeeded"
        resumed = stream(**{"Last-Event-ID": str(all_events[2]["seq"])})
        assert [e["id"] for e in resumed] == [e["seq"] for e in all_events[3:]]


def test_list_pagination_and_filters(service: Service) -> None:
    with service.client("pager") as client:  # a fresh project: its job list is exactly ours
        model_id = builtin_id(client, "models", "all-MiniLM-L6-v2")
        ids = []
        for index in range(5):
            ids.append(
                client.post(
                    "/v1/jobs",
                    json={
                        "model_id": model_id,
                        "recipe": {"stages": [{"method": "dynamic_int8"}]},
                        "evaluation": FAST_EVAL,
                        "metadata": {"batch": "p", "i": str(index)},
                    },
                ).json()["id"]
            )
            client.post(f"/v1/jobs/{ids[-1]}/cancel")
        seen, after = [], None
        while True:
            params = {"limit": 2, **({"after": after} if after else {})}
            body = client.get("/v1/jobs", params=params).json()
            assert body["object"] == "list" and len(body["data"]) <= 2
            seen += [job["id"] for job in body["data"]]
            if not body["has_more"]:
                break
            after = body["data"][-1]["id"]
        assert seen == list(reversed(ids))  # newest first, each exactly once
        only = client.get("/v1/jobs", params={"metadata.i": "3"}).json()["data"]
        assert [job["id"] for job in only] == [ids[3]]
        for job_id in ids:
            wait_for(client, job_id, {"cancelled"})
        by_status = client.get("/v1/jobs", params={"status": "cancelled", "limit": 100}).json()
        assert {job["id"] for job in by_status["data"]} == set(ids)
        assert client.get("/v1/jobs", params={"status": "succeeded"}).json()["data"] == []
        assert client.get("/v1/jobs", params={"limit": 0}).status_code == 422
        assert client.get("/v1/jobs", params={"model_id": "mdl_other"}).json()["data"] == []


def test_cancel_queued_job_is_immediate(service: Service) -> None:
    with service.client() as client:
        model_id = builtin_id(client, "models", "all-MiniLM-L6-v2")
        job = client.post(
            "/v1/jobs",
            json={
                "model_id": model_id,
                "recipe": {"stages": [{"method": "dynamic_int8"}]},
                "evaluation": FAST_EVAL,
            },
        ).json()
        cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 202
        assert cancelled.json()["status"] in {"cancelling", "cancelled"}
        final = wait_for(client, job["id"], {"cancelled", "succeeded", "failed"})
        assert final["status"] == "cancelled"
        assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202  # idempotent
        assert client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"] == []


def test_register_model_by_allowed_path(service: Service, tiny_bert) -> None:  # noqa: ANN001
    import shutil

    root = service.data_dir / "registered"
    shutil.copytree(tiny_bert, root / "tiny-by-path", dirs_exist_ok=True)
    with service.client() as client:
        response = client.post(
            "/v1/models",
            json={
                "name": "by-path",
                "source": {"type": "path", "path": str(root / "tiny-by-path")},
            },
        )
        assert response.status_code == 201, response.text
        model = response.json()
        model = wait_for_model(client, model)
        assert model["status"] == "ready" and model["source"]["type"] == "path"
        escape = client.post(
            "/v1/models",
            json={
                "name": "escape",
                "source": {"type": "path", "path": str(root / ".." / "storage")},
            },
        )
        assert escape.status_code == 422 and escape.json()["error"]["param"] == "source.path"


def test_max_runtime_is_enforced(service: Service, tiny_model_id: str) -> None:
    slow = {**FAST_EVAL, "latency": {"batch_size": 32, "seq_len": 256, "runs": 1000}}
    with service.client() as client:
        job = client.post(
            "/v1/jobs",
            json={
                "model_id": tiny_model_id,
                "recipe": {"stages": [{"method": "dynamic_int8"}]},
                "evaluation": slow,
                "max_runtime_s": 10,
            },
        ).json()
        final = wait_for(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=180)
        assert final["status"] == "failed", final
        assert final["error"]["code"] == "timeout" and final["artifact_ids"] == []


def test_group_size_that_does_not_divide_a_layer_is_refused(service: Service) -> None:
    with service.client() as client:
        smollm2 = builtin_id(client, "models", "SmolLM2-135M-Instruct")
        model = client.get(f"/v1/models/{smollm2}").json()
        assert model["parameters"] > 130_000_000  # described from its config at registration
        response = client.post(
            "/v1/jobs",
            json={
                "model_id": smollm2,
                "recipe": {"stages": [{"method": "gptq", "group_size": 128}]},
            },
        )
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["param"] == "recipe.stages[0].group_size"
        assert "576" in error["message"] and "q_proj" in error["message"]
        # Only the 1536-wide down_proj layers: the same group size is acceptable.
        ok = client.post(
            "/v1/jobs",
            json={
                "model_id": smollm2,
                "recipe": {
                    "stages": [{"method": "rtn", "group_size": 128, "modules": ["down_proj"]}]
                },
            },
        )
        assert ok.status_code == 202, ok.text
        client.post(f"/v1/jobs/{ok.json()['id']}/cancel")


def test_pipeline_stages_are_checked_against_the_shapes_and_ids_they_meet(
    service: Service,
) -> None:
    with service.client() as client:
        smollm2 = builtin_id(client, "models", "SmolLM2-135M-Instruct")
        minilm = builtin_id(client, "models", "all-MiniLM-L6-v2")

        def submit(*stages: dict) -> httpx.Response:
            return client.post(
                "/v1/jobs", json={"model_id": smollm2, "recipe": {"stages": list(stages)}}
            )

        # structured leaves 1536 - 461 = 1075 FFN channels: down_proj's groups of 128 no longer fit.
        refused = submit(
            {"method": "structured", "ffn_channels": 0.3},
            {"method": "rtn", "group_size": 128, "modules": ["down_proj"]},
        )
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["param"] == "recipe.stages[1].group_size" and "1075" in error["message"]
        # A student that does not exist, one of another kind, a pipeline with nothing to recover.
        missing = submit({"method": "distill", "student": {"model_id": "mdl_nope"}})
        assert missing.status_code == 404
        assert missing.json()["error"]["param"] == "recipe.stages[0].student.model_id"
        other_kind = submit({"method": "distill", "student": {"model_id": minilm}})
        assert other_kind.status_code == 422, other_kind.text
        assert "feature-extraction" in other_kind.json()["error"]["message"]
        nothing = submit({"method": "distill"})
        assert nothing.status_code == 422 and "shrinking stage" in nothing.text
        # Accepted: the training text resolved to the built-in for the task.
        ok = submit(
            {"method": "structured", "ffn_channels": 0.25},
            {"method": "distill", "steps": 5},
            {"method": "rtn", "group_size": 64},
        )
        assert ok.status_code == 202, ok.text
        calibration_id = builtin_id(client, "datasets", "enwiki-calibration")
        assert ok.json()["recipe"]["stages"][1]["dataset_id"] == calibration_id
        client.post(f"/v1/jobs/{ok.json()['id']}/cancel")


def test_calibrated_recipe_gets_the_builtin_calibration_set(service: Service) -> None:
    with service.client() as client:
        smollm2 = builtin_id(client, "models", "SmolLM2-135M-Instruct")
        calibration_id = builtin_id(client, "datasets", "enwiki-calibration")
        response = client.post(
            "/v1/jobs",
            json={
                "model_id": smollm2,
                "recipe": {"stages": [{"method": "gptq", "group_size": 64}]},
            },
        )
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["calibration"] == {
            "dataset_id": calibration_id,
            "num_samples": 128,
            "seq_len": 512,
            "seed": 0,
        }
        # The resolved evaluation is echoed: the task's metrics, not null; gptq's defaults too.
        assert job["evaluation"]["metrics"] == ["perplexity", "latency", "size"]
        assert job["evaluation"]["dataset_id"] == builtin_id(
            client, "datasets", "enwiki-evaluation"
        )
        assert job["recipe"]["stages"][0]["act_order"] is True
        client.post(f"/v1/jobs/{job['id']}/cancel")
