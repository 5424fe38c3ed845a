"""The `Store` on S3-compatible object storage (AWS S3, MinIO, Ceph RGW, …), through boto3.

`SLIMFORMER_STORAGE_URL=s3://bucket/prefix`; the endpoint, region and credentials come from the
standard AWS environment (`AWS_ENDPOINT_URL`, `AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID`, …, or a
profile), read by boto3 as every AWS tool reads them.

The same promises as `LocalStore`:
- **Whole or absent.** A write is buffered into parts and sent as a multipart upload; the object
  appears only when `CompleteMultipartUpload` succeeds. Any exception on the way (a size limit, a
  client that went away, a failed part) aborts the upload, so a half-written object never exists.
  An object smaller than one part is a single `PutObject`, atomic as well.
- **sha256 as the bytes go by**, computed by the same `HashingWriter` as on disk.
- **Constant memory.** At most `IN_FLIGHT` parts are being sent while the next one fills, whatever
  the object's size; reads stream.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from app.storage import CHUNK, HashingWriter, WritesThroughWriter

# 8 MiB parts (s3transfer's default; S3's floor is 5 MiB and 10,000 parts make at most 80 GB per
# object) with four in flight: an upload holds about six parts (~50 MB measured) whatever the object's
# size. bench/storage_throughput.py saw no gain from larger parts or more in flight against moto.
PART_SIZE = 8 * 1024 * 1024
IN_FLIGHT = 4
DELETE_BATCH = 1000  # DeleteObjects takes at most 1,000 keys


def _missing(error: ClientError) -> bool:
    code = str(error.response.get("Error", {}).get("Code", ""))
    return code in {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


class S3Store(WritesThroughWriter):
    """Keys live under `prefix/` in `bucket`."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        presign_endpoint_url: str | None = None,
        part_size: int = PART_SIZE,
    ) -> None:
        if not bucket:
            raise ValueError("SLIMFORMER_STORAGE_URL=s3://… needs a bucket: s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.part_size = part_size
        self.read_chunk = part_size  # put_file: a part per read
        self._presign_endpoint_url = presign_endpoint_url
        self._clients: dict[tuple[int, str | None], Any] = {}
        self._lock = threading.Lock()

    # boto3 clients are thread-safe but must not cross a fork (a Celery pool child would share
    # the parent's sockets): one client per process, made on first use.
    def _client(self, endpoint_url: str | None = None) -> Any:
        slot = (os.getpid(), endpoint_url)
        client = self._clients.get(slot)
        if client is None:
            with self._lock:
                client = self._clients.get(slot)
                if client is None:
                    config = Config(
                        signature_version="s3v4",  # presigned URLs too; v2 is long deprecated
                        connect_timeout=5,
                        read_timeout=60,
                        retries={"mode": "standard", "max_attempts": 3},
                        max_pool_connections=16,
                    )
                    options = {"endpoint_url": endpoint_url} if endpoint_url else {}
                    client = boto3.session.Session().client("s3", config=config, **options)
                    self._clients[slot] = client
        return client

    @property
    def client(self) -> Any:
        return self._client()

    def _name(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"storage key escapes the store: {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    # -- writes -------------------------------------------------------------------------------

    @contextmanager
    def writer(self, key: str, *, max_bytes: int | None = None) -> Iterator[HashingWriter]:
        """Push-style write; `writer.result` is set once the whole object is in place."""
        upload = _MultipartUpload(self.client, self.bucket, self._name(key), self.part_size)
        writer = HashingWriter(key, upload, max_bytes)  # type: ignore[arg-type]
        try:
            yield writer
            upload.complete()
        except BaseException:
            upload.abort()
            raise
        writer.finish()

    # -- reads --------------------------------------------------------------------------------

    def open(self, key: str) -> BinaryIO:
        """A seekable reader; reads stream one ranged GET from the position to the end, and a
        seek starts a new one (so `Range` requests fetch only what they ask for)."""
        size = self.size(key)
        raw = _RangedObject(self.client, self.bucket, self._name(key), size)
        return io.BufferedReader(raw, buffer_size=1024 * 1024)  # type: ignore[return-value]

    def size(self, key: str) -> int:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._name(key))
        except ClientError as error:
            if _missing(error):
                raise FileNotFoundError(key) from None
            raise
        return int(head["ContentLength"])

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except FileNotFoundError:
            return False
        return True

    def fetch(self, key: str, destination: Path) -> Path:
        """Download to a local file: one streamed GET into a temporary name beside it, then a
        rename, so a reader of `destination` never sees part of it. One stream, not s3transfer's
        parallel ranged GETs: bench/storage_throughput.py measured it 30 times faster against
        moto, which re-reads the whole object for every range."""
        destination.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(dir=destination.parent, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, self.open(key) as source:
                shutil.copyfileobj(source, out, CHUNK)
            os.replace(temp_name, destination)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise
        return destination

    def presigned_url(self, key: str, *, expires_s: int, filename: str | None = None) -> str | None:
        """A GET URL valid for `expires_s` seconds, signed for the public endpoint when one is set
        (`SLIMFORMER_S3_PRESIGN_ENDPOINT_URL`: clients may reach the store by another name)."""
        params: dict[str, str] = {"Bucket": self.bucket, "Key": self._name(key)}
        if filename:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        client = self._client(self._presign_endpoint_url)
        return client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_s)

    # -- deletes and checks -------------------------------------------------------------------

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._name(key))

    def delete_prefix(self, prefix: str) -> None:
        """The object named `prefix` and everything under `prefix/`, as `LocalStore` removes a file
        or a folder; unfinished multipart uploads there (a worker killed mid-write) go too."""
        name = self._name(prefix.rstrip("/"))
        self.delete(prefix.rstrip("/"))
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{name}/"
        )
        batch: list[dict[str, str]] = []
        for page in pages:
            for item in page.get("Contents", []):
                batch.append({"Key": item["Key"]})
                if len(batch) == DELETE_BATCH:
                    self._delete_batch(batch)
                    batch = []
        if batch:
            self._delete_batch(batch)
        uploads = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=f"{name}/"
        )
        for page in uploads:
            for upload in page.get("Uploads", []):
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )

    def _delete_batch(self, batch: list[dict[str, str]]) -> None:
        response = self.client.delete_objects(
            Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
        )
        errors = response.get("Errors") or []
        if errors:
            raise OSError(f"could not delete {len(errors)} objects, first: {errors[0]}")

    def ping(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)

    def prepare(self) -> None:
        """Create the bucket if it does not exist (`slimformer migrate`; MinIO starts empty)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as error:
            if not _missing(error):
                raise
            self.client.create_bucket(Bucket=self.bucket, **self._location())

    def _location(self) -> dict:
        region = self.client.meta.region_name
        if region and region != "us-east-1":
            return {"CreateBucketConfiguration": {"LocationConstraint": region}}
        return {}


class _MultipartUpload:
    """The sink under a `HashingWriter`: collects chunks into parts and sends them, at most
    `IN_FLIGHT` at once, on first need turning into a multipart upload."""

    def __init__(self, client: Any, bucket: str, name: str, part_size: int) -> None:
        self._client = client
        self._bucket = bucket
        self._name = name
        self._part_size = part_size
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._upload_id: str | None = None
        self._parts: list[Future] = []
        self._pool: ThreadPoolExecutor | None = None
        # As s3transfer does: with boto3's default checksum policy the upload is created with
        # CRC32 and every part carries its own, which the store checks on receipt.
        checksums = client.meta.config.request_checksum_calculation == "when_supported"
        self._checksum = {"ChecksumAlgorithm": "CRC32"} if checksums else {}

    def write(self, chunk: bytes) -> None:
        self._pending.append(bytes(chunk))
        self._pending_size += len(chunk)
        if self._pending_size >= self._part_size:
            self._send(self._take())

    def _take(self) -> bytes:
        data = b"".join(self._pending)
        self._pending, self._pending_size = [], 0
        return data

    def _send(self, data: bytes) -> None:
        if self._upload_id is None:
            created = self._client.create_multipart_upload(
                Bucket=self._bucket, Key=self._name, **self._checksum
            )
            self._upload_id = created["UploadId"]
            self._pool = ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="s3-part")
        # Wait for the oldest part while IN_FLIGHT are out: memory stays bounded, and a failed
        # part stops the upload here rather than at the end.
        unfinished = [part for part in self._parts if not part.done()]
        if len(unfinished) >= IN_FLIGHT:
            unfinished[0].result()
        for part in self._parts:
            if part.done():
                part.result()  # raises a failed part's error
        assert self._pool is not None
        number = len(self._parts) + 1
        self._parts.append(self._pool.submit(self._upload_part, number, data))

    def _upload_part(self, number: int, data: bytes) -> dict:
        response = self._client.upload_part(
            Bucket=self._bucket,
            Key=self._name,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=data,
            **self._checksum,
        )
        part = {"PartNumber": number, "ETag": response["ETag"]}
        for field in ("ChecksumCRC32", "ChecksumCRC32C", "ChecksumCRC64NVME", "ChecksumSHA1"):
            if response.get(field):
                part[field] = response[field]
        return part

    def complete(self) -> None:
        if self._upload_id is None:
            self._client.put_object(Bucket=self._bucket, Key=self._name, Body=self._take())
            return
        if self._pending_size:
            self._send(self._take())
        parts = [future.result() for future in self._parts]
        self._client.complete_multipart_upload(
            Bucket=self._bucket,
            Key=self._name,
            UploadId=self._upload_id,
            MultipartUpload={"Parts": parts},
        )
        self._shutdown()

    def abort(self) -> None:
        self._pending, self._pending_size = [], 0
        if self._upload_id is None:
            return
        for part in self._parts:
            part.cancel()
        self._shutdown()
        self._client.abort_multipart_upload(
            Bucket=self._bucket, Key=self._name, UploadId=self._upload_id
        )

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class _RangedObject(io.RawIOBase):
    """A read-only, seekable view of one object: `GET Range: bytes=<position>-` on first read
    after each seek, streamed from there."""

    def __init__(self, client: Any, bucket: str, name: str, size: int) -> None:
        self._client = client
        self._bucket = bucket
        self._name = name
        self._size = size
        self._position = 0
        self._body: Any = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        position = base + offset
        if position < 0:
            raise ValueError(f"negative seek position {position}")
        if position != self._position:
            self._drop()
            self._position = position
        return position

    def readinto(self, buffer: Any) -> int:
        if self._position >= self._size or len(buffer) == 0:
            return 0
        if self._body is None:
            response = self._client.get_object(
                Bucket=self._bucket, Key=self._name, Range=f"bytes={self._position}-"
            )
            self._body = response["Body"]
        data = self._body.read(len(buffer))
        if not data:
            raise OSError(f"{self._name}: the object ended at {self._position} of {self._size}")
        count = len(data)
        buffer[:count] = data
        self._position += count
        return count

    def _drop(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None

    def close(self) -> None:
        self._drop()
        super().close()
