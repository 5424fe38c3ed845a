"""Stripe-style idempotency keys: the same key and body give the first response; another body is 409."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.tables import IdempotencyKey, utcnow
from app.errors import APIError
from app.storage import get_store


def request_hash(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def replay(
    session: Session, *, project_id: str, endpoint: str, key: str | None, body_hash: str
) -> str | None:
    """The resource the key already made, if any. 409 when the key came with another body."""
    if key is None:
        return None
    if len(key) > 255:
        raise APIError(
            "invalid_request", "Idempotency-Key is at most 255 characters", param="Idempotency-Key"
        )
    row = session.scalar(
        select(IdempotencyKey).where(
            IdempotencyKey.project_id == project_id,
            IdempotencyKey.endpoint == endpoint,
            IdempotencyKey.key == key,
        )
    )
    if row is None:
        return None
    if row.request_hash != body_hash:
        raise APIError(
            "idempotency_mismatch", "This Idempotency-Key was used with a different request body"
        )
    return row.resource_id


@contextmanager
def replaying(resource_id: str) -> Iterator[None]:
    """Around the lookup of the resource a key made: if it has been deleted since, the replay is
    a 409 saying so (the first response cannot be given again, and a new resource under the old
    key would surprise whoever deleted the first)."""
    try:
        yield
    except APIError as exc:
        if exc.code != "not_found":
            raise
        raise APIError(
            "conflict",
            f"This Idempotency-Key made {resource_id}, which has since been deleted; "
            "send a new key to create another",
            param="Idempotency-Key",
        ) from None


def replay_upload(
    session: Session,
    *,
    project_id: str,
    endpoint: str,
    key: str | None,
    body_hash: str,
    upload_key: str | None,
) -> str | None:
    """`replay` for endpoints that stream the upload to storage before its hash is known: when
    the key already made a resource, the bytes just stored are a duplicate and are deleted."""
    existing = replay(
        session, project_id=project_id, endpoint=endpoint, key=key, body_hash=body_hash
    )
    if existing and upload_key:
        get_store().delete(upload_key)
    return existing


def remember(
    session: Session,
    *,
    project_id: str,
    endpoint: str,
    key: str | None,
    body_hash: str,
    resource_id: str,
) -> str:
    """Record the key in the request's transaction. If a concurrent request with the same key won
    the race, return that request's resource instead (the caller then discards its own)."""
    if key is None:
        return resource_id
    try:
        with session.begin_nested():
            session.add(
                IdempotencyKey(
                    project_id=project_id,
                    endpoint=endpoint,
                    key=key,
                    request_hash=body_hash,
                    resource_id=resource_id,
                )
            )
    except IntegrityError:
        existing = replay(
            session, project_id=project_id, endpoint=endpoint, key=key, body_hash=body_hash
        )
        if existing is None:
            raise
        return existing
    return resource_id


def purge_expired(session: Session, *, ttl_s: int) -> int:
    cutoff = utcnow() - timedelta(seconds=ttl_s)
    result = session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < cutoff))
    return result.rowcount or 0
