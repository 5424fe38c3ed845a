"""One attempt at a job: claimed once, fenced on its attempt number, ended exactly one way.

claim (conditional update queued -> running, attempt + 1)  ->  heartbeat thread renews the lease and
watches for cancel / max_runtime  ->  the work (`workers.runner.execute`)  ->  store artifacts under
this attempt's prefix  ->  in ONE transaction: artifact rows + running -> succeeded, fenced on the
attempt. A worker that lost its lease (the reaper handed the job to someone else) fails the fence,
deletes its files and leaves. Every other ending (cancel, timeout, a refusal, an engine error) goes
through `app.jobs.lifecycle.transition` too, and removes what the attempt stored.

A database blip shorter than the lease costs nothing (`workers.outage`): the heartbeat retries
every second or so, a progress event that cannot be written is dropped, a log event is retried
briefly then dropped, and the ending transition is retried until the database is back or this
attempt's lease (as last renewed) would have run out.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import func, insert, update
from sqlalchemy.orm import Session

from app.db.session import session_scope
from app.db.tables import Artifact, Job, utcnow
from app.ids import new_id
from app.jobs.lifecycle import add_event, lease_deadline, transition
from app.settings import get_settings
from app.storage import get_store
from workers import fairness
from workers.outage import is_transient, retry_until
from workers.presence import NODE_ENV
from workers.progress_plan import ProgressPlan

log = logging.getLogger("slimformer.runner")

# How long a log / metric event is retried through a database blip before it is dropped.
LOG_RETRY_S = 3.0
# How soon the heartbeat tries again after a failed beat (a blip must not eat the lease's slack).
BEAT_RETRY_S = 1.0


class Interrupted(Exception):
    """Raised at the next step once the heartbeat saw a cancel, a timeout or a lost lease."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class JobFailure(Exception):
    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


