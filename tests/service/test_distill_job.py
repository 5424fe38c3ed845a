"""A pipeline job through the API: MiniLM distilled from 6 to 3 blocks, then dynamic INT8, with
the quality after each stage, the training progress in the events, and an artifact that loads."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from tests.conftest import BACKEND, Service, builtin_id, wait_for, wait_for_model

pytestmark = [
    pytest.mark.service,
    pytest.mark.real_model,
    # The job path is the same on both backends (covered by the MiniLM int8 job): run once.
    pytest.mark.skipif(BACKEND != "embedded", reason="engine path, backend-independent"),
]


def test_minilm_distill_then_int8_pipeline(service: Service, tmp_path: Path) -> None:
    with service.client() as client:
        model_id = builtin_id(client, "models", "all-MiniLM-L6-v2")
        sentences_id = builtin_id(client, "datasets", "lee-sentences")
        response = client.post(
            "/v1/jobs",
            json={
                "model_id": model_id,
                "recipe": {
                    "stages": [
                        {
                            "method": "distill",
                            "student": {"num_layers": 3},
                            "steps": 16,
                            "batch_size": 16,
                            "seq_len": 64,
                            "learning_rate": 5e-4,
                        },
                        {"method": "dynamic_int8"},
                    ]
                },
                "evaluation": {
                    "dataset_id": sentences_id,
                    "metrics": ["embedding_cosine", "size"],
                    "max_samples": 64,
                    "seq_len": 128,
                },
            },
        )
        assert response.status_code == 202, response.text
        # The server resolved the training text (the built-in default for an encoder).
        assert response.json()["recipe"]["stages"][0]["dataset_id"] == sentences_id
        job = wait_for(client, response.json()["id"], {"succeeded", "failed"}, timeout=900)
        assert job["status"] == "succeeded", (job, service.logs())
        events = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
        artifact = next(
            a
            for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
            if a["kind"] == "model"
        )
        archive = tmp_path / "model.tar.gz"
        archive.write_bytes(client.get(f"/v1/artifacts/{artifact['id']}/content").content)

    metrics = job["metrics"]
    distilled, quantized = metrics["stages"]
    assert distilled["student"]["teacher_blocks_kept"] == [0, 2, 5]
    assert distilled["held_out"][-1]["cosine"] > distilled["held_out"][0]["cosine"]
    # Quality after the first stage, then after the whole pipeline (exported, int8 kernels).
    after_distill = distilled["metrics"]["embedding_cosine"]
    final = metrics["compressed"]["embedding_cosine"]
    assert 0.6 < final < after_distill <= 1.0
    assert after_distill - final < 0.02  # int8 on top costs little
    assert "metrics" not in quantized
    assert any(e["message"].startswith("after stage 0 (distill)") for e in events)
    training = [e["data"]["details"] for e in events if "details" in (e["data"] or {})]
    assert training and training[-1]["step"] == 16 and "loss" in training[-1]
    # Half the blocks and int8 Linear layers; MiniLM's float word embeddings are most of what is left.
    assert metrics["compressed"]["size_bytes"] < 0.65 * metrics["baseline"]["size_bytes"]

    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "out", filter="data")
    config = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3


def test_another_registered_model_as_the_student(
    service: Service, tiny_bert: Path, tmp_path: Path
) -> None:
    """The tiny 2-block BERT (MiniLM's tokenizer) teaches a 1-block BERT uploaded next to it."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    from tests.service.conftest import TOKENIZER_FILES, minilm_folder, tar_gz

    student_folder = tmp_path / "student"
    torch.manual_seed(1)
    config = BertConfig.from_pretrained(tiny_bert)
    config.num_hidden_layers = 1
    BertModel(config).save_pretrained(student_folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_folder() / name, student_folder / name)

    with service.client() as client:
        ids = []
        for folder, name in ((tiny_bert, "teacher"), (student_folder, "student")):
            model = client.post(
                "/v1/models", files={"file": ("m.tar.gz", tar_gz(folder))}, data={"name": name}
            ).json()
            model = wait_for_model(client, model)
            assert model["status"] == "ready", model
            ids.append(model["id"])
        teacher_id, student_id = ids
        response = client.post(
            "/v1/jobs",
            json={
                "model_id": teacher_id,
                "recipe": {
                    "stages": [
                        {
                            "method": "distill",
                            "student": {"model_id": student_id},
                            "steps": 10,
                            "batch_size": 8,
                            "seq_len": 32,
                            "learning_rate": 1e-3,
                        }
                    ]
                },
                "evaluation": {"metrics": ["embedding_cosine", "size"], "max_samples": 32},
            },
        )
        assert response.status_code == 202, response.text
        job = wait_for(client, response.json()["id"], {"succeeded", "failed"}, timeout=600)
        assert job["status"] == "succeeded", (job, service.logs())
    stage = job["metrics"]["stages"][0]
    assert stage["student"] == {"model_id": student_id, "num_layers": 1}
    assert stage["student_parameters"] < stage["teacher_parameters"]
    assert stage["held_out"][-1]["loss"] < stage["held_out"][0]["loss"]
    assert job["metrics"]["compressed"]["parameters"] == stage["student_parameters"]
