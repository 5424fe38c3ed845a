from __future__ import annotations

import re

from sqlalchemy.orm import Session

from app.artifacts import repository
from app.artifacts.schemas import ArtifactOut
from app.db.tables import Artifact
from app.errors import APIError, not_found


def get_artifact(*, session: Session, project_id: str, artifact_id: str) -> Artifact:
    artifact = repository.get_owned(session=session, project_id=project_id, artifact_id=artifact_id)
    if artifact is None:
        raise not_found("artifact", artifact_id)
    return artifact


def list_for_job(*, session: Session, job_id: str) -> list[Artifact]:
    return repository.for_job(session=session, job_id=job_id)


def to_out(artifact: Artifact) -> ArtifactOut:
    return ArtifactOut.model_validate(artifact)


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str, size: int) -> tuple[int, int]:
    """One byte range (RFC 9110 §14.1.2) -> inclusive (start, end). 416 when unsatisfiable."""
    unsatisfiable = {"Content-Range": f"bytes */{size}"}
    match = _RANGE.match(header.strip())
    if not match or (not match.group(1) and not match.group(2)):
        raise APIError(
            "range_not_satisfiable",
            f"Unsupported Range {header!r}; use bytes=a-b",
            headers=unsatisfiable,
        )
    first, last = match.groups()
    if first:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
    else:  # suffix range: the last N bytes
        length = int(last)
        if length == 0:
            raise APIError("range_not_satisfiable", "Empty suffix range", headers=unsatisfiable)
        start, end = max(size - length, 0), size - 1
    if start >= size or start > end:
        raise APIError(
            "range_not_satisfiable",
            f"Range {header!r} is outside 0-{size - 1}",
            headers=unsatisfiable,
        )
    return start, end
