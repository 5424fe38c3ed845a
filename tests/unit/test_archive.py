"""Archive extraction: hostile members are refused before anything is written, and a failure leaves
nothing behind. Every archive is built here, byte by byte where a library would refuse to."""

from __future__ import annotations

import gzip
import io
import os
import stat
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from workers.compression.archive import (
    ArchiveError,
    Member,
    _copy_exact,
    extract_archive,
    list_members,
)

LIMITS = {"max_members": 50, "max_total_bytes": 10_000_000}
MODEL_FILES = {
    "my-model/config.json": b'{"model_type": "bert"}',
    "my-model/model.safetensors": os.urandom(50_000),
    "my-model/tokenizer/vocab.txt": b"[PAD]\n[UNK]\n",
}
FORMATS = ["tar.gz", "tar", "zip"]


def build(path: Path, fmt: str, files: dict[str, bytes]) -> Path:
    """An archive of regular files in `fmt`; the name deliberately says nothing about the format."""
    if fmt == "zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bundle:
            for name, data in files.items():
                bundle.writestr(name, data)
    else:
        with tarfile.open(path, "w:gz" if fmt == "tar.gz" else "w") as bundle:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                bundle.addfile(info, io.BytesIO(data))
    return path


def build_tar(path: Path, infos: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as bundle:
        for info, data in infos:
            info.size = len(data)
            bundle.addfile(info, io.BytesIO(data) if data else None)
    return path


def tar_entry(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.fixture
def models(tmp_path: Path) -> Path:
    """The folder extraction targets live in; it must hold nothing after a failure."""
    folder = tmp_path / "models"
    folder.mkdir()
    return folder


def assert_rejected(archive: Path, models: Path, code: str, **limits: int) -> ArchiveError:
    with pytest.raises(ArchiveError) as caught:
        extract_archive(archive, models / "model", **{**LIMITS, **limits})
    assert caught.value.code == code, caught.value.message
    assert list(models.iterdir()) == []  # no model folder, no staging folder
    return caught.value


# --- what is accepted -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_extracts_files_and_strips_the_single_top_folder(tmp_path: Path, models: Path, fmt: str):
    archive = build(tmp_path / "upload", fmt, MODEL_FILES)

    names = extract_archive(archive, models / "model", **LIMITS)

    assert names == ["config.json", "model.safetensors", "tokenizer/vocab.txt"]
    for name, data in MODEL_FILES.items():
        assert (models / "model" / name.removeprefix("my-model/")).read_bytes() == data
    assert [path.name for path in models.iterdir()] == ["model"]  # staging folder renamed away


def test_keeps_folders_when_files_sit_at_the_top(tmp_path: Path, models: Path):
    files = {"config.json": b"{}", "tokenizer/vocab.txt": b"a\n"}
    archive = build(tmp_path / "upload", "zip", files)

    assert extract_archive(archive, models / "model", **LIMITS) == list(files)
    assert (models / "model" / "tokenizer" / "vocab.txt").read_bytes() == b"a\n"


def test_strips_prefix_with_dot_slash_names_and_ignores_macos_metadata(
    tmp_path: Path, models: Path
):
    files = {
        "./m/config.json": b"{}",
        "./m/model.safetensors": b"x",
        "__MACOSX/m/._config.json": b"apple",
    }
    archive = build(tmp_path / "upload", "tar.gz", files)

    names = extract_archive(archive, models / "model", **LIMITS)

    assert names == ["config.json", "model.safetensors"]
    assert sorted(path.name for path in (models / "model").iterdir()) == names


def test_skip_leaves_members_out(tmp_path: Path, models: Path):
    files = {"m/config.json": b"{}", "m/pytorch_model.bin": b"pickle", "m/model.safetensors": b"s"}
    archive = build(tmp_path / "upload", "tar.gz", files)

    names = extract_archive(
        archive, models / "model", **LIMITS, skip=lambda name: name.endswith(".bin")
    )

    assert names == ["config.json", "model.safetensors"]
    assert not (models / "model" / "pytorch_model.bin").exists()


def test_refuses_an_existing_destination(tmp_path: Path, models: Path):
    archive = build(tmp_path / "upload", "zip", MODEL_FILES)
    (models / "model").mkdir()

    with pytest.raises(FileExistsError):
        extract_archive(archive, models / "model", **LIMITS)


def test_list_members_reports_kinds_and_sizes(tmp_path: Path):
    archive = build_tar(
        tmp_path / "upload",
        [
            (tar_entry("m", tarfile.DIRTYPE), b""),
            (tar_entry("m/config.json"), b"{}"),
            (tar_entry("m/link", tarfile.SYMTYPE, "/etc/passwd"), b""),
        ],
    )

    assert list_members(archive) == [
        Member("m", 0, "dir"),
        Member("m/config.json", 2, "file"),
        Member("m/link", 0, "symlink"),
    ]


# --- unsafe members -------------------------------------------------------------------------------


BAD_NAMES = ["../evil", "m/../../evil", "/tmp/evil", "C:/evil", "..\\evil", "m/evil\n.json", "."]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad_name", BAD_NAMES)
def test_refuses_escaping_names(tmp_path: Path, models: Path, fmt: str, bad_name: str):
    archive = build(tmp_path / "upload", fmt, {"m/config.json": b"{}", bad_name: b"owned"})

    assert_rejected(archive, models, "unsafe_model")
    assert not (tmp_path / "evil").exists()


def test_refuses_a_nul_byte_in_a_zip_name(tmp_path: Path, models: Path):
    archive = build(tmp_path / "upload", "zip", {"config.jsonX.txt": b"{}"})
    # zipfile cuts names at NUL when reading (the classic trick); the raw name is still refused.
    archive.write_bytes(archive.read_bytes().replace(b"config.jsonX.txt", b"config.json\0.txt"))

    assert "NUL" in assert_rejected(archive, models, "unsafe_model").message


@pytest.mark.parametrize(
    ("kind", "linkname", "word"),
    [
        (tarfile.SYMTYPE, "/etc/passwd", "symlink"),
        (tarfile.LNKTYPE, "m/config.json", "hardlink"),
        (tarfile.CHRTYPE, "", "device"),
        (tarfile.BLKTYPE, "", "device"),
        (tarfile.FIFOTYPE, "", "fifo"),
        (tarfile.GNUTYPE_SPARSE, "", "other"),
    ],
)
def test_refuses_special_tar_members(
    tmp_path: Path, models: Path, kind: bytes, linkname: str, word: str
):
    archive = build_tar(
        tmp_path / "upload",
        [(tar_entry("m/config.json"), b"{}"), (tar_entry("m/special", kind, linkname), b"")],
    )

    assert word in assert_rejected(archive, models, "unsafe_model").message


@pytest.mark.parametrize(
    ("file_type", "word"),
    [(stat.S_IFLNK, "symlink"), (stat.S_IFCHR, "device"), (stat.S_IFIFO, "fifo")],
)
def test_refuses_special_zip_members(tmp_path: Path, models: Path, file_type: int, word: str):
    archive = tmp_path / "upload"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("m/config.json", b"{}")
        special = zipfile.ZipInfo("m/model.safetensors")
        special.create_system = 3  # unix: st_mode lives in the high half of external_attr
        special.external_attr = (file_type | 0o777) << 16
        bundle.writestr(special, "/etc/passwd")

    assert word in assert_rejected(archive, models, "unsafe_model").message


@pytest.mark.parametrize(
    "names",
    [
        ["m/config.json", "m/config.json"],
        ["m/config.json", "m/Config.json"],  # would collide on a case-insensitive file system
        ["m/weights", "m/weights/model.safetensors"],  # a file where a folder is needed
    ],
)
def test_refuses_colliding_names(tmp_path: Path, models: Path, names: list[str]):
    archive = build_tar(tmp_path / "upload", [(tar_entry(name), b"x") for name in names])

    assert_rejected(archive, models, "unsafe_model")


# --- size limits ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_refuses_too_many_members(tmp_path: Path, models: Path, fmt: str):
    files = {f"m/file{index}.json": b"{}" for index in range(11)}
    archive = build(tmp_path / "upload", fmt, files)

    assert_rejected(archive, models, "payload_too_large", max_members=10)
    with pytest.raises(ArchiveError, match="payload_too_large"):
        list_members(archive, max_members=10)  # refused from the listing, before extraction
    extract_archive(
        archive, models / "model", **{**LIMITS, "max_members": 11}
    )  # the bound is exact


@pytest.mark.parametrize("fmt", FORMATS)
def test_refuses_too_many_declared_bytes(tmp_path: Path, models: Path, fmt: str):
    archive = build(tmp_path / "upload", fmt, {"m/a.bin": b"a" * 600, "m/b.bin": b"b" * 600})

    assert_rejected(archive, models, "payload_too_large", max_total_bytes=1199)
    with pytest.raises(ArchiveError, match="payload_too_large"):
        list_members(archive, max_total_bytes=1199)  # refused from the headers, before extraction
    extract_archive(archive, models / "model", **{**LIMITS, "max_total_bytes": 1200})


def test_refuses_a_zip_bomb_member(tmp_path: Path, models: Path):
    archive = build(tmp_path / "upload", "zip", {"m/model.safetensors": bytes(4 << 20)})

    error = assert_rejected(archive, models, "payload_too_large", max_total_bytes=1 << 30)
    assert "bomb" in error.message


def test_stops_decompressing_a_gzip_bomb(tmp_path: Path, models: Path):
    # A valid little tar followed, inside the same gzip stream, by 32 MiB of zeros: only the
    # decompression cap (not any declared size) can stop it.
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w") as bundle:
        info = tarfile.TarInfo("config.json")
        info.size = 2
        bundle.addfile(info, io.BytesIO(b"{}"))
    archive = tmp_path / "upload"
    archive.write_bytes(gzip.compress(tar_bytes.getvalue() + bytes(32 << 20)))

    assert_rejected(archive, models, "payload_too_large", max_members=2, max_total_bytes=1000)


def test_zip_header_understating_a_member_size_fails(tmp_path: Path, models: Path):
    real = os.urandom(4000)
    archive = build(tmp_path / "upload", "zip", {"m/config.json": b"{}", "m/weights.bin": real})
    # Declare 40 bytes (local header and central directory) for a member that inflates to 4000.
    data = bytearray(archive.read_bytes())
    local = data.index(b"m/weights.bin") - 30  # the name follows a 30-byte local header...
    central = data.index(b"m/weights.bin", local + 31) - 46  # ...and a 46-byte directory entry
    struct.pack_into("<I", data, local + 22, 40)
    struct.pack_into("<I", data, central + 24, 40)
    archive.write_bytes(bytes(data))

    assert_rejected(archive, models, "invalid_archive", max_total_bytes=100)


def test_zip_header_overstating_a_member_size_fails(tmp_path: Path, models: Path):
    archive = build(tmp_path / "upload", "zip", {"m/config.json": b"{}", "m/vocab.txt": b"abc"})
    # Declare 10 bytes for a 3-byte member whose CRC still matches: zipfile returns the 3 bytes
    # without complaint, so only counting them catches the lie.
    data = bytearray(archive.read_bytes())
    local = data.index(b"m/vocab.txt") - 30
    central = data.index(b"m/vocab.txt", local + 31) - 46
    struct.pack_into("<I", data, local + 22, 10)
    struct.pack_into("<I", data, central + 24, 10)
    archive.write_bytes(bytes(data))

    assert "fewer bytes" in assert_rejected(archive, models, "invalid_archive").message


@pytest.mark.parametrize(
    ("field", "value", "word"),
    [(8, 0x1, "encrypted"), (10, 99, "compression method")],  # general flags, method
)
def test_refuses_zip_members_it_cannot_read(
    tmp_path: Path, models: Path, field: int, value: int, word: str
):
    archive = build(tmp_path / "upload", "zip", {"m/config.json": b"{}"})
    data = bytearray(archive.read_bytes())
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<H", data, central + field, value)
    struct.pack_into("<H", data, field - 2, value)  # the same field in the local header
    archive.write_bytes(bytes(data))

    assert word in assert_rejected(archive, models, "invalid_archive").message


def test_copy_trusts_bytes_read_over_the_declared_size():
    # Defence in depth: whatever a reader returns is counted against the budget as it is written.
    sink = io.BytesIO()
    with pytest.raises(ArchiveError) as caught:
        _copy_exact(io.BytesIO(bytes(5000)), sink, name="lying", expected=5000, budget=1000)
    assert caught.value.code == "payload_too_large"
    assert len(sink.getvalue()) <= 1000

    with pytest.raises(ArchiveError) as caught:
        _copy_exact(io.BytesIO(bytes(50)), io.BytesIO(), name="lying", expected=40, budget=1000)
    assert caught.value.code == "invalid_archive"
    assert "more bytes" in caught.value.message


# --- broken archives ------------------------------------------------------------------------------


def test_refuses_a_truncated_tar_gz_wherever_it_is_cut(tmp_path: Path, models: Path):
    whole = build(tmp_path / "whole", "tar.gz", MODEL_FILES).read_bytes()
    archive = tmp_path / "upload"
    # Every 1/40 of the stream, plus cuts in its last bytes: the compressed end-of-archive blocks
    # and the gzip CRC trailer, which tarfile alone never reads.
    for cut in [*range(40, len(whole), len(whole) // 40), len(whole) - 30, len(whole) - 1]:
        archive.write_bytes(whole[:cut])
        assert_rejected(archive, models, "invalid_archive")
        with pytest.raises(ArchiveError, match="invalid_archive"):
            list_members(archive)  # found while checking, before any extraction


def test_refuses_a_plain_tar_cut_inside_its_last_member(tmp_path: Path, models: Path):
    whole = build(tmp_path / "whole", "tar", MODEL_FILES).read_bytes()
    last_data = whole.index(b"[PAD]")  # tokenizer/vocab.txt is the last member
    archive = tmp_path / "upload"
    archive.write_bytes(whole[: last_data + 5])

    assert_rejected(archive, models, "invalid_archive")
    with pytest.raises(ArchiveError, match="invalid_archive"):
        list_members(archive)  # found while checking, before any extraction


def test_refuses_a_truncated_zip_wherever_it_is_cut(tmp_path: Path, models: Path):
    whole = build(tmp_path / "whole", "zip", MODEL_FILES).read_bytes()
    last_data = whole.index(b"PK\x01\x02") - 10  # inside the last member's data
    archive = tmp_path / "upload"
    for cut in [*range(100, len(whole), len(whole) // 20), last_data, len(whole) - 1]:
        archive.write_bytes(whole[:cut])
        assert_rejected(archive, models, "invalid_archive")


def test_refuses_zip_members_that_overlap(tmp_path: Path, models: Path):
    archive = build(tmp_path / "upload", "zip", {"m/a.json": b"{}", "m/b.json": b"{}"})
    # Point b's central-directory entry at a's local header: the overlap trick of dense zip bombs.
    data = bytearray(archive.read_bytes())
    central_b = data.index(b"m/b.json", data.index(b"PK\x01\x02")) - 46
    struct.pack_into("<I", data, central_b + 42, 0)
    archive.write_bytes(bytes(data))

    assert "overlap" in assert_rejected(archive, models, "invalid_archive").message


def test_corrupt_member_data_leaves_nothing_behind(tmp_path: Path, models: Path):
    # The first member extracts fine; the second fails its CRC midway through extraction.
    files = {"m/config.json": b"{}", "m/model.safetensors": os.urandom(40_000)}
    archive = build(tmp_path / "upload", "zip", files)
    data = bytearray(archive.read_bytes())
    middle = data.index(b"m/model.safetensors") + 20_000
    data[middle : middle + 20] = bytes(20)
    archive.write_bytes(bytes(data))

    assert_rejected(archive, models, "invalid_archive")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b'{"model_type": "bert"}',
        os.urandom(2048),
        gzip.compress(b"not a tar " * 200),  # gzip magic, but no tar inside
        b"PK\x05\x06" + bytes(18),  # an empty zip
    ],
    ids=["empty-file", "json", "random", "gzip-of-text", "empty-zip"],
)
def test_refuses_what_is_not_an_archive(tmp_path: Path, models: Path, content: bytes):
    archive = tmp_path / "model.zip"  # the name promises a zip; only the bytes count
    archive.write_bytes(content)

    assert_rejected(archive, models, "invalid_archive")
