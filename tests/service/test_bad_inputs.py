"""Every bad input gets its error code and changes nothing else."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.conftest import Service, wait_for_model
from tests.service.conftest import tar_gz, tar_with_symlink, zip_bytes

pytestmark = pytest.mark.service


def rejected(client: httpx.Client, data: bytes, name: str) -> dict:
    response = client.post("/v1/models", files={"file": (name, data)}, data={"name": name})
    assert response.status_code == 201, response.text
    model = response.json()
    model = wait_for_model(client, model)
    assert model["status"] == "rejected", model
    return model


def storage_files(service: Service, model_id: str) -> list[Path]:
    return list((service.data_dir / "storage" / "models" / model_id).glob("*"))


def cache_files(service: Service, model_id: str) -> list[Path]:
    return list((service.data_dir / "cache" / "models").glob(f"{model_id}*"))


def without(folder: Path, *names: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name not in names}


def zip_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_zip_slip_member(service: Service, tiny_bert: Path) -> None:
    with service.client() as client:
        model = rejected(client, zip_bytes(tiny_bert, extra={"../../evil.txt": b"x"}), "slip.zip")
        assert model["error"]["code"] == "unsafe_model"
        assert not (service.data_dir / "evil.txt").exists()
        assert storage_files(service, model["id"]) == [] and cache_files(service, model["id"]) == []


def test_symlink_member(service: Service, tiny_bert: Path) -> None:
    with service.client() as client:
        model = rejected(client, tar_with_symlink(tiny_bert), "link.tar.gz")
        assert model["error"]["code"] == "unsafe_model"
        assert cache_files(service, model["id"]) == []


def test_pickled_weights_only(service: Service, tiny_bert: Path) -> None:
    files = without(tiny_bert, "model.safetensors")
    files["pytorch_model.bin"] = b"\x80\x04\x95" + b"\x00" * 64  # a pickle header: never loaded
    with service.client() as client:
        model = rejected(client, zip_of(files), "pickle.zip")
        assert model["error"]["code"] == "unsafe_model"
        assert "safetensors" in model["error"]["message"]


def test_custom_code_is_refused(service: Service, tiny_bert: Path) -> None:
    files = without(tiny_bert)
    config = json.loads(files["config.json"])
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    files["config.json"] = json.dumps(config).encode()
    files["modeling_evil.py"] = b"import os\nos.system('touch /tmp/pwned')\n"
    with service.client() as client:
        model = rejected(client, zip_of(files), "custom.zip")
        assert model["error"]["code"] == "unsafe_model"


def test_truncated_archive(service: Service, tiny_bert: Path) -> None:
    data = tar_gz(tiny_bert)
    with service.client() as client:
        model = rejected(client, data[: len(data) // 2], "truncated.tar.gz")
        assert model["error"]["code"] == "invalid_archive"


def test_jobs_on_rejected_models_are_refused(service: Service, tiny_bert: Path) -> None:
    with service.client() as client:
        model = rejected(client, b"definitely not an archive", "junk.bin")
        response = client.post(
            "/v1/jobs",
            json={"model_id": model["id"], "recipe": {"stages": [{"method": "dynamic_int8"}]}},
        )
        assert response.status_code == 409 and response.json()["error"]["param"] == "model_id"


def test_oversized_upload_is_413_and_leaves_nothing(service: Service) -> None:
    limit = int(service.env["SLIMFORMER_MAX_UPLOAD_BYTES"])
    with service.client() as client:
        before = client.get("/v1/models?limit=100").json()["data"]
        stored_before = sorted(p for p in (service.data_dir / "storage").rglob("*") if p.is_file())

        def body():  # streamed without Content-Length: the server must stop at the limit itself
            yield (
                b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.tar.gz"\r\n\r\n'
            )
            for _ in range(limit // (1024 * 1024) + 2):
                yield b"\0" * (1024 * 1024)
            yield b"\r\n--b--\r\n"

        response = client.post(
            "/v1/models",
            content=body(),
            headers={"Content-Type": "multipart/form-data; boundary=b"},
        )
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "payload_too_large"
        declared = client.post("/v1/models", files={"file": ("x", b"\0" * (limit + 200_000))})
        assert declared.status_code == 413
        assert client.get("/v1/models?limit=100").json()["data"] == before
        stored_after = sorted(p for p in (service.data_dir / "storage").rglob("*") if p.is_file())
        assert stored_after == stored_before


def test_malformed_requests(service: Service) -> None:
    with service.client() as client:
        assert (
            client.post(
                "/v1/models", content=b"{", headers={"Content-Type": "application/json"}
            ).status_code
            == 422
        )
        no_file = client.post("/v1/models", data={"name": "x"}, files={"other": ("a", b"b")})
        assert no_file.status_code == 422 and no_file.json()["error"]["param"] == "file"
        outside = client.post(
            "/v1/models", json={"name": "p", "source": {"type": "path", "path": "/etc"}}
        )
        assert outside.status_code == 422 and outside.json()["error"]["param"] == "source.path"
        assert (
            client.post(
                "/v1/jobs", content=b"not json", headers={"Content-Type": "application/json"}
            ).status_code
            == 422
        )


def test_a_config_that_lies_about_its_shapes_is_rejected(service: Service, tiny_bert: Path) -> None:
    """Refused at registration (`rejected`, naming the tensors), not `ready` and then an
    `engine_error` at the first job."""
    files = without(tiny_bert)
    config = json.loads(files["config.json"])
    config["intermediate_size"] = 2 * config["intermediate_size"]
    files["config.json"] = json.dumps(config).encode()
    with service.client() as client:
        model = rejected(client, zip_of(files), "lying-config.zip")
        assert model["error"]["code"] == "unsupported_model"
        message = model["error"]["message"]
        assert "config.json does not describe these weights (6 tensors differ)" in message
        assert "encoder.layer.0.intermediate.dense.weight: config.json gives [128, 32]" in message
        assert storage_files(service, model["id"]) == []
