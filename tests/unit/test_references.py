"""`live_jobs_referencing`: the one answer to "which live jobs read this model or dataset", on a
real (SQLite) database built by the real migrations. The PostgreSQL path runs in the service tests
(tests/service/test_delete_in_use.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from app.db.tables import Dataset
from app.jobs.lifecycle import LIVE, TERMINAL
from app.jobs.repository import live_jobs_referencing
from tests.unit import conftest
from tests.unit.conftest import add_model, migrated_session


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    with migrated_session(tmp_path / "references.db") as session:
        for model_id in ("mdl_teacher", "mdl_student", "mdl_other"):
            add_model(session, model_id)
        for dataset_id in ("dset_cal", "dset_eval", "dset_train", "dset_other"):
            session.add(
                Dataset(
                    id=dataset_id,
                    project_id="prj_1",
                    name=dataset_id,
                    status="ready",
                    format="txt",
                    source={"type": "upload"},
                )
            )
        session.flush()
        yield session


def distill(**fields: object) -> dict:
    return {"method": "distill", **fields}


def add_job(session: Session, **fields: object) -> str:
    """A job compressing the teacher."""
    return conftest.add_job(session, model_id="mdl_teacher", **fields)


def test_every_place_a_job_names_an_id_counts(session: Session) -> None:
    by_model = add_job(session)
    by_calibration = add_job(
        session, stages=[{"method": "gptq"}], calibration={"dataset_id": "dset_cal"}
    )
    by_evaluation = add_job(session, evaluation={"dataset_id": "dset_eval"})
    by_stage = add_job(
        session,
        stages=[
            distill(student={"model_id": "mdl_student"}, dataset_id="dset_train"),
            {"method": "dynamic_int8"},
        ],
        evaluation={"dataset_id": None},
    )

    def live(**ids: str) -> list[str]:
        return live_jobs_referencing(session=session, **ids)

    assert live(model_id="mdl_teacher") == sorted(
        [by_model, by_calibration, by_evaluation, by_stage]
    )
    assert live(model_id="mdl_student") == [by_stage]
    assert live(dataset_id="dset_cal") == [by_calibration]
    assert live(dataset_id="dset_eval") == [by_evaluation]
    assert live(dataset_id="dset_train") == [by_stage]
    assert live(model_id="mdl_other") == live(dataset_id="dset_other") == []
    assert live() == []


def test_only_live_jobs_count(session: Session) -> None:
    stages = [distill(student={"model_id": "mdl_student"}, dataset_id="dset_train")]
    live_ids = sorted(add_job(session, status=status, stages=stages) for status in LIVE)
    for status in TERMINAL:
        add_job(session, status=status, stages=stages)
    assert live_jobs_referencing(session=session, model_id="mdl_student") == live_ids
    assert live_jobs_referencing(session=session, dataset_id="dset_train") == live_ids


def test_an_id_that_only_looks_alike_does_not_count(session: Session) -> None:
    # `_` is a LIKE wildcard and `dset_train` is a prefix of `dset_trains`: neither may match.
    add_job(session, stages=[distill(student={"num_layers": 2}, dataset_id="dsetXtrains")])
    add_job(session, stages=[distill(student={"num_layers": 2}, dataset_id="dset_trains")])
    assert live_jobs_referencing(session=session, dataset_id="dset_train") == []
