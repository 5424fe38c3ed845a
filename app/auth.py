"""Who is calling: the project behind the bearer key (or the default project when auth is off)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app import ratelimit
from app.db.session import get_db_session, release_connection
from app.errors import APIError
from app.projects.service import (
    DEFAULT_PROJECT,
    get_or_create_project,
    hash_key,
    project_for_key,
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


def _caller(request: Request, session: Session) -> Caller:
    if not get_settings().auth_enabled:
        project = get_or_create_project(session=session, name=DEFAULT_PROJECT)
        return Caller(project_id=project.id, rate_key=ANONYMOUS)
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise APIError("unauthorized", "Missing API key: send 'Authorization: Bearer <key>'")
    project = project_for_key(session=session, key=key.strip())
    if project is None:
        raise APIError("unauthorized", "Invalid API key")
    return Caller(project_id=project.id, rate_key=hash_key(key.strip()))


CallerDep = Annotated[Caller, Depends(get_caller)]


def authenticated(request: Request) -> bool:
    """Whether the request carries a valid key (always true with auth off), for routes outside
    `/v1` whose details are only for callers with a key (`/readyz`, `/metrics`)."""
    if not get_settings().auth_enabled:
        return True
    from app.db.session import session_scope

    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key:
        return False
    with session_scope() as session:
        return project_for_key(session=session, key=key.strip()) is not None
