"""Turning a compressed model into the job's artifacts: written once, load-tested, packed.

The export is written as a draft (weights, config, tokenizer), loaded back the documented way and
compared with the model in memory; the caller measures that same loaded artifact (what users will
run) and only then is the model card and `slimformer.json` written, once, with the final metrics,
and the folder packed into a deterministic archive beside the report. Both are named after the
model and the job (`all-MiniLM-L6-v2-job_….tar.gz`), so that downloads of several jobs never
overwrite each other; inside the archive the folder is `model/`, whatever the job.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from workers.compression.model_inspection import sha256_file

MIB = 1 << 20


def write_export(
    loaded: Any,
    model: Any,
    scratch: Path,
    *,
    recipe: dict,
    inputs: dict,
    progress: Callable[[int, int, str], None] | None = None,
) -> Any:
    """The compressed model as an unpublished export draft under `scratch`; `progress(done,
    total, detail)` as `export.write_draft` reports it."""
    from workers.compression.export import write_draft

    # Pruned layers are stored dense: transformers 5.24 / compressed-tensors 0.20.1 cannot read the
    # sparse bitmask layouts and would load such a folder with random weights, warning only.
    return write_draft(
        loaded,
        model,
        scratch / "model",
        recipe=recipe,
        inputs=inputs,
        sparse_storage="dense",
        progress=progress,
    )


def package(
    draft: Any,
    scratch: Path,
    *,
    recipe: dict,
    metrics: dict,
    inputs: dict,
    name: str,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[dict]:
    """Publish the draft with its final card, then the files to store: the packed folder
    (`<name>.tar.gz`) and the report (`<name>.report.json`); `name` is `artifact_name`'s.
    `progress(done, total, detail)` follows the packing (`pack`)."""
    draft.publish(metrics=metrics)
    return [
        pack(draft.folder, scratch / f"{name}.tar.gz", progress=progress),
        write_report(metrics, recipe, inputs, scratch / f"{name}.report.json"),
    ]


def artifact_name(model_name: str, job_id: str) -> str:
    """`<model name>-<job id>` in the characters every file system and HTTP header takes: runs
    of anything else become one `-`, and a long model name is cut."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", model_name).strip("-.")[:80].rstrip("-.")
    return f"{safe}-{job_id}" if safe else job_id


def pack(
    folder: Path, target: Path, *, progress: Callable[[int, int, str], None] | None = None
) -> dict:
    """A deterministic .tar.gz: sorted names, zeroed times and owners (same bytes for same input).
    `progress(MiB done, MiB in all, detail)` follows it every MiB. gzip's fastest level: quantized
    and float weights barely compress (level 9 saved about 1% more of a MiniLM checkpoint at twice
    the CPU time or more), and packing was the slowest part of a small job."""
    paths = sorted(folder.rglob("*"))
    total_mib = max(1, -(-sum(path.stat().st_size for path in paths if path.is_file()) // MIB))
    read = 0

    class Counted:
        """The file as `tarfile` reads it (`read(size)` only), reporting every MiB read."""

        def __init__(self, handle: BinaryIO) -> None:
            self.handle = handle

        def read(self, size: int = -1) -> bytes:
            nonlocal read
            chunk = self.handle.read(size)
            before, read = read, read + len(chunk)
            if progress is not None and read // MIB > before // MIB:
                done = min(read // MIB, total_mib)
                progress(done, total_mib, f"{done}/{total_mib} MiB")
            return chunk

    with (
        open(target, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=1) as zipped,
        tarfile.open(fileobj=zipped, mode="w") as tar,
    ):
        for path in paths:
            info = tar.gettarinfo(str(path), arcname=f"model/{path.relative_to(folder)}")
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            info.mode = 0o755 if path.is_dir() else 0o644
            if path.is_file():
                with path.open("rb") as handle:
                    tar.addfile(info, Counted(handle))
            else:
                tar.addfile(info)
    if progress is not None:
        progress(total_mib, total_mib, f"{total_mib}/{total_mib} MiB")
    return {
        "path": target,
        "filename": target.name,
        "kind": "model",
        "format": "hf-safetensors+tar.gz",
        "sha256": sha256_file(target),
    }


def write_report(metrics: dict, recipe: dict, inputs: dict, target: Path) -> dict:
    body = json.dumps(
        {"recipe": recipe, "metrics": metrics, "inputs": inputs},
        indent=2,
        sort_keys=True,
        default=str,
    ).encode()
    target.write_bytes(body)
    return {
        "path": target,
        "filename": target.name,
        "kind": "report",
        "format": "json",
        "sha256": hashlib.sha256(body).hexdigest(),
    }
