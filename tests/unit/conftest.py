"""A real (SQLite) database built by the real migrations, for the tests of the job state machine
and of the queries on jobs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from app.db.migrate import upgrade
from app.db.tables import Job, Model, Project
from app.ids import new_id


@contextmanager
def migrated_session(path: Path) -> Iterator[Session]:
    """A session on a new database file at `path`, migrated to head, holding project `prj_1`."""
    url = f"sqlite:///{path}"
    upgrade(url)
    engine = create_engine(url)
    with Session(engine) as session:
        session.add(Project(id="prj_1", name="p"))
        session.flush()
        yield session
    engine.dispose()


def add_model(session: Session, model_id: str) -> None:
    session.add(
        Model(
            id=model_id,
            project_id="prj_1",
            name=model_id,
            status="ready",
            source={"type": "upload"},
        )
    )


def add_job(
    session: Session,
    *,
    model_id: str,
    status: str = "queued",
    stages: list[dict] | None = None,
    calibration: dict | None = None,
    evaluation: dict | None = None,
) -> str:
    job_id = new_id("job")
    session.add(
        Job(
            id=job_id,
            project_id="prj_1",
            model_id=model_id,
            status=status,
            recipe={"stages": stages or [{"method": "dynamic_int8"}]},
            calibration=calibration,
            evaluation=evaluation,
            export={},
            job_metadata={},
            max_runtime_s=60,
            max_attempts=3,
        )
    )
    session.flush()
    return job_id
