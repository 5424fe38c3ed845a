"""A model larger than the worker's memory, compressed as a job (issue 11).

A random Llama with the shapes of Llama-3.2-1B (1.24B parameters, 2.47 GB of bf16 shards on disk,
written by `bench.synthetic`) is compressed by a worker whose whole process tree runs in a cgroup
v1 memory cgroup limited to 2.3 GiB: less than the checkpoint's own size, a quarter of what the
model takes in float32. The worker sees the limit (preflight reads its cgroup), so it runs the
model streamed, one block resident, and the job still measures it, writes it, checks the export and
succeeds. Quality is not asserted on random weights; the built-ins are the quality references.

Needs root and the cgroup v1 memory controller (CI has both); skipped with the reason elsewhere.
One backend: the path under test is the engine's, the same on PostgreSQL and Redis.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.synthetic import SHAPES, write_model
from tests.conftest import BACKEND, Service, free_port, service_env, wait_for, wait_for_model

CGROUPS = Path("/sys/fs/cgroup/memory")
LIMIT_BYTES = 2300 * 1024**2

pytestmark = [
    pytest.mark.service,
    pytest.mark.real_model,
    pytest.mark.skipif(BACKEND != "embedded", reason="engine path, backend-independent"),
]


@pytest.fixture(scope="module")
def memory_cgroup() -> Iterator[Path]:
    if not (CGROUPS / "memory.limit_in_bytes").is_file():
        pytest.skip("no cgroup v1 memory controller at /sys/fs/cgroup/memory")
    if os.geteuid() != 0:
        pytest.skip("making a memory cgroup needs root")
    folder = CGROUPS / f"slimformer-test-{secrets.token_hex(4)}"
    folder.mkdir()
    try:
        (folder / "memory.limit_in_bytes").write_text(str(LIMIT_BYTES))
        yield folder
    finally:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # its processes take a moment to be gone
            with contextlib.suppress(OSError):
                folder.rmdir()
                break
            time.sleep(0.5)


@pytest.fixture(scope="module")
def big_service(tmp_path_factory: pytest.TempPathFactory, memory_cgroup: Path) -> Iterator[Service]:
    from workers.compression.examples import builtin_model_folder

    data_dir = tmp_path_factory.mktemp("big-model")
    # The heartbeat shares two cores with a worker reading gigabytes: a lease with room.
    env, cleanup = service_env(data_dir, SLIMFORMER_LEASE_S="60")
    tokenizer = builtin_model_folder("SmolLM2-135M-Instruct", data_dir / "cache")
    write_model(data_dir / "registered" / "llama-1b", SHAPES["llama-1b"], tokenizer_from=tokenizer)
    svc = Service(env=env, data_dir=data_dir, base_url=f"http://127.0.0.1:{free_port()}")
    try:
        svc.cli("migrate")
        svc.start_api()
        svc.start_worker(memory_cgroup=memory_cgroup)
        yield svc
    finally:
        svc.stop()
        cleanup()


@pytest.fixture(scope="module")
def big_model(big_service: Service) -> dict:
    folder = big_service.data_dir / "registered" / "llama-1b"
    on_disk = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    assert on_disk > LIMIT_BYTES  # the point of the test
    with big_service.client() as client:
        response = client.post(
            "/v1/models", json={"name": "llama-1b", "source": {"type": "path", "path": str(folder)}}
        )
        assert response.status_code == 201, response.text
        model = wait_for_model(client, response.json())
    assert model["status"] == "ready", model
    return model


EVALUATION = {"max_windows": 2, "seq_len": 128, "metrics": ["perplexity", "latency", "size"]}


def run_job(service: Service, model: dict, body: dict) -> dict:
    with service.client() as client:
        response = client.post("/v1/jobs", json={"model_id": model["id"], **body})
        assert response.status_code == 202, response.text
        job = wait_for(client, response.json()["id"], {"succeeded", "failed"}, timeout=1800)
    assert job["status"] == "succeeded", (job.get("error"), service.logs())
    return job


def assert_confined(service: Service, cgroup: Path) -> None:
    """The worker (and so the job) ran under the limit: it is in the cgroup, and the cgroup's
    limit is still the one set (usage never exceeds a limit; exceeding it is the OOM killer)."""
    members = {int(pid) for pid in (cgroup / "cgroup.procs").read_text().split()}
    assert service.workers[0].pid in members
    assert int((cgroup / "memory.limit_in_bytes").read_text()) <= LIMIT_BYTES


def test_rtn_on_a_model_larger_than_the_worker_memory(
    big_service: Service, big_model: dict, memory_cgroup: Path, tmp_path: Path
) -> None:
    job = run_job(
        big_service,
        big_model,
        {
            "recipe": {"stages": [{"method": "rtn", "bits": 4, "group_size": 128}]},
            "evaluation": EVALUATION,
        },
    )
    assert_confined(big_service, memory_cgroup)
    metrics = job["metrics"]
    for side in ("baseline", "compressed"):
        assert metrics[side]["perplexity"] > 1  # measured, block by block
        assert metrics[side]["latency"] == "not_measured" and metrics[side]["latency_reason"]
    assert "one block at a time" in metrics["compressed"]["measured_on"]
    check = metrics["export_check"]
    assert check["blocks"] == 16 and 1 <= check["loaded_blocks"] <= 16
    assert check["weights_exact_layers"] == 16 * 7
    # 4-bit codes with a scale per 128 weights in the blocks; the tied bf16 embedding (a fifth of
    # the checkpoint) as it was.
    assert metrics["compressed"]["size_bytes"] < 0.5 * metrics["baseline"]["size_bytes"]

    with big_service.client() as client:
        artifact = next(
            a
            for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
            if a["kind"] == "model"
        )
        archive = tmp_path / "model.tar.gz"
        url = f"/v1/artifacts/{artifact['id']}/content"
        with client.stream("GET", url) as download, archive.open("wb") as handle:
            for chunk in download.iter_bytes():
                handle.write(chunk)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "out", filter="data")
    folder = tmp_path / "out" / "model"
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    header = json.loads((folder / "slimformer.json").read_text())
    assert header["metrics"]["compressed"]["perplexity"] == metrics["compressed"]["perplexity"]

    import torch
    from transformers import AutoModelForCausalLM

    # Plain transformers (compressed-tensors) loads it, outside the cgroup.
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([[1, 450, 4996, 17354]])).logits
    assert logits.shape == (1, 4, 128256) and torch.isfinite(logits).all()


def test_a_calibrated_method_on_a_model_larger_than_the_worker_memory(
    big_service: Service, big_model: dict, memory_cgroup: Path
) -> None:
    with big_service.client() as client:
        calibration = next(
            d["id"]
            for d in client.get("/v1/datasets").json()["data"]
            if d["name"] == "enwiki-calibration"
        )
    job = run_job(
        big_service,
        big_model,
        {
            "recipe": {
                "stages": [
                    {"method": "smoothquant", "alpha": 0.5},
                    {"method": "w8a8", "activations": "dynamic"},
                ]
            },
            "calibration": {"dataset_id": calibration, "num_samples": 8, "seq_len": 128},
            "evaluation": EVALUATION,
        },
    )
    assert_confined(big_service, memory_cgroup)
    metrics = job["metrics"]
    assert metrics["stages"][0]["method"] == "smoothquant"
    assert metrics["export_check"]["max_abs_diff"] <= metrics["export_check"]["tolerance"]
    assert metrics["compressed"]["perplexity"] > 1
    # int8 weights and a float32 scale per output channel: about half the bf16 checkpoint.
    assert metrics["compressed"]["size_bytes"] < 0.7 * metrics["baseline"]["size_bytes"]
