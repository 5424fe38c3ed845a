"""Who is calling: the project behind the bearer key (or the default project when auth is off)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from app import ratelimit
from app.db.session import get_db_session, get_engine, release_connection, session_scope
from app.errors import APIError
from app.projects.service import (
    DEFAULT_PROJECT,
    get_or_create_project,
    hash_key,
    project_for_key,
    project_id_for_key,
    project_id_named,
)
from app.settings import get_settings


@dataclass(frozen=True)
class Caller:
    project_id: str
    rate_key: str  # whose rate-limit bucket this request spends: the key's hash, or the one user


ANONYMOUS = "anonymous"  # auth off: one user, one bucket


def get_session(session: Annotated[Session, Depends(get_db_session, scope="function")]) -> Session:
    return session


SessionDep = Annotated[Session, Depends(get_session)]


def get_caller(request: Request, session: SessionDep) -> Caller:
    try:
        caller = _caller(request, session)
    finally:
        release_connection(session)
    ratelimit.check(caller.rate_key)  # after authentication: only real keys get a bucket
    return caller


def caller_only(request: Request) -> Caller:
    """`get_caller` on a connection of its own, for a route that opens its own session
    (`POST /v1/jobs`): one trip to a worker thread, prepared statements, no session."""
    with get_engine().connect() as connection:
        return authenticate(request, connection)


CallerOnlyDep = Annotated[Caller, Depends(caller_only)]


def authenticate(request: Request, connection: Connection) -> Caller:
    """`get_caller` for a route that does its whole read in one worker thread on one connection
    (`GET /v1/jobs/{id}`), with prepared Core statements: the caller, its rate limit spent."""
    if not get_settings().auth_enabled:
        project_id = project_id_named(connection, DEFAULT_PROJECT)
        if project_id is None:  # the first request of a fresh install: made on the usual path
            with session_scope() as session:
                project_id = _caller(request, session).project_id
        caller = Caller(project_id=project_id, rate_key=ANONYMOUS)
    else:
        key = _bearer_key(request)
        project_id = project_id_for_key(connection, key)
        if project_id is None:
            raise APIError("unauthorized", "Invalid API key")
        caller = Caller(project_id=project_id, rate_key=hash_key(key))
    ratelimit.check(caller.rate_key)
    return caller


def _bearer_key(request: Request) -> str:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError("unauthorized", "Missing API key: send 'Authorization: Bearer <key>'")
    return key.strip()


def _caller(request: Request, session: Session) -> Caller:
    if not get_settings().auth_enabled:
        project = get_or_create_project(session=session, name=DEFAULT_PROJECT)
        return Caller(project_id=project.id, rate_key=ANONYMOUS)
    key = _bearer_key(request)
    project = project_for_key(session=session, key=key)
    if project is None:
        raise APIError("unauthorized", "Invalid API key")
    return Caller(project_id=project.id, rate_key=hash_key(key))


CallerDep = Annotated[Caller, Depends(get_caller)]


def authenticated(request: Request) -> bool:
    """Whether the request carries a valid key (always true with auth off), for routes outside
    `/v1` whose details are only for callers with a key (`/readyz`, `/metrics`)."""
    if not get_settings().auth_enabled:
        return True
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key:
        return False
    with session_scope() as session:
        return project_for_key(session=session, key=key.strip()) is not None
