"""SQLite writers of one API process take turns on a Python lock (`app.db.session.one_writer`)
instead of SQLite's busy naps: the turn ends with the transaction however it ends, and a
transaction that has written already never waits for it."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, update
from sqlalchemy.orm import Session

from app.db import session as db_session
from app.db.session import one_writer
from app.db.tables import Project
from tests.unit.conftest import migrated_session


@pytest.fixture
def engine(tmp_path: Path):  # noqa: ANN201
    path = tmp_path / "db.sqlite"
    with migrated_session(path) as session:
        session.commit()
    engine = create_engine(f"sqlite:///{path}")
    yield engine
    engine.dispose()


def test_the_turn_ends_with_the_transaction_committed_rolled_back_or_closed(engine) -> None:  # noqa: ANN001
    lock = db_session._sqlite_writer
    for end in ("commit", "rollback", "close"):
        session = Session(engine)
        one_writer(session)
        assert lock.locked()
        one_writer(session)  # the same transaction asks again: it holds the turn already
        session.execute(update(Project).values(name="q"))
        with session.begin_nested():  # a savepoint's end is not the transaction's
            session.execute(update(Project).values(name="r"))
        assert lock.locked()
        getattr(session, end)()
        assert not lock.locked(), end
        session.close()


def test_a_transaction_that_has_written_already_does_not_wait(engine) -> None:  # noqa: ANN001
    lock = db_session._sqlite_writer
    with Session(engine) as session:
        session.execute(update(Project).values(name="q"))  # may hold SQLite's lock now
        assert lock.acquire(blocking=False)  # another thread's turn
        try:
            one_writer(session)  # returns at once instead of waiting for it
        finally:
            lock.release()
        session.commit()
    assert not lock.locked()
