"""Engines and sessions. The request's session dependency owns the transaction (commit or roll back);
services never commit. Work that must follow the commit (sending a Celery message) is registered with
`after_commit` and dropped on rollback."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.settings import get_settings

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the API read while a worker writes; busy_timeout waits instead of failing on a lock.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def get_engine(url: str | None = None) -> Engine:
    url = url or get_settings().resolved_database_url
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            if url.startswith("sqlite"):
                engine = create_engine(
                    url, connect_args={"check_same_thread": False, "timeout": 30}
                )
                event.listen(engine, "connect", _configure_sqlite)
            else:
                engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)
            _engines[url] = engine
        return engine


def dispose_engines() -> None:
    """After a fork the child must not reuse the parent's connections."""
    with _lock:
        for engine in _engines.values():
            engine.dispose(close=False)


def session_factory() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


def after_commit(session: Session, callback: Callable[[], None]) -> None:
    session.info.setdefault("after_commit", []).append(callback)


def _run_after_commit(session: Session) -> None:
    callbacks = session.info.pop("after_commit", [])
    for callback in callbacks:
        callback()


@contextmanager
def session_scope() -> Iterator[Session]:
    """One transaction: commit on success, roll back on error, then run the after-commit work."""
    session = session_factory()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        session.info.pop("after_commit", None)
        raise
    finally:
        session.close()
    _run_after_commit(session)


def get_db_session() -> Iterator[Session]:
    """FastAPI dependency (used with scope="function": the commit happens before the response)."""
    with session_scope() as session:
        yield session