@dataclass
class JobContext:
    """What the running attempt knows; `check()` is the cooperative-cancellation point."""

    job_id: str
    attempt: int
    max_runtime_s: int
    project_id: str = ""
    # The phases the job goes through, which turn steps into one fraction and one ETA
    # (workers/progress_plan.py); set by the work before its first progress report.
    plan: ProgressPlan | None = None
    # The sha256 of the job's inputs (workers/result_cache.py), recorded when it succeeds.
    fingerprint: str | None = None
    interrupt: str | None = None
    started: float = field(default_factory=time.monotonic)
    clear_checkpoints: Callable[[], object] = lambda: None
    _last_progress: float = 0.0
    # When the lease was last renewed (monotonic; at the claim, then by each heartbeat): this
    # attempt owns the job at least until lease_renewed + lease_s.
    lease_renewed: float = field(default_factory=time.monotonic)
    lease_s: float = field(default_factory=lambda: get_settings().lease_s)

    def lease_left_until(self) -> float:
        """The monotonic time until which the job is surely still this attempt's (a second of
        slack for clocks and the reaper's own pace)."""
        return self.lease_renewed + self.lease_s - 1.0

    def retry_db(self, what: str, action: Callable[[], Any]) -> Any:
        """Run one transaction, retried through a database blip while the lease holds."""
        return retry_until(f"job {self.job_id}: {what}", action, deadline=self.lease_left_until)

    def check(self) -> None:
        if self.interrupt is not None:
            raise Interrupted(self.interrupt)

    def move(self, session: Session, *, to: str, from_: tuple[str, ...], **fields: Any) -> bool:
        """This attempt's transition of its job, fenced on the attempt: a worker that lost its
        lease moves nothing. Returns whether it moved."""
        return transition(
            session, job_id=self.job_id, to=to, from_=from_, attempt=self.attempt, **fields
        )

    def progress(
        self,
        stage_index: int,
        step: int,
        total_steps: int,
        message: str,
        *,
        force: bool = False,
        data: dict[str, Any] | None = None,
        detail: str | None = None,
    ) -> None:
        """Phase `stage_index` of `plan` has done `step` of `total_steps`. `detail` is how a person
        counts those steps ("window 7/20"), appended to the phase's label; `data`, the numbers
        behind the message, is kept in the event as `details`. Throttled unless `force`."""
        self.check()
        assert self.plan is not None, "set the job's plan before reporting progress"
        estimate = self.plan.update(stage_index, step, total_steps)
        now = time.monotonic()
        if not force and now - self._last_progress < get_settings().progress_min_interval_s:
            return
        self._last_progress = now
        phase = self.plan.phases[stage_index]
        progress = {
            "stage": phase.name,
            "stage_index": stage_index,
            "num_stages": len(self.plan.phases),
            "step": step,
            "total_steps": total_steps,
            "fraction": round(estimate.fraction, 4),
            "eta_s": estimate.eta_s,
            "message": message,
            "updated_at": utcnow().isoformat(),
            # Additions (API-additions.md): what a person reads, and the recipe's own numbering.
            "label": self.plan.label(stage_index, detail),
            "recipe_stage_index": phase.recipe_stage,
            "recipe_num_stages": self.plan.recipe_stages,
            "elapsed_s": round(now - self.started, 1),
        }
        try:
            with session_scope() as session:
                seq = add_event(
                    session,
                    job_id=self.job_id,
                    type="progress",
                    message=message,
                    data={**progress, "details": data} if data else progress,
                    values={"progress": progress},
                    attempt=self.attempt,
                )
        except Exception as exc:
            if not is_transient(exc):
                raise
            # The next progress update says more than this one: drop it, keep working.
            log.warning("job %s: progress not recorded (database unreachable)", self.job_id)
            return
        if seq is None:
            self.interrupt = "lease_lost"
            self.check()

    def log(
        self,
        message: str,
        data: dict[str, Any] | None = None,
        *,
        type: str = "log",
        level: str = "info",
    ) -> None:
        def write() -> None:
            with session_scope() as session:
                add_event(
                    session,
                    job_id=self.job_id,
                    type=type,
                    message=message,
                    data=data,
                    level=level,
                    attempt=self.attempt,
                )

        # A few seconds' retries, then dropped: the job's metrics hold the figures anyway.
        give_up = time.monotonic() + LOG_RETRY_S
        try:
            retry_until(f"job {self.job_id}: event", write, deadline=lambda: give_up)
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("job %s: event %r dropped (database unreachable)", self.job_id, message)


# What an attempt runs: (context, a private scratch folder) -> (metrics, files to store), each file
# {"path", "filename", "kind", "format", "sha256"}.
Work = Callable[[JobContext, Path], tuple[dict, list[dict]]]
# What may end an attempt before its work starts (a result-cache hit): True when it did.
Shortcut = Callable[[JobContext], bool]


class Heartbeat(threading.Thread):
    """Renews the lease every lease_s / 4 and turns cancel / max_runtime into an interrupt."""

    def __init__(self, context: JobContext) -> None:
        super().__init__(name=f"heartbeat-{context.job_id}", daemon=True)
        self.context = context
        self.stopped = threading.Event()

    def run(self) -> None:
        settings = get_settings()
        pause = settings.lease_s / 4
        while not self.stopped.wait(pause):
            try:
                self.beat(settings.lease_s)
                pause = settings.lease_s / 4
            except Exception as exc:  # noqa: BLE001 - one failed beat is fine; the lease has slack
                # A database blip: beat again soon, so the lease is renewed as soon as it is back.
                pause = min(BEAT_RETRY_S, settings.lease_s / 4)
                if is_transient(exc):
                    log.warning("heartbeat for %s: database unreachable", self.context.job_id)
                else:
                    log.warning("heartbeat for %s failed", self.context.job_id, exc_info=True)

    def beat(self, lease_s: float) -> None:
        context = self.context
        sent = time.monotonic()  # the new deadline is counted from no earlier than this
        with session_scope() as session:
            status = session.execute(
                update(Job)
                .where(
                    Job.id == context.job_id,
                    Job.attempt == context.attempt,
                    Job.status.in_(("running", "cancelling")),
                )
                .values(lease_until=lease_deadline(lease_s))
                .returning(Job.status)
                .execution_options(synchronize_session=False)
            ).scalar_one_or_none()
        if status is None:
            context.interrupt = "lease_lost"
            return
        context.lease_renewed = max(context.lease_renewed, sent)
        if status == "cancelling":
            context.interrupt = context.interrupt or "cancelled"
        elif time.monotonic() - context.started > context.max_runtime_s:
            context.interrupt = context.interrupt or "timeout"

    def stop(self) -> None:
        self.stopped.set()


