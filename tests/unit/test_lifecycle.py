"""The job state machine on a real (SQLite) database built by the real migrations."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.artifacts.service import parse_range
from app.db.tables import Job, JobEvent
from app.errors import APIError
from app.ids import new_id
from app.jobs.lifecycle import ALLOWED, TERMINAL, IllegalTransition, add_event, transition
from tests.unit.conftest import add_job, add_model, migrated_session


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    with migrated_session(tmp_path / "lifecycle.db") as session:
        add_model(session, "mdl_1")
        session.flush()
        yield session


def new_job(session: Session, status: str = "queued") -> str:
    return add_job(session, model_id="mdl_1", status=status)


def test_terminal_states_never_change(session: Session) -> None:
    for terminal in TERMINAL:
        job_id = new_job(session, terminal)
        for target in ALLOWED:
            assert not transition(session, job_id=job_id, to=target)
        assert session.scalar(select(Job.status).where(Job.id == job_id)) == terminal


def test_legal_path_writes_one_event_per_move(session: Session) -> None:
    job_id = new_job(session)
    assert transition(session, job_id=job_id, to="running", values={"attempt": 1})
    assert not transition(session, job_id=job_id, to="running")  # a second claimer loses
    assert transition(session, job_id=job_id, to="succeeded", attempt=1)
    events = session.scalars(
        select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)
    ).all()
    assert [(e.seq, e.data["status"]) for e in events] == [(1, "running"), (2, "succeeded")]
    job = session.get(Job, job_id)
    assert job.finished_at is not None and job.lease_until is None


def test_fencing_on_attempt(session: Session) -> None:
    job_id = new_job(session)
    transition(session, job_id=job_id, to="running", values={"attempt": 2})
    assert not transition(session, job_id=job_id, to="succeeded", attempt=1)  # a stale worker
    assert add_event(session, job_id=job_id, type="log", message="x", attempt=1) is None
    assert add_event(session, job_id=job_id, type="log", message="x", attempt=2) == 2


def test_illegal_transitions_are_refused(session: Session) -> None:
    job_id = new_job(session)
    with pytest.raises(IllegalTransition):
        transition(session, job_id=job_id, to="succeeded", from_=("queued",))
    with pytest.raises(IllegalTransition):
        add_event(session, job_id=job_id, type="log", message="x", values={"status": "running"})
    assert not transition(
        session, job_id=job_id, to="cancelled"
    )  # queued -> cancelled skips a step


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-9", (0, 9)),
        ("bytes=5-", (5, 99)),
        ("bytes=-10", (90, 99)),
        ("bytes=90-500", (90, 99)),
    ],
)
def test_parse_range(header: str, expected: tuple[int, int]) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=9-3", "items=0-1", "bytes=-0", "bytes=-"])
def test_bad_ranges(header: str) -> None:
    with pytest.raises(APIError) as error:
        parse_range(header, 100)
    assert error.value.status == 416


def test_ids_sort_by_time() -> None:
    import time

    first = new_id("job")
    time.sleep(0.002)
    second = new_id("job")
    assert first < second and first.startswith("job_") and len(first) == len(second)
