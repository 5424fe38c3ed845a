from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import AsyncIterator
from typing import Annotated

from anyio import CapacityLimiter, to_thread
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from sqlalchemy.pool import QueuePool
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.auth import CallerDep, CallerOnlyDep, SessionDep, authenticate
from app.db.session import get_engine, release_connection, session_scope
from app.db.tables import Job
from app.errors import APIError, not_found
from app.jobs import repository, service
from app.jobs.feed import feed
from app.jobs.schemas import JobCreate, JobEventList, JobEventOut, JobList, JobOut
from app.responses import json_response, not_modified, resource_response
from app.settings import get_settings

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

MAX_SEQ = 2**31 - 1  # job_events.seq is a 32-bit integer column
SEND_TIMEOUT_S = 60.0  # a client that takes no bytes for this long is dropped


def job_of_project(job_id: str, caller: CallerDep, session: SessionDep) -> Job:
    """Ownership as a dependency: another project's job is a 404 before the route runs."""
    try:
        return service.get_job(session=session, project_id=caller.project_id, job_id=job_id)
    finally:
        release_connection(session)


JobDep = Annotated[Job, Depends(job_of_project)]


@router.post("", status_code=202, response_model=JobOut)
def create_job(
    spec: JobCreate,
    caller: CallerOnlyDep,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Response:
    # One session, committed before the answer is built: a 202 names a job the database has.
    # (A comment, not a docstring: the OpenAPI document stays as it was.)
    with session_scope() as session:
        job, created = service.create_job(
            session=session,
            project_id=caller.project_id,
            spec=spec,
            idempotency_key=idempotency_key,
        )
        # A job made just now has no artifacts yet: no query for them.
        body = service.to_out(session, job, artifacts=[] if created else None)
    return json_response(
        body,
        etag=service.job_etag(job),
        status_code=202,
        headers={"Location": f"/v1/jobs/{job.id}"},
    )


@router.get("", response_model=JobList)
def list_jobs(
    request: Request,
    caller: CallerDep,
    session: SessionDep,
    status: str | None = None,
    model_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> JobList:
    """Filters: `status` (comma-separated), `model_id`, and `metadata.<key>=<value>`."""
    metadata = {
        key.removeprefix("metadata."): value
        for key, value in request.query_params.items()
        if key.startswith("metadata.")
    }
    rows, has_more = service.list_jobs(
        session=session,
        project_id=caller.project_id,
        status=status,
        model_id=model_id,
        metadata=metadata,
        limit=limit,
        after=after,
    )
    return JobList(data=service.to_out_list(session, rows), has_more=has_more)


@router.get("/{job_id}", response_model=JobOut)
async def get_job(job_id: str, request: Request) -> Response:
    # The hot read (dashboards and SDKs poll it): authentication, the rate limit, the job and its
    # artifact ids in one trip to a worker thread on one connection, without a thread hop per
    # dependency; a matching If-None-Match answers 304 before the body is built. (A comment, not
    # a docstring: the OpenAPI document stays as it was.)
    return await to_thread.run_sync(_read_job, request, job_id, limiter=_reads_limiter())


_reads: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, CapacityLimiter] = (
    weakref.WeakKeyDictionary()
)  # one per event loop (an app can be driven by several, as in-process test clients do)


def _reads_limiter() -> CapacityLimiter:
    """At most as many hot reads in threads as the pool keeps connections: under load the rest
    wait here, on the event loop, instead of opening overflow connections that are closed again
    after one request (a new SQLite connection parses the schema; a PostgreSQL one forks a
    backend)."""
    loop = asyncio.get_running_loop()
    limiter = _reads.get(loop)
    if limiter is None:
        pool = get_engine().pool
        limiter = _reads[loop] = CapacityLimiter(pool.size() if isinstance(pool, QueuePool) else 5)
    return limiter


def _read_job(request: Request, job_id: str) -> Response:
    with get_engine().connect() as connection:
        caller = authenticate(request, connection)
        found = repository.read_owned(connection, project_id=caller.project_id, job_id=job_id)
    if found is None:
        raise not_found("job", job_id)
    job, artifact_ids = found
    etag = service.job_etag(job)
    if not_modified(request, etag):
        return Response(status_code=304, headers={"ETag": etag})
    return json_response(service.job_out(job, artifact_ids), etag=etag)


@router.get(
    "/{job_id}/events",
    response_model=JobEventList,
    responses={200: {"content": {"text/event-stream": {}}}},
)
def job_events(
    job: JobDep,
    request: Request,
    session: SessionDep,
    after: Annotated[int, Query(ge=0, le=MAX_SEQ)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Response:
    """The job's events as a JSON list, or as Server-Sent Events with `Accept: text/event-stream`
    (`id:` = seq; reconnect with `Last-Event-ID`; the stream ends after the terminal status)."""
    if "text/event-stream" in request.headers.get("accept", ""):
        start = after
        if last_event_id and last_event_id.strip().isdigit():
            start = int(last_event_id.strip())
            if start > MAX_SEQ:
                raise APIError(
                    "invalid_request",
                    f"Last-Event-ID must be at most {MAX_SEQ}",
                    param="Last-Event-ID",
                )
        return EventSourceResponse(
            _stream(job.id, start), ping=get_settings().sse_heartbeat_s, send_timeout=SEND_TIMEOUT_S
        )
    rows, has_more = service.list_events(session=session, job_id=job.id, after=after, limit=limit)
    body = JobEventList(data=[JobEventOut.model_validate(row) for row in rows], has_more=has_more)
    return Response(body.model_dump_json(), media_type="application/json")


async def _stream(job_id: str, after: int) -> AsyncIterator[ServerSentEvent]:
    """Held by no database connection while idle: it waits on its hub in the process's feed."""
    events_feed = feed()
    subscriber = events_feed.subscribe(job_id)
    try:
        while True:
            subscriber.wake.clear()
            read = events_feed.read(job_id, after)
            if read is None:  # the feed reaches back to `after` for every stream waiting
                await subscriber.wake.wait()
                continue
            for event in read.events:
                after = event.seq
                yield ServerSentEvent(
                    data=json.dumps(event.model_dump(mode="json")),
                    id=str(event.seq),
                    event=event.type,
                )
            if read.done:
                return
            if not read.events:
                await subscriber.wake.wait()
    finally:
        events_feed.unsubscribe(job_id, subscriber)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut)
def cancel_job(job: JobDep, request: Request, session: SessionDep) -> Response:
    job = service.cancel_job(session=session, job=job)
    return resource_response(
        request, service.to_out(session, job), etag=service.job_etag(job), status_code=202
    )


@router.post("/{job_id}/retry", status_code=202, response_model=JobOut)
def retry_job(job: JobDep, request: Request, caller: CallerDep, session: SessionDep) -> Response:
    new_job = service.retry_job(session=session, project_id=caller.project_id, job=job)
    return resource_response(
        request,
        service.to_out(session, new_job),
        etag=service.job_etag(new_job),
        status_code=202,
        headers={"Location": f"/v1/jobs/{new_job.id}"},
    )


@router.delete("/{job_id}", status_code=204)
def delete_job(job: JobDep, session: SessionDep) -> Response:
    service.delete_job(session=session, job=job)
    return Response(status_code=204)
