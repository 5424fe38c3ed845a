"""Health, readiness and Prometheus metrics."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select, text

from app import broker
from app.auth import authenticated
from app.db.session import session_scope
from app.db.tables import Job
from app.errors import APIError
from app.storage import get_store
from app.workers import repository as workers

router = APIRouter(tags=["operations"])

REGISTRY = CollectorRegistry()
HTTP_LATENCY = Histogram(
    "slimformer_http_request_duration_seconds",
    "HTTP request latency",
    ["method", "route", "status"],
    registry=REGISTRY,
)
DURATION_BUCKETS = (10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)


class JobCollector(Collector):
    """Reads job counts and durations from the database at scrape time: the database is the truth,
    and any number of API replicas then report the same numbers."""

    def collect(self) -> Iterator[GaugeMetricFamily | HistogramMetricFamily]:
        with session_scope() as session:
            by_status = dict(
                session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
            )
            finished = session.execute(
                select(Job.status, Job.started_at, Job.finished_at).where(
                    Job.finished_at.is_not(None), Job.started_at.is_not(None)
                )
            ).all()
        jobs = GaugeMetricFamily("slimformer_jobs", "Jobs by status", labels=["status"])
        for status in ("queued", "running", "cancelling", "succeeded", "failed", "cancelled"):
            jobs.add_metric([status], by_status.get(status, 0))
        yield jobs
        yield GaugeMetricFamily(
            "slimformer_queue_depth", "Jobs waiting for a worker", value=by_status.get("queued", 0)
        )
        durations = HistogramMetricFamily(
            "slimformer_job_duration_seconds", "Wall time of finished jobs", labels=["status"]
        )
        for status in ("succeeded", "failed", "cancelled"):
            seconds = [(end - start).total_seconds() for s, start, end in finished if s == status]
            cumulative = [
                (str(bound), sum(1 for v in seconds if v <= bound)) for bound in DURATION_BUCKETS
            ] + [("+Inf", len(seconds))]
            durations.add_metric([status], cumulative, sum_value=sum(seconds))
        yield durations
        with session_scope() as session:
            by_device = workers.live_device_counts(session)
        live = GaugeMetricFamily(
            "slimformer_live_workers", "Workers with a recent heartbeat", labels=["device"]
        )
        for device in ("cpu", "gpu"):
            live.add_metric([device], by_device.get(device, 0))
        yield live


JOBS = JobCollector()
REGISTRY.register(JOBS)


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> Response:
    """Ready or not for anyone; the checks' details and live workers only with a key when auth is
    on (an error's text can name the database's host and port)."""
    checks: dict[str, str] = {}
    for name, probe in (
        ("database", _database),
        ("broker", broker.ping),
        ("storage", lambda: get_store().ping()),
    ):
        started = time.monotonic()
        try:
            probe()
            checks[name] = f"ok ({(time.monotonic() - started) * 1000:.0f} ms)"
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            checks[name] = f"error: {type(exc).__name__}: {exc}"
    ready = all(value.startswith("ok") for value in checks.values())
    if not (checks["database"].startswith("ok") and authenticated(request)):
        return JSONResponse(
            {
                "status": "ready" if ready else "unavailable",
                "checks": {name: value.split(" ")[0].rstrip(":") for name, value in checks.items()},
                "live_workers": None,
            },
            status_code=200 if ready else 503,
        )
    # Which queues a live worker consumes. Reported, not required: without a worker the API still
    # takes jobs, and they wait `queued` saying why.
    live_workers = None
    if checks["database"].startswith("ok"):
        with session_scope() as session:
            counts = workers.live_queue_counts(session)
        live_workers = {
            queue: counts.get(queue, 0) for queue in (*broker.JOB_QUEUES, broker.VALIDATE_QUEUE)
        }
    return JSONResponse(
        {
            "status": "ready" if ready else "unavailable",
            "checks": checks,
            "live_workers": live_workers,
        },
        status_code=200 if ready else 503,
    )


def _database() -> None:
    with session_scope() as session:
        session.execute(text("SELECT 1"))


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {}}}, 401: {}},
)
def metrics(request: Request) -> Response:
    """Prometheus text; with auth on it needs a key (the figures span every project)."""
    if not authenticated(request):
        raise APIError(
            "unauthorized", "Missing or invalid API key: send 'Authorization: Bearer <key>'"
        )
    return Response(generate_latest(_exposed()), media_type=CONTENT_TYPE_LATEST)


def _exposed() -> CollectorRegistry:
    """This process's registry; with several API processes (`slimformer api --workers N`), one
    that adds up every process's request histograms from their files, and the job figures."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    registry.register(JOBS)
    return registry
