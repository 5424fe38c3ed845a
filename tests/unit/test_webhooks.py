"""Webhook signing against the Standard Webhooks reference library, the SSRF guard, and the outbox
rows the state machine writes in its own transaction."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session
from standardwebhooks import Webhook, WebhookVerificationError

from app.db.tables import WebhookEndpoint, WebhookMessage, utcnow
from app.jobs.lifecycle import add_event, transition
from app.settings import get_settings
from app.webhooks.signing import headers, new_secret
from app.webhooks.ssrf import UnsafeDestination, check_url
from tests.unit.conftest import add_job, add_model, migrated_session


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    with migrated_session(tmp_path / "db.sqlite") as session:
        add_model(session, "mdl_1")
        yield session


def add_endpoint(session: Session, events: list[str], job_id: str | None = None) -> str:
    endpoint_id = f"whk_{len(session.scalars(select(WebhookEndpoint.id)).all())}"
    now = utcnow()
    session.add(
        WebhookEndpoint(
            id=endpoint_id,
            project_id="prj_1",
            job_id=job_id,
            url="https://hooks.example/x",
            events=events,
            secret=new_secret(),
            status="enabled",
            created_at=now,
            updated_at=now,
        )
    )
    session.flush()
    return endpoint_id


def messages(session: Session) -> list[tuple[str, str]]:
    rows = session.scalars(select(WebhookMessage).order_by(WebhookMessage.id))
    return [(row.endpoint_id, row.event) for row in rows]


def test_signatures_verify_with_the_reference_library() -> None:
    secret = new_secret()
    body = json.dumps({"type": "job.succeeded", "data": {"id": "job_1"}}).encode()
    signed = headers(
        secret=secret, message_id="msg_1", timestamp=int(utcnow().timestamp()), body=body
    )
    assert Webhook(secret).verify(body, signed)["data"] == {"id": "job_1"}
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace(b"job_1", b"job_2"), signed)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, signed)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/x",
        "http:///nohost",
        "http://user:pw@8.8.8.8/x",
        "http://127.0.0.1/x",
        "http://[::1]/x",
        "http://[::ffff:127.0.0.1]/x",
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.1/x",
        "http://172.16.5.4/x",
        "http://100.64.0.1/x",  # carrier-grade NAT: not global
        "http://0.0.0.0/x",
        "http://localhost/x",
    ],
)
def test_unsafe_destinations_are_refused(url: str) -> None:
    with pytest.raises(UnsafeDestination):
        check_url(url)


def test_public_addresses_pass_and_the_allow_list_opens_private_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    check_url("https://8.8.8.8/hook")
    monkeypatch.setenv("SLIMFORMER_WEBHOOK_ALLOWED_HOSTS", '["10.0.0.0/8", "localhost"]')
    get_settings.cache_clear()
    try:
        check_url("http://10.9.9.9:8080/hook")
        check_url("http://localhost:9000/hook")
        with pytest.raises(UnsafeDestination):
            check_url("http://192.168.1.1/hook")
    finally:
        get_settings.cache_clear()


def test_transitions_write_outbox_rows_for_subscribed_endpoints_only(session: Session) -> None:
    job_id = add_job(session, model_id="mdl_1")
    other_job = add_job(session, model_id="mdl_1")
    done = add_endpoint(session, ["job.succeeded"])
    started = add_endpoint(session, ["job.started"])
    own = add_endpoint(session, ["job.started", "job.succeeded"], job_id=other_job)
    assert transition(session, job_id=job_id, to="running", values={"attempt": 1})
    assert transition(session, job_id=job_id, to="succeeded", attempt=1)
    assert messages(session) == [(started, "job.started"), (done, "job.succeeded")]
    payload = session.scalars(
        select(WebhookMessage.payload).where(WebhookMessage.event == "job.succeeded")
    ).one()
    assert payload["data"] == {
        "id": job_id,
        "object": "job",
        "status": "succeeded",
        "model_id": "mdl_1",
        "attempt": 1,
        "link": f"/v1/jobs/{job_id}",
    }
    assert not transition(session, job_id=job_id, to="failed")  # refused: nothing announced
    assert len(messages(session)) == 2
    assert transition(session, job_id=other_job, to="cancelling")
    assert transition(session, job_id=other_job, to="cancelled")
    assert [event for endpoint, event in messages(session) if endpoint == own] == []


def test_outbox_rows_roll_back_with_the_transition(session: Session) -> None:
    job_id = add_job(session, model_id="mdl_1")
    add_endpoint(session, ["job.started"])
    session.commit()
    assert transition(session, job_id=job_id, to="running", values={"attempt": 1})
    assert len(messages(session)) == 1
    session.rollback()
    assert messages(session) == []


def test_progress_is_throttled_per_endpoint(session: Session) -> None:
    job_id = add_job(session, model_id="mdl_1")
    add_endpoint(session, ["job.progress"])
    assert transition(session, job_id=job_id, to="running", values={"attempt": 1})
    for step in range(5):
        progress = {"stage": "dynamic_int8", "fraction": step / 5}
        add_event(
            session,
            job_id=job_id,
            type="progress",
            message="working",
            values={"progress": progress},
            attempt=1,
        )
    assert [event for _, event in messages(session)] == ["job.progress"]
