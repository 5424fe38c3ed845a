"""Routing rules (app/jobs/routing.py): which queue a job's message goes to and what it says
while it waits; and how a stage's `runs_on` narrows the device a job asks for."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, update
from sqlalchemy.orm import Session

from app.db.migrate import upgrade
from app.db.tables import Worker, utcnow
from app.jobs.routing import DeviceConflict, choose, device_class, resolve_device
from app.settings import Settings, get_settings
from app.workers import repository
from workers.compression.recipe import STAGE_CONFIGS
from workers.presence import default_queues

STAGE_CONFIGS_BY_METHOD = {
    config.model_fields["method"].default: config for config in STAGE_CONFIGS
}
NOTHING: dict[str, int] = {}
CPU_ONLY = {"cpu": 2, "validate": 2}
BOTH = {"cpu": 1, "gpu": 2, "validate": 3}


@pytest.mark.parametrize(
    ("device", "live", "queue", "message"),
    [
        ("cpu", CPU_ONLY, "cpu", "waiting for a cpu worker"),
        ("cpu", NOTHING, "cpu", "waiting for a cpu worker: none is live"),
        ("gpu", CPU_ONLY, "gpu", "waiting for a gpu worker: none is live"),
        ("gpu", BOTH, "gpu", "waiting for a gpu worker"),
        ("any", CPU_ONLY, "cpu", "waiting for a cpu worker"),
        ("any", BOTH, "gpu", "waiting for a gpu worker"),
        ("any", {"gpu": 1}, "gpu", "waiting for a gpu worker"),
        ("any", NOTHING, "cpu", "waiting for a worker: none is live"),
    ],
)
def test_choose(device: str, live: dict[str, int], queue: str, message: str) -> None:
    route = choose(device, live)
    assert (route.queue, route.message) == (queue, message)
    assert route.live_workers == live.get(queue, 0)


def test_a_validate_only_worker_does_not_count_for_jobs() -> None:
    assert choose("cpu", {"validate": 4}).message == "waiting for a cpu worker: none is live"


def test_choose_refuses_an_unknown_class() -> None:
    with pytest.raises(ValueError):
        choose("tpu", BOTH)


@pytest.mark.parametrize(
    ("torch_device", "cls"),
    [("cpu", "cpu"), ("cuda", "gpu"), ("cuda:1", "gpu"), (" CUDA ", "gpu"), ("mps", "cpu")],
)
def test_device_class(torch_device: str, cls: str) -> None:
    assert device_class(torch_device) == cls


def test_a_stage_that_runs_on_the_cpu_narrows_any_and_refuses_gpu() -> None:
    runs_on = STAGE_CONFIGS_BY_METHOD["dynamic_int8"].runs_on
    assert runs_on == "cpu"
    assert resolve_device("any", runs_on, method="dynamic_int8") == "cpu"
    assert resolve_device("cpu", runs_on, method="dynamic_int8") == "cpu"
    with pytest.raises(DeviceConflict, match="dynamic_int8 runs on the cpu only"):
        resolve_device("gpu", runs_on, method="dynamic_int8")


@pytest.mark.parametrize("requested", ["cpu", "gpu", "any"])
def test_a_recipe_with_no_device_needs_keeps_what_was_asked(requested: str) -> None:
    assert resolve_device(requested, None) == requested


def test_no_method_needs_a_gpu_today() -> None:
    # FP8 runs with a float fallback on the CPU; a method whose kernels exist only on CUDA would
    # set runs_on = "cuda" and be routed to gpu workers by resolve_device.
    assert {config.runs_on for config in STAGE_CONFIGS} <= {None, "cpu"}


def test_a_worker_takes_its_device_queue_and_validate() -> None:
    assert default_queues("cpu") == ["cpu", "validate"]
    assert default_queues("gpu") == ["gpu", "validate"]


def test_liveness_is_a_number_of_missed_beats() -> None:
    settings = Settings(worker_heartbeat_s=2, worker_lost_after_beats=3)
    assert settings.worker_lost_after_s == 6
    with pytest.raises(ValueError):
        Settings(worker_lost_after_beats=1)
    with pytest.raises(ValueError):
        Settings(worker_heartbeat_s=0)


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    url = f"sqlite:///{tmp_path / 'workers.db'}"
    upgrade(url)
    engine = create_engine(url)
    with Session(engine) as session:
        yield session
    engine.dispose()


def register(session: Session, hostname: str, device: str) -> None:
    repository.register(
        session,
        hostname=hostname,
        device=device,
        device_name=None,
        memory_bytes=1 << 30,
        queues=default_queues(device),
    )


def age(session: Session, hostname: str, seconds: float) -> None:
    session.execute(
        update(Worker)
        .where(Worker.hostname == hostname)
        .values(last_heartbeat_at=utcnow() - timedelta(seconds=seconds))
    )


def test_live_counts_leave_out_workers_that_missed_their_beats(session: Session) -> None:
    register(session, "cpu@a", "cpu")
    register(session, "gpu0@a", "gpu")
    register(session, "gpu1@a", "gpu")
    window = get_settings().worker_lost_after_s
    age(session, "gpu0@a", window + 1)
    age(session, "gpu1@a", window - 5)  # late, but within its beats
    assert repository.live_queue_counts(session) == {"cpu": 1, "gpu": 1, "validate": 2}
    assert repository.live_device_counts(session) == {"cpu": 1, "gpu": 1}
    age(session, "gpu1@a", window + 1)
    assert choose("any", repository.live_queue_counts(session)).queue == "cpu"
    assert repository.beat(session, hostname="gpu1@a")  # it came back
    assert choose("any", repository.live_queue_counts(session)).queue == "gpu"


def test_a_restarted_worker_takes_over_its_row_and_a_pruned_one_registers_again(
    session: Session,
) -> None:
    register(session, "cpu@a", "cpu")
    first = session.query(Worker).one().id
    register(session, "cpu@a", "cpu")
    assert session.query(Worker).one().id == first
    age(session, "cpu@a", 10_000)
    assert repository.prune(session, before=utcnow() - timedelta(seconds=5_000)) == 1
    assert repository.beat(session, hostname="cpu@a") is False
