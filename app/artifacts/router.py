from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import RedirectResponse, StreamingResponse

from app.artifacts import service
from app.artifacts.schemas import ArtifactList
from app.auth import CallerDep, SessionDep
from app.jobs.router import JobDep
from app.settings import get_settings
from app.storage import CHUNK, Store, get_store

router = APIRouter(tags=["artifacts"])


@router.get("/v1/jobs/{job_id}/artifacts", response_model=ArtifactList)
def list_artifacts(job: JobDep, session: SessionDep) -> ArtifactList:
    rows = service.list_for_job(session=session, job_id=job.id)
    return ArtifactList(data=[service.to_out(row) for row in rows], has_more=False)


@router.get(
    "/v1/artifacts/{artifact_id}/content",
    responses={
        200: {"content": {"application/octet-stream": {}}},
        206: {},
        307: {"description": "Redirect to a short-lived presigned URL of the same bytes"},
        416: {},
    },
)
def artifact_content(
    artifact_id: str,
    caller: CallerDep,
    session: SessionDep,
    redirect: Annotated[bool | None, Query()] = None,
    range: Annotated[str | None, Header()] = None,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """The file, streamed; `ETag` is its sha256; `Range: bytes=a-b` answers 206 (bad range 416).
    `?redirect=true` (or `SLIMFORMER_DOWNLOAD_REDIRECT=true` without `?redirect=false`) answers 307
    to a presigned URL instead, where the store has them (S3); otherwise it streams."""
    artifact = service.get_artifact(
        session=session, project_id=caller.project_id, artifact_id=artifact_id
    )
    store = get_store()
    size = artifact.size_bytes
    etag = f'"{artifact.sha256}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'attachment; filename="{artifact.filename}"',
    }
    if if_none_match and etag in [tag.strip() for tag in if_none_match.split(",")]:
        return Response(status_code=304, headers=headers)
    settings = get_settings()
    if redirect if redirect is not None else settings.download_redirect:
        url = store.presigned_url(
            artifact.storage_key,
            expires_s=settings.download_url_ttl_s,
            filename=artifact.filename,
        )
        if url is not None:
            # 307 keeps the method and the client's Range header; the URL is a bearer
            # credential for a few minutes, so nothing may cache it.
            return RedirectResponse(
                url,
                status_code=307,
                headers={"ETag": etag, "Cache-Control": "no-store"},
            )
    if range:
        start, end = service.parse_range(range, size)
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        headers["Content-Length"] = str(end - start + 1)
        return StreamingResponse(
            _read(store, artifact.storage_key, start, end),
            status_code=206,
            media_type="application/octet-stream",
            headers=headers,
        )
    headers["Content-Length"] = str(size)
    return StreamingResponse(
        _read(store, artifact.storage_key, 0, size - 1),
        media_type="application/octet-stream",
        headers=headers,
    )


def _read(store: Store, key: str, start: int, end: int) -> Iterator[bytes]:
    with store.open(key) as handle:
        handle.seek(start)
        remaining = end - start + 1
        while remaining > 0:
            chunk = handle.read(min(CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            yield chunk
