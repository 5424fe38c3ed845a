"""The Python SDK (`slimformer.client`) against the running service: pages, idempotent creates, the
error envelope, one real job followed through its events (with a resumed stream), waited for and
downloaded with its sha256 checked, and the async client reading the same."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from pathlib import Path

import pytest

from slimformer.client import AsyncClient, Client, JobEvent, SlimformerError
from tests.conftest import Service

pytestmark = pytest.mark.service

TINY_EVAL = {"max_samples": 8, "seq_len": 32, "latency": {"runs": 1, "warmup": 0}}


def sdk(service: Service, project: str = "sdk") -> Client:
    key = service.key(project) if service.env.get("SLIMFORMER_AUTH") != "false" else ""
    return Client(service.base_url, api_key=key, timeout=60)


def async_sdk(service: Service, project: str = "sdk") -> AsyncClient:
    key = service.key(project) if service.env.get("SLIMFORMER_AUTH") != "false" else ""
    return AsyncClient(service.base_url, api_key=key, timeout=60)


def test_list_pages_follow_the_cursor_newest_first(service: Service, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    created = []
    with sdk(service) as client:
        for index in range(5):
            lines = tmp_path / f"lines-{index}.txt"
            lines.write_text(f"sentence {index} of {tag}\nanother one\n")
            created.append(client.datasets.upload(lines, name=f"{tag}-{index}"))
        newest_first = [dataset.id for dataset in reversed(created)]
        pages, after = [], None
        while len(sum(pages, [])) < 5:
            page = client.datasets.list(limit=2, after=after)
            assert len(page.data) == 2 and page.has_more
            pages.append([dataset.id for dataset in page.data])
            after = page.data[-1].id
        assert sum(pages, [])[:5] == newest_first
        assert len(pages) == 3
        walked = [dataset.id for dataset in client.datasets.iter(page_size=2)]
        assert walked[:5] == newest_first and len(walked) == len(set(walked))
        assert created[0].num_records == 2 and created[0].object == "dataset"
        assert client.datasets.find(f"{tag}-3").id == created[3].id


def test_an_sdk_error_carries_the_envelope(service: Service) -> None:
    with sdk(service) as client:
        with pytest.raises(SlimformerError) as missing:
            client.jobs.get("job_doesnotexist")
        model_id = client.models.find("all-MiniLM-L6-v2").id
        with pytest.raises(SlimformerError) as invalid:
            client.jobs.create(model_id=model_id, recipe={"stages": [{"method": "rtn", "bits": 1}]})
    assert (missing.value.status, missing.value.code) == (404, "not_found")
    assert missing.value.message and missing.value.request_id
    assert missing.value.body["error"]["code"] == "not_found"
    assert (invalid.value.status, invalid.value.code) == (422, "invalid_request")
    assert invalid.value.param == "recipe.stages[0].bits"


def test_a_real_job_created_idempotently_followed_waited_for_and_downloaded(
    service: Service, tmp_path: Path
) -> None:
    key = f"sdk-test-{uuid.uuid4()}"
    with sdk(service) as client:
        model_id = client.models.find("all-MiniLM-L6-v2").id
        evaluation = {"dataset_id": client.datasets.find("lee-sentences").id, **TINY_EVAL}
        body = {
            "model_id": model_id,
            "recipe": {"stages": [{"method": "dynamic_int8"}]},
            "evaluation": evaluation,
            "cache": False,  # a real run, with its progress events
            "metadata": {"suite": key},
        }
        job = client.jobs.create(body, idempotency_key=key)
        again = client.jobs.create(body, idempotency_key=key)  # a client retrying the same call
        assert again.id == job.id and job.status == "queued"
        assert [j.id for j in client.jobs.iter(**{"metadata.suite": key})] == [job.id]
        with pytest.raises(SlimformerError) as mismatch:
            client.jobs.create({**body, "priority": 3}, idempotency_key=key)
        assert (mismatch.value.status, mismatch.value.code) == (409, "idempotency_mismatch")

        # Read a few events, drop the stream, resume after the last one seen.
        first: list[JobEvent] = []
        for event in client.jobs.events(job.id):
            first.append(event)
            if len(first) == 2:
                break
        rest = list(client.jobs.events(job.id, last_event_id=first[-1].seq))
        seqs = [event.seq for event in first + rest]
        assert seqs == sorted(set(seqs)), seqs  # no duplicates, none out of order
        every = list(client.jobs.iter_events(job.id))
        assert seqs == [event.seq for event in every]  # and none missed
        assert rest[-1].type == "status" and rest[-1].data["status"] == "succeeded"
        assert any(event.type == "progress" for event in every)

        done = client.jobs.wait(job.id, timeout=300)
        assert done.status == "succeeded", (done.error, service.logs())
        assert done.metrics["compressed"]["size_bytes"] < done.metrics["baseline"]["size_bytes"]
        artifacts = client.jobs.artifacts(job.id)
        model = next(artifact for artifact in artifacts if artifact.kind == "model")
        assert set(done.artifact_ids) == {artifact.id for artifact in artifacts}
        path = client.download(model.id, tmp_path)  # a folder: the server's file name
        assert path.parent == tmp_path and path.name.endswith(".tar.gz")
        assert hashlib.sha256(path.read_bytes()).hexdigest() == model.sha256
        assert path.stat().st_size == model.size_bytes
        named = client.download(model.id, tmp_path / "copy.tar.gz", expected_sha256=model.sha256)
        assert named.read_bytes() == path.read_bytes()
        with pytest.raises(SlimformerError) as wrong:
            client.download(model.id, tmp_path / "wrong.tar.gz", expected_sha256="0" * 64)
        assert wrong.value.code == "checksum_mismatch"
        assert not (tmp_path / "wrong.tar.gz").exists()

    # The command-line client is built on the SDK: the same job shown, its model downloaded, and the
    # same body submitted again (a cache hit, or one more tiny run) and followed to its end.
    auth = ["--url", service.base_url]
    if service.env.get("SLIMFORMER_AUTH") != "false":
        auth += ["--api-key", service.key("sdk")]
    shown = service.cli("jobs", "show", job.id, *auth)
    assert shown.splitlines()[0] == job.id and "succeeded" in shown and "dynamic_int8" in shown
    printed = service.cli("download", job.id, "-o", str(tmp_path / "cli"), *auth).split()
    assert printed == [str(tmp_path / "cli" / path.name)]
    assert Path(printed[0]).read_bytes() == path.read_bytes()
    recipe = tmp_path / "job.json"
    recipe.write_text(json.dumps({k: v for k, v in body.items() if k != "cache"}))
    submitted = json.loads(
        service.cli("submit", model_id, "--recipe", str(recipe), "--wait", "--json", *auth)
    )
    assert submitted["status"] == "succeeded" and submitted["id"] != job.id
    listed = service.cli("jobs", "--limit", "2", *auth).splitlines()
    assert listed[0].split()[:2] == ["job", "status"]
    assert [line.split()[0] for line in listed[1:]] == [submitted["id"], job.id]
    # Re-attach to a job by id: the outcome again, exit 0 because it succeeded.
    waited = service.cli("wait", job.id, *auth)
    assert f"{job.id} succeeded" in waited and "slimformer download" in waited
    # Models and datasets from the command line: list, show by name, upload and wait.
    models_table = service.cli("models", *auth)
    assert model_id in models_table and "all-MiniLM-L6-v2" in models_table
    assert json.loads(service.cli("models", "show", "all-MiniLM-L6-v2", *auth))["id"] == model_id
    texts = tmp_path / "cli-texts.txt"
    texts.write_text("a first line of text\na second one\n")
    uploaded = service.cli("datasets", "upload", str(texts), "--name", f"cli-{key}", *auth).split()
    assert uploaded[0].startswith("dset_") and uploaded[1] == "ready"
    shown_dataset = json.loads(service.cli("datasets", "show", f"cli-{key}", *auth))
    assert shown_dataset["id"] == uploaded[0] and shown_dataset["num_records"] == 2
    # Calibration and evaluation sizes from flags, over what a recipe file says.
    flagged = json.loads(
        service.cli(
            "submit",
            model_id,
            "--method",
            "rtn",
            "--calibration-samples",
            "4",
            "--eval-samples",
            "8",
            "--eval-seq-len",
            "32",
            "--metadata",
            f"suite={key}-flags",
            "--json",
            *auth,
        )
    )
    assert flagged["evaluation"]["max_samples"] == 8 and flagged["evaluation"]["seq_len"] == 32
    assert flagged["calibration"]["num_samples"] == 4
    with sdk(service) as client:
        client.jobs.cancel(flagged["id"])

    async def read_async() -> None:
        async with async_sdk(service) as aclient:
            suite = {"metadata.suite": key}
            page = await aclient.jobs.list(limit=1, **suite)  # the CLI's job, newest first
            assert [j.id for j in page.data] == [submitted["id"]] and page.has_more
            page = await aclient.jobs.list(limit=1, after=page.data[0].id, **suite)
            assert [j.id for j in page.data] == [job.id] and not page.has_more
            fetched = await aclient.jobs.get(job.id)
            assert fetched.status == "succeeded" and fetched.artifact_ids == done.artifact_ids
            listed = [d.id async for d in aclient.datasets.iter(page_size=3)]
            assert evaluation["dataset_id"] in listed
            events = [event.seq async for event in aclient.jobs.events(job.id)]
            assert events == seqs
            copy = await aclient.download(model.id, tmp_path / "async.tar.gz")
            assert hashlib.sha256(copy.read_bytes()).hexdigest() == model.sha256

    asyncio.run(read_async())
