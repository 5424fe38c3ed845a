"""Safe extraction of an uploaded model archive (.zip, .tar.gz/.tgz, .tar).

An uploaded archive is hostile until proven otherwise (DESIGN principle 4). Every member is checked
before a single byte is written: its name (no absolute paths, no `..`, no NUL, control characters or
backslashes, no duplicates), its type (regular files and folders only: no symlinks, hard links,
devices or FIFOs), the member count, the total uncompressed size and, for zip, each member's
compression ratio (zip bombs). A tar is read to its end first, so a truncated tar.gz fails before
extraction.
Files are then streamed into a temporary folder next to the destination, counting the bytes actually
written, and the folder is renamed into place only when everything succeeded.

The format is recognised by its magic bytes, never by the file name. Pure standard library.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import stat
import struct
import tarfile
import tempfile
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

MemberKind = Literal["file", "dir", "symlink", "hardlink", "device", "fifo", "other"]

# A zip member that inflates more than this many times over is treated as a bomb. Deflate tops out
# near 1032:1, reached only by long runs of one byte; real weights (noisy floats) compress about
# 1.1:1, JSON or vocab under 10:1. Members under RATIO_CHECK_MIN_BYTES are too small to matter.
MAX_COMPRESSION_RATIO = 100
RATIO_CHECK_MIN_BYTES = 1 << 20
# Beyond the members' own bytes a tar stream holds headers, padding and long-name records; this
# much per member (plus a fixed margin) is allowed before a decompressing tar stream is stopped.
TAR_OVERHEAD_PER_MEMBER = 16 << 10
TAR_OVERHEAD_MARGIN = 1 << 20
# macOS Finder adds this folder to zips: not extracted, and not counted as a top-level folder.
MACOS_METADATA_DIR = "__MACOSX"

_CHUNK = 1 << 20
_MAX_NAME_COMPONENT_BYTES = 255
_DRIVE_PREFIX = re.compile(r"^[A-Za-z]:")
_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")
_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
_TAR_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)


class ArchiveError(Exception):
    """An archive that cannot be accepted; `code` is the API error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# `progress(phase, done, total)`: "scan" counts the archive's bytes read while its members are
# checked (a tar.gz is decompressed end to end), "extract" the member bytes written.
ProgressHook = Callable[[Literal["scan", "extract"], int, int], None]


@dataclass(frozen=True)
class Member:
    name: str  # as stored in the archive
    size: int  # uncompressed bytes (0 for anything but files)
    kind: MemberKind


def list_members(
    archive: Path, *, max_members: int | None = None, max_total_bytes: int | None = None
) -> list[Member]:
    """The archive's members as stored, links and all (the caller decides what is acceptable).

    Raises ArchiveError `invalid_archive` for anything that is not a complete zip or tar, and
    `payload_too_large` when the optional limits are exceeded.
    """
    with _open_archive(Path(archive), max_members, max_total_bytes) as reader:
        return [member for member, _ in reader.entries]


