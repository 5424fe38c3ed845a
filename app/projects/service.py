"""Projects (tenants) and their API keys. Keys are shown once; only their sha256 is stored."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import bindparam, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from app.db.tables import ApiKey, Project
from app.ids import new_id

DEFAULT_PROJECT = "default"  # the single user of the embedded mode when auth is off
KEY_PREFIX = "sk_"


def hash_key(key: str) -> str:
    # Keys carry 256 bits of randomness, so a plain sha256 is enough: there is nothing to brute-force.
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_project(*, session: Session, name: str) -> Project:
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None:
        project = Project(id=new_id("prj"), name=name)
        session.add(project)
        session.flush()
    return project


def create_api_key(*, session: Session, project_name: str) -> str:
    project = get_or_create_project(session=session, name=project_name)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiKey(id=new_id("key"), project_id=project.id, key_hash=hash_key(key), prefix=key[:10])
    )
    session.flush()
    return key


def project_for_key(*, session: Session, key: str) -> Project | None:
    return session.scalar(
        select(Project)
        .join(ApiKey, ApiKey.project_id == Project.id)
        .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    )


# The same two lookups as statements built once, for the hot read that runs on a plain connection
# (`app/auth.py` `authenticate`): building a select per request costs more than running it.
_PROJECT_OF_KEY = select(ApiKey.project_id).where(
    ApiKey.key_hash == bindparam("key_hash"), ApiKey.revoked_at.is_(None)
)
_PROJECT_NAMED = select(Project.id).where(Project.name == bindparam("name"))


def project_id_for_key(connection: Connection, key: str) -> str | None:
    return connection.execute(_PROJECT_OF_KEY, {"key_hash": hash_key(key)}).scalar()


def project_id_named(connection: Connection, name: str) -> str | None:
    return connection.execute(_PROJECT_NAMED, {"name": name}).scalar()
