"""A broker that cannot be reached (a real refused Redis port) is logged as one line, not a
traceback per message: the reaper re-sends and lists messages every pass while Redis is down."""

from __future__ import annotations

import logging
import secrets

import pytest

from app import broker
from app.settings import get_settings
from tests.conftest import REDIS_URL, free_port


@pytest.fixture
def broker_at(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """Point the broker at a URL, with a fresh Celery client and outage log."""

    def point(url: str) -> None:
        monkeypatch.setenv("SLIMFORMER_BROKER_URL", url)
        monkeypatch.setenv("SLIMFORMER_QUEUE_PREFIX", f"outage-{secrets.token_hex(4)}-")
        get_settings.cache_clear()
        broker.redis_client.cache_clear()
        monkeypatch.setattr(broker, "_client", None)

    monkeypatch.setattr(broker, "outage", broker.Outage(logging.getLogger("app.broker")))
    yield point
    get_settings.cache_clear()
    broker.redis_client.cache_clear()


def test_an_unreachable_broker_is_one_line_while_it_lasts_and_one_when_it_is_back(
    broker_at, caplog: pytest.LogCaptureFixture
) -> None:
    broker_at(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="app.broker"):
        assert broker.send_run_job("job_outage1", broker.CPU_QUEUE) is False
        assert broker.waiting_ids([broker.CPU_QUEUE]) is None
        assert broker.send_run_job("job_outage2", broker.CPU_QUEUE) is False
    lines = [record for record in caplog.records if record.name == "app.broker"]
    assert len(lines) == 1, [r.getMessage() for r in lines]  # the rest fold into the next line
    first = lines[0]
    assert first.exc_info is None and "\n" not in first.getMessage()
    assert "job_outage1" in first.getMessage() and "broker unreachable" in first.getMessage()

    caplog.clear()
    broker_at(REDIS_URL)  # the broker is back
    with caplog.at_level(logging.WARNING, logger="app.broker"):
        assert broker.waiting_ids([broker.CPU_QUEUE]) == {broker.CPU_QUEUE: set()}
        assert broker.waiting_ids([broker.CPU_QUEUE]) == {broker.CPU_QUEUE: set()}
    back = [r.getMessage() for r in caplog.records if r.name == "app.broker"]
    assert len(back) == 1 and back[0].startswith("broker reachable again after 3 failed calls")


def test_a_broker_error_that_is_not_an_outage_keeps_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outage = broker.Outage(logging.getLogger("app.broker"))
    with caplog.at_level(logging.WARNING, logger="app.broker"):
        outage.failed("could not send", ValueError("a bug"))
    assert caplog.records[-1].exc_info is not None
