"""Object storage for uploads, datasets, checkpoints and artifacts.

Callers see keys (`models/mdl_…/upload.tar.gz`), never paths, so the filesystem (`LocalStore`, here)
and S3-compatible storage (`app/storage_s3.py`, `S3Store`) implement one interface. Every write is
atomic and returns the bytes' sha256: an object either exists whole and verified, or not at all.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlparse

from app.settings import Settings, get_settings

CHUNK = 1024 * 1024


class TooLarge(Exception):
    """An upload went past its size limit; nothing was stored."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    size_bytes: int
    sha256: str


class Writer(Protocol):
    def write(self, chunk: bytes) -> None: ...


class Store(Protocol):
    def writer(
        self, key: str, *, max_bytes: int | None = None
    ) -> AbstractContextManager[Writer]: ...
    def write_stream(
        self, key: str, chunks: Iterator[bytes], *, max_bytes: int | None = None
    ) -> StoredObject: ...
    def put_file(self, key: str, source: Path) -> StoredObject: ...
    def put_bytes(self, key: str, data: bytes) -> StoredObject: ...
    def open(self, key: str) -> BinaryIO: ...
    def size(self, key: str) -> int: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def fetch(self, key: str, destination: Path) -> Path: ...
    def presigned_url(
        self, key: str, *, expires_s: int, filename: str | None = None
    ) -> str | None: ...
    def ping(self) -> None: ...
    def prepare(self) -> None: ...


class HashingWriter:
    def __init__(self, key: str, handle: BinaryIO, max_bytes: int | None) -> None:
        self.key = key
        self._handle = handle
        self._max_bytes = max_bytes
        self._digest = hashlib.sha256()
        self.size = 0
        self.result: StoredObject | None = None

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._max_bytes is not None and self.size > self._max_bytes:
            raise TooLarge(f"more than {self._max_bytes} bytes")
        self._digest.update(chunk)
        self._handle.write(chunk)

    def finish(self) -> None:
        self.result = StoredObject(
            key=self.key, size_bytes=self.size, sha256=self._digest.hexdigest()
        )


class WritesThroughWriter:
    """`write_stream`, `put_file` and `put_bytes` for a store whose one way in is `writer`."""

    read_chunk = CHUNK  # how much of a local file each write takes

    def writer(
        self, key: str, *, max_bytes: int | None = None
    ) -> AbstractContextManager[HashingWriter]:
        raise NotImplementedError

    def write_stream(
        self, key: str, chunks: Iterator[bytes], *, max_bytes: int | None = None
    ) -> StoredObject:
        with self.writer(key, max_bytes=max_bytes) as writer:
            for chunk in chunks:
                writer.write(chunk)
        assert writer.result is not None
        return writer.result

    def put_file(self, key: str, source: Path) -> StoredObject:
        with source.open("rb") as handle:
            return self.write_stream(key, iter(lambda: handle.read(self.read_chunk), b""))

    def put_bytes(self, key: str, data: bytes) -> StoredObject:
        return self.write_stream(key, iter([data]))


class LocalStore(WritesThroughWriter):
    """A folder on a local or shared filesystem."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"storage key escapes the store: {key!r}")
        return path

    @contextmanager
    def _atomic(self, key: str) -> Iterator[tuple[BinaryIO, Path]]:
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(dir=final.parent, prefix=".tmp-", suffix=".part")
        temp = Path(temp_name)
        try:
            with os.fdopen(fd, "wb") as handle:
                yield handle, final
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, final)
            _fsync_dir(final.parent)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    @contextmanager
    def writer(self, key: str, *, max_bytes: int | None = None) -> Iterator[HashingWriter]:
        """Push-style atomic write; `writer.result` is set once the object is in place."""
        with self._atomic(key) as (handle, _final):
            writer = HashingWriter(key, handle, max_bytes)
            yield writer
        writer.finish()

    def open(self, key: str) -> BinaryIO:
        return self._path(key).open("rb")

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix.rstrip("/"))
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def fetch(self, key: str, destination: Path) -> Path:
        """Make the object available as a local file (a copy, so callers may consume it)."""
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._path(key), destination)
        return destination

    def presigned_url(self, key: str, *, expires_s: int, filename: str | None = None) -> str | None:
        """A folder has no URLs of its own: downloads stream through the API."""
        return None

    def ping(self) -> None:
        probe = self.root / ".ping"
        probe.write_bytes(b"ok")
        probe.unlink()

    def prepare(self) -> None:
        """Nothing to create: the folder was made on construction."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def search_trials_key(job_id: str) -> str:
    """Where a search job keeps its trials as they finish (a retried attempt resumes from them)."""
    return f"search/trials/{job_id}.json"


_stores: dict[str, Store] = {}


def get_store(settings: Settings | None = None) -> Store:
    settings = settings or get_settings()
    url = settings.resolved_storage_url
    store = _stores.get(url)
    if store is None:
        parsed = urlparse(url)
        if parsed.scheme == "file":
            store = LocalStore(Path(parsed.path))
        elif parsed.scheme == "s3":
            from app.storage_s3 import S3Store  # boto3 only where S3 is used

            store = S3Store(
                parsed.netloc,
                parsed.path,
                presign_endpoint_url=settings.s3_presign_endpoint_url,
            )
        else:
            raise ValueError(
                f"SLIMFORMER_STORAGE_URL scheme {parsed.scheme!r} is not supported "
                "(file:///path or s3://bucket/prefix)"
            )
        _stores[url] = store
    return store
