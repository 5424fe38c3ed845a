"""S3-compatible storage against a real S3 endpoint (moto's standalone server, over HTTP).

The store-level tests need no database or broker and run once; the service test runs the API and a
worker on `s3://` storage on both backends: an upload goes to the bucket, a real job reads it and
writes its artifacts there, and the artifact downloads streamed and through a presigned URL."""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.storage import TooLarge
from app.storage_s3 import PART_SIZE, S3Store
from tests.conftest import Service, builtin_id, running_service, wait_for

MB = 1024 * 1024


@pytest.fixture
def store(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Store]:
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    store = S3Store(f"bucket-{secrets.token_hex(4)}", "some/prefix")
    store.prepare()
    yield store


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    return (data[i : i + size] for i in range(0, len(data), size))


def unfinished_uploads(store: S3Store) -> list[str]:
    found = store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
    return [upload["Key"] for upload in found]


def names(store: S3Store) -> set[str]:
    listed = store.client.list_objects_v2(Bucket=store.bucket).get("Contents", [])
    return {item["Key"] for item in listed}


def test_a_multipart_upload_stores_the_bytes_and_their_sha256(store: S3Store) -> None:
    data = os.urandom(2 * PART_SIZE + 12345)  # three parts, the last one short
    stored = store.write_stream("models/m1/upload.tar.gz", chunks(data, 65536 + 7))
    assert stored.key == "models/m1/upload.tar.gz"
    assert stored.size_bytes == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    head = store.client.head_object(Bucket=store.bucket, Key="some/prefix/models/m1/upload.tar.gz")
    assert head["ETag"].strip('"').endswith("-3")  # really went as a three-part upload
    with store.open("models/m1/upload.tar.gz") as handle:
        assert handle.read() == data
    assert unfinished_uploads(store) == []
    small = store.put_bytes("datasets/d1/data", b"one line\n")  # below a part: one PutObject
    assert (small.size_bytes, small.sha256) == (9, hashlib.sha256(b"one line\n").hexdigest())
    assert store.size("datasets/d1/data") == 9


def test_an_exception_mid_write_leaves_no_object_and_no_upload(store: S3Store) -> None:
    with pytest.raises(RuntimeError, match="client went away"), store.writer("jobs/j1/a") as writer:
        for chunk in chunks(os.urandom(3 * PART_SIZE), MB):
            writer.write(chunk)  # two parts already sent when it fails
        raise RuntimeError("client went away")
    assert not store.exists("jobs/j1/a")
    assert unfinished_uploads(store) == []
    assert names(store) == set()


def test_a_write_past_its_limit_is_refused_and_leaves_nothing(store: S3Store) -> None:
    with pytest.raises(TooLarge):
        store.write_stream("models/big", chunks(os.urandom(20 * MB), MB), max_bytes=10 * MB)
    assert not store.exists("models/big")
    assert unfinished_uploads(store) == []
    exact = store.write_stream("models/fits", chunks(b"x" * (10 * MB), MB), max_bytes=10 * MB)
    assert exact.size_bytes == 10 * MB


def test_range_reads_return_exactly_the_bytes_asked_for(store: S3Store) -> None:
    data = os.urandom(3 * MB + 17)
    store.put_bytes("jobs/j1/model.tar.gz", data)
    with store.open("jobs/j1/model.tar.gz") as handle:
        handle.seek(MB - 3)
        assert handle.read(10) == data[MB - 3 : MB + 7]
        assert handle.tell() == MB + 7
        handle.seek(-5, os.SEEK_END)
        assert handle.read() == data[-5:]
        assert handle.read(1) == b""
        handle.seek(0)
        assert handle.read(4) == data[:4]
    with pytest.raises(FileNotFoundError):
        store.open("jobs/j1/missing")


def test_delete_prefix_removes_that_prefix_only_with_its_unfinished_uploads(
    store: S3Store,
) -> None:
    for key in ("jobs/j1", "jobs/j1/attempt-1/model.tar.gz", "jobs/j1/report.json", "jobs/j10/x"):
        store.put_bytes(key, key.encode())
    stray = store.client.create_multipart_upload(
        Bucket=store.bucket, Key="some/prefix/jobs/j1/attempt-2/model.tar.gz"
    )
    assert unfinished_uploads(store) == ["some/prefix/jobs/j1/attempt-2/model.tar.gz"]
    store.delete_prefix("jobs/j1/")
    assert names(store) == {"some/prefix/jobs/j10/x"}  # a sibling sharing the leading text stays
    assert unfinished_uploads(store) == []
    assert stray["UploadId"]