def extract_archive(
    archive: Path,
    dest: Path,
    *,
    max_members: int,
    max_total_bytes: int,
    skip: Callable[[str], bool] | None = None,
    check: Callable[[list[Member]], None] | None = None,
    progress: ProgressHook | None = None,
) -> list[str]:
    """Check every member of `archive`, then extract its regular files into the new folder `dest`.

    `max_total_bytes` bounds the uncompressed size of all the archive's files, skipped ones included
    (they must still be read past). When every member sits under one top-level folder, that folder
    is stripped so `dest` holds the files directly. `skip(name)`, given the name relative to `dest`,
    leaves a file out. `check(members)`, given every member as stored, may refuse the archive (by
    raising) before anything is written: one read of the archive instead of a `list_members`
    first. `progress` follows the scan and the extraction (`ProgressHook`). Returns the extracted
    names relative to `dest`, in archive order. `dest` must not exist and its parent must; on any
    failure nothing is left behind.
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists():
        raise FileExistsError(f"extraction target {dest} already exists")
    with _open_archive(archive, max_members, max_total_bytes, progress) as reader:
        if check is not None:
            check([member for member, _ in reader.entries])
        planned = _plan(reader.entries)
        wanted = [
            (name, member, handle) for name, member, handle in planned if not skip or not skip(name)
        ]
        total = sum(member.size for _, member, _ in wanted)
        if progress is not None:
            progress("extract", 0, total)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extracting-", dir=dest.parent))
        try:
            written = 0
            for name, member, handle in wanted:
                target = staging.joinpath(*name.split("/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                done = written
                on_chunk = None if progress is None else (
                    lambda copied, done=done: progress("extract", done + copied, total)
                )  # fmt: skip
                with reader.open(handle) as source, open(target, "xb") as sink:
                    written += _copy_exact(
                        source,
                        sink,
                        name=name,
                        expected=member.size,
                        budget=max_total_bytes - written,
                        on_chunk=on_chunk,
                    )
            os.rename(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return [name for name, _, _ in wanted]


# --- checking ---------------------------------------------------------------------------------


def _plan(entries: list[tuple[Member, object]]) -> list[tuple[str, Member, object]]:
    """Refuse unsafe members; return (relative name, member, handle) for each file to extract."""
    checked: list[tuple[list[str], Member, object]] = []
    for member, handle in entries:
        if member.kind not in ("file", "dir"):
            raise ArchiveError(
                "unsafe_model",
                f"archive member {member.name!r} is a {member.kind}; "
                "only regular files and folders are allowed",
            )
        parts = _safe_parts(member.name)
        if not parts:
            if member.kind == "file":
                raise ArchiveError(
                    "unsafe_model", f"archive member {member.name!r} has no file name"
                )
            continue  # the archive's root folder itself ("./")
        if parts[0] != MACOS_METADATA_DIR:
            checked.append((parts, member, handle))
    _refuse_collisions(checked)

    files = [(parts, member, handle) for parts, member, handle in checked if member.kind == "file"]
    tops = {parts[0] for parts, _, _ in checked}
    strip = len(tops) == 1 and all(len(parts) > 1 for parts, _, _ in files)
    return [("/".join(parts[strip:]), member, handle) for parts, member, handle in files]


def _safe_parts(name: str) -> list[str]:
    """Split a member name into path components, refusing anything that could escape the folder."""

    def unsafe(reason: str) -> ArchiveError:
        return ArchiveError("unsafe_model", f"archive member {name!r} {reason}")

    if "\x00" in name:
        raise unsafe("contains a NUL byte")
    if "\\" in name:
        raise unsafe("contains a backslash")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in name):
        raise unsafe("contains a control character")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise unsafe("is not valid UTF-8") from None
    if name.startswith("/") or _DRIVE_PREFIX.match(name):
        raise unsafe("has an absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise unsafe("has a '..' component")
    if any(len(part.encode("utf-8")) > _MAX_NAME_COMPONENT_BYTES for part in parts):
        raise unsafe("has a name component longer than 255 bytes")
    return parts


def _refuse_collisions(checked: list[tuple[list[str], Member, object]]) -> None:
    """No two files may land on one path (compared as a case-insensitive file system would), and no
    file may sit where a folder is needed."""

    def key(parts: list[str]) -> str:
        return "/".join(unicodedata.normalize("NFC", part).casefold() for part in parts)

    files: dict[str, str] = {}
    folders: set[str] = set()
    for parts, member, _ in checked:
        if member.kind == "file":
            if key(parts) in files:
                raise ArchiveError(
                    "unsafe_model",
                    f"archive member {member.name!r} duplicates {files[key(parts)]!r}",
                )
            files[key(parts)] = member.name
            folders.update(key(parts[:depth]) for depth in range(1, len(parts)))
        else:
            folders.add(key(parts))
    clash = sorted(folders & files.keys())
    if clash:
        raise ArchiveError(
            "unsafe_model", f"archive member {files[clash[0]]!r} is both a file and a folder"
        )


def _copy_exact(
    source: IO[bytes],
    sink: IO[bytes],
    *,
    name: str,
    expected: int,
    budget: int,
    on_chunk: Callable[[int], None] | None = None,
) -> int:
    """Stream one member, trusting the bytes actually read over the header that declared them."""
    written = 0
    try:
        while chunk := source.read(min(_CHUNK, expected - written + 1)):
            written += len(chunk)
            if written > budget:
                raise ArchiveError(
                    "payload_too_large", "archive expands beyond the allowed total size"
                )
            sink.write(chunk)
            if on_chunk is not None and written <= expected:
                on_chunk(written)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as error:
        raise ArchiveError(
            "invalid_archive", f"archive member {name!r} is corrupt: {error}"
        ) from None
    if written != expected:
        raise ArchiveError(
            "invalid_archive",
            f"archive member {name!r} holds {'more' if written > expected else 'fewer'} bytes "
            f"than the {expected} its header declares",
        )
    return written


def _check_limits(
    count: int, total: int, max_members: int | None, max_total_bytes: int | None
) -> None:
    if max_members is not None and count > max_members:
        raise ArchiveError("payload_too_large", f"archive has more than {max_members} members")
    if max_total_bytes is not None and total > max_total_bytes:
        raise ArchiveError(
            "payload_too_large",
            f"archive expands to more than {max_total_bytes} bytes ({total} declared so far)",
        )


# --- reading both formats -------------------------------------------------------------------


class _Reader:
    """Members of an open archive, each with a format-specific handle to open it by."""

    def __init__(self, entries: list[tuple[Member, object]], opener: Callable[[object], IO[bytes]]):
        self.entries = entries
        self.open = opener


@contextmanager
def _open_archive(
    archive: Path,
    max_members: int | None,
    max_total_bytes: int | None,
    progress: ProgressHook | None = None,
) -> Iterator[_Reader]:
    with open(archive, "rb") as raw:
        head = raw.read(512)
    size = archive.stat().st_size
    if progress is not None:
        progress("scan", 0, size)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        opened = _open_zip(archive, max_members, max_total_bytes)
    elif head.startswith(b"\x1f\x8b") or head[257:262] == b"ustar":
        gzipped = head.startswith(b"\x1f\x8b")
        opened = _open_tar(archive, gzipped, max_members, max_total_bytes, progress)
    else:
        raise ArchiveError("invalid_archive", "upload is not a .zip, .tar.gz or .tar archive")
    with opened as reader:
        if not reader.entries:
            raise ArchiveError("invalid_archive", "archive is empty")
        if progress is not None:
            progress("scan", size, size)
        yield reader


@contextmanager
def _open_zip(
    archive: Path, max_members: int | None, max_total_bytes: int | None
) -> Iterator[_Reader]:
    try:
        bundle = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as error:
        raise ArchiveError(
            "invalid_archive", f"zip archive is truncated or corrupt: {error}"
        ) from None
    with bundle:
        infos = bundle.infolist()
        entries = []
        for info in infos:
            kind = _zip_kind(info)
            if kind == "file":
                _check_zip_member(info)
            size = info.file_size if kind == "file" else 0
            entries.append((Member(info.orig_filename, size, kind), info))
        _check_limits(
            len(entries), sum(member.size for member, _ in entries), max_members, max_total_bytes
        )
        _check_zip_layout(archive, infos, bundle.start_dir)

        def open_member(info: object) -> IO[bytes]:
            try:
                return bundle.open(info)  # type: ignore[arg-type]
            except (zipfile.BadZipFile, EOFError, zlib.error) as error:
                raise ArchiveError("invalid_archive", f"zip member is corrupt: {error}") from None

        yield _Reader(entries, open_member)


def _zip_kind(info: zipfile.ZipInfo) -> MemberKind:
    # Unix zips keep st_mode in the high 16 bits of external_attr: that is where symlinks show.
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "other"
    return "dir" if info.is_dir() or stat.S_ISDIR(mode) else "file"


def _check_zip_member(info: zipfile.ZipInfo) -> None:
    if info.flag_bits & 0x1:
        raise ArchiveError("invalid_archive", f"zip member {info.orig_filename!r} is encrypted")
    if info.compress_type not in _ZIP_METHODS:
        raise ArchiveError(
            "invalid_archive",
            f"zip member {info.orig_filename!r} uses compression method {info.compress_type}; "
            "only stored and deflate are supported",
        )
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size >= RATIO_CHECK_MIN_BYTES and ratio > MAX_COMPRESSION_RATIO:
        raise ArchiveError(
            "payload_too_large",
            f"zip member {info.orig_filename!r} expands more than {MAX_COMPRESSION_RATIO} times "
            "over; refusing a possible zip bomb",
        )


def _check_zip_layout(archive: Path, infos: list[zipfile.ZipInfo], central_directory: int) -> None:
    """Each member's local header and data must lie before the central directory without overlapping
    another: overlapping members are how the densest zip bombs are built, and a member whose data
    runs into the directory is cut short."""
    with open(archive, "rb") as raw:
        previous_end, previous_name = 0, None
        for info in sorted(infos, key=lambda info: info.header_offset):
            if info.header_offset < previous_end:
                raise ArchiveError(
                    "invalid_archive",
                    f"zip members {previous_name!r} and {info.orig_filename!r} overlap",
                )
            raw.seek(info.header_offset)
            header = raw.read(_ZIP_LOCAL_HEADER.size)
            if len(header) < _ZIP_LOCAL_HEADER.size:
                raise ArchiveError("invalid_archive", "zip archive is truncated")
            signature, name_length, extra_length = _ZIP_LOCAL_HEADER.unpack(header)
            if signature != b"PK\x03\x04":
                raise ArchiveError(
                    "invalid_archive", f"zip member {info.orig_filename!r} has no local header"
                )
            previous_end = (
                info.header_offset
                + _ZIP_LOCAL_HEADER.size
                + name_length
                + extra_length
                + info.compress_size
            )
            previous_name = info.orig_filename
            if previous_end > central_directory:
                raise ArchiveError(
                    "invalid_archive", f"zip member {info.orig_filename!r} is truncated"
                )


@contextmanager
def _open_tar(
    archive: Path,
    gzipped: bool,
    max_members: int | None,
    max_total_bytes: int | None,
    progress: ProgressHook | None = None,
) -> Iterator[_Reader]:
    cap = None
    if max_total_bytes is not None:
        cap = max_total_bytes + TAR_OVERHEAD_MARGIN
        if max_members is not None:
            cap += max_members * TAR_OVERHEAD_PER_MEMBER
    size = archive.stat().st_size
    with open(archive, "rb") as raw:
        read = None if progress is None else (lambda: progress("scan", min(raw.tell(), size), size))
        stream = _CappedStream(gzip.GzipFile(fileobj=raw) if gzipped else raw, cap, read)
        try:
            bundle = tarfile.TarFile(fileobj=stream, mode="r")  # type: ignore[arg-type]
            entries = []
            total = 0
            for info in bundle:
                member = _tar_member(info)
                total += member.size
                _check_limits(len(entries) + 1, total, max_members, max_total_bytes)
                entries.append((member, info))
                if read is not None:
                    read()
            # tarfile checks that each member's data is all there (it reads the byte before the
            # next header), but not what follows the last one: the end-of-archive blocks and, for
            # gzip, the CRC trailer. Reading to the end catches a stream cut there.
            if gzipped:
                stream.drain()
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
            raise ArchiveError(
                "invalid_archive", f"tar archive is truncated or corrupt: {error}"
            ) from None

        def open_member(info: object) -> IO[bytes]:
            return bundle.extractfile(info)  # type: ignore[arg-type,return-value]

        yield _Reader(entries, open_member)


def _tar_member(info: tarfile.TarInfo) -> Member:
    if info.type in _TAR_FILE_TYPES:
        return Member(info.name, info.size, "file")
    if info.isdir():
        return Member(info.name, 0, "dir")
    if info.issym():
        return Member(info.name, 0, "symlink")
    if info.islnk():
        return Member(info.name, 0, "hardlink")
    if info.ischr() or info.isblk():
        return Member(info.name, 0, "device")
    if info.isfifo():
        return Member(info.name, 0, "fifo")
    return Member(info.name, 0, "other")  # sparse files, GNU volume headers, unknown types


class _CappedStream:
    """A seekable byte stream that refuses to be read (or sought) past `cap` bytes: a gzip bomb is
    stopped after a bounded amount of decompression, whatever the tar headers inside claim."""

    def __init__(
        self, stream: IO[bytes], cap: int | None, on_drain: Callable[[], None] | None = None
    ) -> None:
        self._stream = stream
        self._cap = cap
        self._on_drain = on_drain

    def read(self, size: int = -1) -> bytes:
        position = self._stream.tell()
        if self._cap is not None:
            allowed = self._cap - position + 1
            size = allowed if size is None or size < 0 else min(size, allowed)
        data = self._stream.read(size)
        self._refuse_past(position + len(data))
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            self._refuse_past(offset)
        return self._stream.seek(offset, whence)

    def tell(self) -> int:
        return self._stream.tell()

    def drain(self) -> None:
        while self.read(_CHUNK):
            if self._on_drain is not None:
                self._on_drain()

    def _refuse_past(self, position: int) -> None:
        if self._cap is not None and position > self._cap:
            raise ArchiveError("payload_too_large", "archive expands beyond the allowed total size")