def worker_name() -> str:
    """`<Celery node name>:<pid>` (the registry matches running jobs to workers by the node name);
    outside a Celery worker, the machine's hostname."""
    return f"{os.environ.get(NODE_ENV) or socket.gethostname()}:{os.getpid()}"


def claim(job_id: str) -> JobContext | None:
    """queued -> running for this worker, or None: someone else has the job, it is finished, or
    its project is at its cap of running jobs (`workers.fairness`: then it waits, deferred)."""
    settings = get_settings()
    limit = fairness.cap()
    now = utcnow()
    claimable = Job.attempt < Job.max_attempts
    deferred_in = None
    with session_scope() as session:
        if limit:
            fairness.hold_project(session, job_id)
            claimable = claimable & fairness.under_cap(limit)
        if transition(
            session,
            job_id=job_id,
            to="running",
            from_=("queued",),
            extra_where=claimable,
            values={
                "attempt": Job.attempt + 1,
                "lease_until": lease_deadline(settings.lease_s),
                "worker": worker_name(),
                "started_at": func.coalesce(Job.started_at, now),
                "error": None,
                "deferred_at": None,
            },
            message=f"status: running on {worker_name()}",
            data={"worker": worker_name()},
        ):
            job = session.get(Job, job_id)
            assert job is not None
            return JobContext(
                job_id=job_id,
                attempt=job.attempt,
                max_runtime_s=job.max_runtime_s,
                project_id=job.project_id,
            )
        if limit:
            deferred_in = fairness.defer(session, job_id=job_id, limit=limit)
    if deferred_in is not None:
        log.info("job %s waits: its project is at its cap of running jobs", job_id)
        fairness.release(deferred_in)  # a slot may have freed before the deferral committed
    return None


def run_attempt(job_id: str, work: Work, *, shortcut: Shortcut | None = None) -> None:
    """Claim the job, run `work` under a heartbeat (unless `shortcut` ends the attempt first),
    and record how the attempt ended."""
    context = claim(job_id)
    if context is None:
        log.info("job %s not claimed (taken, finished or waiting for a slot): leaving", job_id)
        return
    try:
        _run_claimed(context, work, shortcut)
    finally:
        fairness.release(context.project_id)  # this attempt's slot is free


def _run_claimed(context: JobContext, work: Work, shortcut: Shortcut | None) -> None:
    job_id = context.job_id
    heartbeat = Heartbeat(context)
    heartbeat.start()
    prefix = f"jobs/{job_id}/attempt-{context.attempt}"
    scratch = Path(tempfile.mkdtemp(prefix=f"{job_id}-", dir=_scratch_root()))
    try:
        if shortcut is not None and shortcut(context):
            return
        metrics, files = work(context, scratch)
        context.check()
        _succeed(context, prefix, metrics, files)
    except (Interrupted, SoftTimeLimitExceeded) as exc:
        reason = exc.reason if isinstance(exc, Interrupted) else "timeout"
        get_store().delete_prefix(prefix)
        if reason != "lease_lost":  # the attempt that owns the job now resumes from them
            context.clear_checkpoints()
        _interrupted(context, reason)
    except JobFailure as exc:
        get_store().delete_prefix(prefix)
        context.clear_checkpoints()
        _fail(context, exc.code, exc.message, retryable=exc.retryable)
    except Exception as exc:  # noqa: BLE001 - any other error fails the job with its message
        log.exception("job %s failed", job_id)
        get_store().delete_prefix(prefix)
        context.clear_checkpoints()
        _fail(context, "engine_error", f"{type(exc).__name__}: {exc}", retryable=False)
    finally:
        heartbeat.stop()
        shutil.rmtree(scratch, ignore_errors=True)
        _return_memory()


