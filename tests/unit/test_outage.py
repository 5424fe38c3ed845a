"""Which errors mean "the database cannot be reached now", and the backoff a task waits."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import free_port
from workers.outage import TASK_BACKOFF_MAX_S, is_transient, retry_until, task_backoff_s


def refused_error() -> Exception:
    """A real connection refused by a port nothing listens on."""
    engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/postgres")
    try:
        with engine.connect():
            pass
    except Exception as exc:  # noqa: BLE001
        return exc
    finally:
        engine.dispose()
    raise AssertionError("nothing listens there, yet it connected")


def test_a_refused_connection_is_transient_and_a_wrong_query_is_not(tmp_path: Path) -> None:
    assert is_transient(refused_error())
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with pytest.raises(Exception) as wrong, engine.connect() as connection:  # noqa: PT011
        connection.execute(text("SELECT * FROM no_table"))
    assert not is_transient(wrong.value)
    assert not is_transient(ValueError("no"))


def test_task_backoff_doubles_to_its_cap_with_jitter() -> None:
    for retries, base in ((0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (10, TASK_BACKOFF_MAX_S)):
        waits = [task_backoff_s(retries) for _ in range(50)]
        assert all(base <= w <= base * 1.5 for w in waits), (retries, waits)
        assert len(set(waits)) > 1  # jittered: workers coming back do not stampede


def test_retry_until_retries_a_transient_error_then_gives_up_at_the_deadline() -> None:
    error = refused_error()
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise error
        return "ok"

    far = time.monotonic() + 30
    assert retry_until("flaky", flaky, deadline=lambda: far) == "ok" and len(calls) == 3

    def down() -> None:
        raise error

    started = time.monotonic()
    with pytest.raises(type(error)):
        retry_until("down", down, deadline=lambda: started + 0.5)
    assert 0.4 <= time.monotonic() - started < 2

    def wrong() -> None:
        raise ValueError("a bug, not an outage")

    with pytest.raises(ValueError):
        retry_until("wrong", wrong, deadline=lambda: far)  # raised at once


def test_a_loop_logs_an_outage_as_one_line_per_pass_and_one_when_it_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The reaper's pass log: no traceback for a database that cannot be reached, one line a
    pass, a line when a pass works again; a real bug keeps its traceback."""
    import logging

    from workers.outage import PassLog

    logger = logging.getLogger("slimformer.test_pass_log")
    passes = PassLog("reaper", logger)
    refused = refused_error()
    with caplog.at_level(logging.INFO, logger=logger.name):
        for _ in range(3):
            passes.failure(refused, 15)
        passes.success()
        passes.success()  # nothing more to say
        passes.failure(ValueError("a bug"), 15)
    records = caplog.records
    assert [r.exc_info is None for r in records] == [True, True, True, True, False], records
    assert all(len(r.getMessage().splitlines()) == 1 for r in records[:4])
    assert "pass 3: database unreachable (OperationalError" in records[2].getMessage()
    assert "reachable again after 3 failed passes" in records[3].getMessage()