def test_fetch_and_presigned_urls_give_the_stored_bytes(store: S3Store, tmp_path: Path) -> None:
    data = os.urandom(PART_SIZE + MB)
    store.put_bytes("datasets/d2/data", data)
    local = store.fetch("datasets/d2/data", tmp_path / "cache" / "d2.txt")
    assert local.read_bytes() == data
    assert [p.name for p in local.parent.iterdir()] == ["d2.txt"]  # no temporary file left
    url = store.presigned_url("datasets/d2/data", expires_s=60, filename="d2.txt")
    assert url is not None and "X-Amz-Expires=60" in url
    response = httpx.get(url, headers={"Range": "bytes=10-19"})
    assert response.status_code == 206 and response.content == data[10:20]
    assert 'filename="d2.txt"' in httpx.get(url).headers["content-disposition"]
    with pytest.raises(FileNotFoundError):
        store.fetch("datasets/none", tmp_path / "none")
    with pytest.raises(ValueError):
        store.put_bytes("../outside", b"")


TEXT = "\n".join(
    f"Sentence number {i} is about the weather, the markets and a football match."
    for i in range(24)
)


@pytest.mark.service
@pytest.mark.real_model
def test_a_job_on_s3_storage_uploads_runs_and_downloads_streamed_and_presigned(
    s3_env: dict[str, str], tmp_path: Path
) -> None:
    bucket = f"svc-{secrets.token_hex(4)}"
    data_dir = tmp_path / "svc"  # logs and the worker's cache; no storage folder in it
    data_dir.mkdir()
    with running_service(
        data_dir,
        SLIMFORMER_STORAGE_URL=f"s3://{bucket}/slim",
        SLIMFORMER_DOWNLOAD_REDIRECT="true",  # this install redirects unless asked not to
        **s3_env,
    ) as svc:
        check_job_on_s3(svc, bucket, s3_env)


def check_job_on_s3(svc: Service, bucket: str, s3_env: dict[str, str]) -> None:
    with svc.client() as client:
        created = client.post(
            "/v1/datasets", files={"file": ("weather.txt", TEXT.encode())}, data={"name": "w"}
        )
        assert created.status_code == 201, created.text
        dataset = created.json()
        assert dataset["sha256"] == hashlib.sha256(TEXT.encode()).hexdigest()
        response = client.post(
            "/v1/jobs",
            json={
                "model_id": builtin_id(client, "models", "all-MiniLM-L6-v2"),
                "recipe": {"stages": [{"method": "dynamic_int8"}]},
                "evaluation": {
                    "dataset_id": dataset["id"],
                    "max_samples": 8,
                    "seq_len": 32,
                    "latency": {"runs": 1, "warmup": 0},
                },
            },
        )
        assert response.status_code == 202, response.text
        job = wait_for(client, response.json()["id"], {"succeeded", "failed"}, timeout=300)
        assert job["status"] == "succeeded", (job, svc.logs())
        artifacts = client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
        model = next(a for a in artifacts if a["kind"] == "model")
        url = f"/v1/artifacts/{model['id']}/content"

        streamed = client.get(url, params={"redirect": "false"})
        assert streamed.status_code == 200
        assert streamed.headers["etag"] == f'"{model["sha256"]}"'
        assert hashlib.sha256(streamed.content).hexdigest() == model["sha256"]
        assert len(streamed.content) == model["size_bytes"]
        ranged = client.get(url, params={"redirect": "false"}, headers={"Range": "bytes=100-1123"})
        assert ranged.status_code == 206 and ranged.content == streamed.content[100:1124]

        redirected = client.get(url, params={"redirect": "true"})
        assert redirected.status_code == 307
        assert redirected.headers["etag"] == f'"{model["sha256"]}"'
        location = redirected.headers["location"]
        assert location.startswith(f"{s3_env['AWS_ENDPOINT_URL']}/{bucket}/slim/jobs/{job['id']}/")
        presigned = httpx.get(location)  # no API key: the URL is the credential
        assert presigned.status_code == 200
        assert presigned.content == streamed.content
        assert client.get(url).status_code == 307  # the install's setting, without the parameter

    # The bytes live in the bucket, not in the service's folder.
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"], **_credentials(s3_env))
    keys = {item["Key"] for item in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert f"slim/datasets/{dataset['id']}/data" in keys
    assert any(key.startswith(f"slim/jobs/{job['id']}/") for key in keys)
    assert not (svc.data_dir / "storage" / "jobs").exists()


def _credentials(env: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }
