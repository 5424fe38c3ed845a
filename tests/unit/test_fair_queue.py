"""Priorities and the per-project cap, below the service: the embedded broker's priority order on
a real filesystem queue, and the claim's cap on a real (SQLite) database built by the migrations."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection, Exchange, Queue
from sqlalchemy import select
from sqlalchemy.orm import Session

import app.broker_fs  # noqa: F401 - registers slimfs://
from app.broker import message_priority
from app.db.tables import Job, JobEvent, Project
from app.jobs.lifecycle import transition
from tests.unit.conftest import add_job, add_model, migrated_session
from workers import fairness


def test_job_priority_maps_to_kombus_lowest_first_order() -> None:
    assert [message_priority(p) for p in (9, 5, 0)] == [0, 4, 9]
    assert message_priority(42) == 0 and message_priority(-3) == 9  # rows from before 0-9


def test_filesystem_broker_serves_higher_priority_first_then_fifo(tmp_path: Path) -> None:
    folders = {name: tmp_path / name for name in ("queue", "processed", "control")}
    for folder in folders.values():
        folder.mkdir()
    options = {
        "data_folder_in": str(folders["queue"]),
        "data_folder_out": str(folders["queue"]),
        "processed_folder": str(folders["processed"]),
        "control_folder": str(folders["control"]),
    }
    queue = Queue("cpu", Exchange("cpu"), routing_key="cpu")
    sent = [("low-1", 0), ("low-2", 0), ("mid", 5), ("low-3", 0), ("high", 9)]
    with Connection("slimfs://", transport_options=options) as connection:
        producer = connection.Producer()
        for body, priority in sent:
            producer.publish(
                body,
                exchange=queue.exchange,
                routing_key="cpu",
                declare=[queue],
                priority=message_priority(priority),
            )
        simple = connection.SimpleQueue(queue)
        received = []
        for _ in sent:
            message = simple.get(timeout=2)
            received.append(message.payload)
            message.ack()
        simple.close()
    assert received == ["high", "mid", "low-1", "low-2", "low-3"]


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    with migrated_session(tmp_path / "fair.db") as session:
        session.add(Project(id="prj_2", name="q"))
        add_model(session, "mdl_1")
        session.flush()
        yield session


def claim(session: Session, job_id: str, limit: int) -> bool:
    """The claim's conditional update, as `workers.attempt.claim` writes it."""
    return transition(
        session,
        job_id=job_id,
        to="running",
        from_=("queued",),
        extra_where=(Job.attempt < Job.max_attempts) & fairness.under_cap(limit),
        values={"attempt": Job.attempt + 1, "deferred_at": None},
    )


def test_a_job_over_its_projects_cap_waits_deferred_and_others_run(session: Session) -> None:
    first, second, third = (add_job(session, model_id="mdl_1") for _ in range(3))
    other = add_job(session, model_id="mdl_1")
    session.get(Job, other).project_id = "prj_2"
    session.flush()

    assert claim(session, first, limit=2)
    assert claim(session, second, limit=2)
    assert not claim(session, third, limit=2)  # prj_1 runs two
    assert fairness.defer(session, job_id=third, limit=2) == "prj_1"
    assert claim(session, other, limit=2)  # another project is not held back

    job = session.get(Job, third)
    assert job.status == "queued" and job.deferred_at is not None and job.error is None
    assert "at most 2 may run at once" in job.progress["message"]
    events = session.scalars(select(JobEvent).where(JobEvent.job_id == third)).all()
    assert [(e.type, e.data["running"]) for e in events] == [("progress", 2)]
    # Deferred again by a re-sent message: the same message, no second event.
    assert fairness.defer(session, job_id=third, limit=2) == "prj_1"
    assert len(session.scalars(select(JobEvent).where(JobEvent.job_id == third)).all()) == 1

    assert transition(session, job_id=first, to="succeeded", attempt=1)
    assert claim(session, third, limit=2)  # a slot is free
    assert session.get(Job, third).deferred_at is None
    # A job that is not queued any more is not deferred (someone else claimed it).
    assert fairness.defer(session, job_id=second, limit=2) is None
