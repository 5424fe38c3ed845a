"""Engines and sessions. The request's session dependency owns the transaction (commit or roll back);
services never commit. Work that must follow the commit (sending a Celery message) is registered with
`after_commit` and dropped on rollback."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker

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


def _begin_before_savepoint(connection: Connection, _name: str) -> None:
    """pysqlite opens a transaction before INSERT/UPDATE/DELETE only, so a SAVEPOINT after mere
    SELECTs is outside any: SQLite then makes it the transaction, and its RELEASE commits (an
    Idempotency-Key row outlived the job creation that failed after it). Open one first."""
    dbapi = connection.connection.dbapi_connection
    if dbapi is not None and not dbapi.in_transaction:
        connection.exec_driver_sql("BEGIN")


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
                event.listen(engine, "savepoint", _begin_before_savepoint)
            else:
                engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)
            _engines[url] = engine
        return engine


# A transaction that wrote a job event tells every API process's event feed (app/jobs/feed.py) on
# PostgreSQL with NOTIFY, delivered at commit. The embedded default's feed polls instead.
JOB_EVENTS_CHANNEL = "slimformer_job_events"


@event.listens_for(Session, "do_orm_execute")
def _note_job_event(state: ORMExecuteState) -> None:
    table = getattr(state.statement, "table", None)
    if state.is_insert and getattr(table, "name", None) == "job_events":
        state.session.info["job_events_written"] = True


@event.listens_for(Session, "before_commit")
def _notify_job_events(session: Session) -> None:
    if not session.info.pop("job_events_written", False):
        return
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": JOB_EVENTS_CHANNEL})


# SQLite has one write lock per database. A connection that finds it taken waits in SQLite's busy
# handler, which naps 1, 2, 5 … 100 ms between tries, so under concurrent submissions a writer can
# keep missing the lock for seconds while others take it in between. The writers of one process
# that ask for it (`one_writer`) queue on this lock instead and take SQLite's one after another.
_sqlite_writer = threading.Lock()
_HOLDS_WRITER = "holds_sqlite_writer"


def one_writer(session: Session) -> None:
    """Before a transaction's first write (SQLite): wait for this process's other writers of the
    same kind to commit, holding the turn until this transaction ends. Nothing happens on
    PostgreSQL (row locks), nor in a transaction that has written already (it may hold SQLite's
    lock: waiting here for a writer that waits for it would stall both)."""
    if session.info.get(_HOLDS_WRITER) or session.get_bind().dialect.name != "sqlite":
        return
    dbapi = session.connection().connection.dbapi_connection
    if dbapi is None or dbapi.in_transaction:
        return
    _sqlite_writer.acquire()
    session.info[_HOLDS_WRITER] = True


@event.listens_for(Session, "after_transaction_end")
def _end_of_turn(session: Session, transaction: Any) -> None:
    if transaction.parent is None and session.info.pop(_HOLDS_WRITER, False):
        _sqlite_writer.release()


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


def release_connection(session: Session) -> None:
    """Commit what a request's dependency read or wrote, which hands its connection back to the pool
    before the request's next step runs in another threadpool thread. A request holding a connection
    while it waits for a thread, as threads wait for connections, would deadlock the pool."""
    if session.in_transaction():
        session.commit()


def get_db_session() -> Iterator[Session]:
    """FastAPI dependency (used with scope="function": the commit happens before the response)."""
    with session_scope() as session:
        yield session