def _return_memory() -> None:
    """The worker process outlives the job: hand what the job freed back to the OS (glibc keeps
    freed heap for reuse otherwise), so the next job's preflight sees it free."""
    import gc

    from workers.compression import process_memory

    gc.collect()
    process_memory.trim()


def _scratch_root() -> Path:
    root = get_settings().cache_dir / "scratch"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _succeed(context: JobContext, prefix: str, metrics: dict, files: list[dict]) -> None:
    store = get_store()
    stored = []
    for item in files:
        obj = store.put_file(f"{prefix}/{item['filename']}", item["path"])
        if obj.sha256 != item["sha256"]:
            raise RuntimeError(f"{item['filename']}: stored bytes do not match what was written")
        stored.append((item, obj))
    tries = 0

    def record() -> bool:
        nonlocal tries
        tries += 1
        with session_scope() as session:
            job = session.get(Job, context.job_id)
            assert job is not None
            if tries > 1 and job.status == "succeeded" and job.attempt == context.attempt:
                return True  # an earlier try committed, and only its answer was lost
            return _record_success(session, context, job, stored, metrics)

    moved = context.retry_db("record success", record)
    if not moved:
        store.delete_prefix(prefix)
        _interrupted(context, "cancelled")


def _record_success(
    session: Session, context: JobContext, job: Job, stored: list, metrics: dict
) -> bool:
    """In the caller's transaction: the artifact rows and running -> succeeded, fenced."""
    for item, obj in stored:
        session.execute(
            insert(Artifact).values(
                id=new_id("art"),
                job_id=context.job_id,
                project_id=job.project_id,
                kind=item["kind"],
                format=item["format"],
                filename=item["filename"],
                size_bytes=obj.size_bytes,
                sha256=obj.sha256,
                storage_key=obj.key,
                created_at=utcnow(),
            )
        )
    progress = {
        **(job.progress or {}),
        "step": (job.progress or {}).get("total_steps"),
        "fraction": 1.0,
        "eta_s": 0,
        "message": "done",
        "label": "done",
        "elapsed_s": round(time.monotonic() - context.started, 1),
        "updated_at": utcnow().isoformat(),
    }
    # The last progress event says 1.0 too, so a client that follows only progress events (a
    # bar) ends full, not at the last step's fraction.
    add_event(
        session,
        job_id=context.job_id,
        type="progress",
        message="done",
        data=progress,
        attempt=context.attempt,
    )
    moved = context.move(
        session,
        to="succeeded",
        from_=("running",),
        values={"metrics": metrics, "progress": progress, "fingerprint": context.fingerprint},
        message="status: succeeded",
    )
    if not moved:
        # Cancelled meanwhile, or the lease went to another worker: this attempt leaves no trace.
        session.rollback()
    return moved


def _interrupted(context: JobContext, reason: str) -> None:
    if reason == "cancelled":

        def cancel() -> None:
            with session_scope() as session:
                context.move(
                    session,
                    to="cancelled",
                    from_=("cancelling",),
                    message="status: cancelled; nothing kept",
                )

        context.retry_db("record cancel", cancel)
    elif reason == "timeout":
        message = f"ran past max_runtime_s={context.max_runtime_s}"
        _fail(context, "timeout", message, retryable=False)
    # lease_lost: another attempt owns the job now; touch nothing.


def _fail(context: JobContext, code: str, message: str, *, retryable: bool) -> None:
    def fail() -> bool:
        with session_scope() as session:
            return context.move(
                session,
                to="failed",
                from_=("running",),
                level="error",
                values={"error": {"code": code, "message": message, "retryable": retryable}},
                message=f"status: failed ({code}): {message}",
            )

    moved = context.retry_db("record failure", fail)
    if not moved:  # a cancel arrived meanwhile: it wins
        _interrupted(context, "cancelled")
