"""Riding out a database (or object store) outage: which errors are transient, and the backoff.

A message whose task cannot reach the database is not acked as done: the task re-sends itself
with exponential backoff and jitter (`task_backoff_s`, capped so the queue moves again within
seconds of the database coming back). A running attempt retries its own database writes
(`retry_until`) with a short backoff for as long as its lease would still be its own, and its
first reads (the job, its model and datasets, the result cache's lookups) the same way
(`ride_out`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

log = logging.getLogger("slimformer.outage")

T = TypeVar("T")

# A task retried this many times keeps the last backoff: a long outage costs no more messages.
TASK_BACKOFF_BASE_S = 0.5
TASK_BACKOFF_MAX_S = 4.0
# Within an attempt: a short backoff, so a write lands within a second of the database returning.
WRITE_BACKOFF_BASE_S = 0.1
WRITE_BACKOFF_MAX_S = 1.0

# SQLite raises OperationalError for a broken schema or query too: those are not outages.
_PERMANENT_SQLITE = ("no such table", "no such column", "syntax error", "has no column")


def _storage_errors() -> tuple[type[BaseException], ...]:
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
    except ImportError:  # pragma: no cover - boto3 is an optional extra
        return ()
    return (BotoConnectionError, HTTPClientError)


_STORAGE_ERRORS = _storage_errors()


def is_transient(exc: BaseException) -> bool:
    """True for an error that says the database or the object store cannot be reached now (a
    refused or dropped connection, a restart, a lock timeout), as opposed to a wrong query."""
    if isinstance(exc, OperationalError | InterfaceError):
        text = str(exc.orig or exc).lower()
        return not any(marker in text for marker in _PERMANENT_SQLITE)
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return bool(_STORAGE_ERRORS) and isinstance(exc, _STORAGE_ERRORS)


def task_backoff_s(retries: int) -> float:
    """The countdown before a task's `retries`-th re-delivery: 0.5, 1, 2, 4, 4 … s, each with up
    to 50 % jitter added, so that workers coming back together do not stampede the database."""
    base = min(TASK_BACKOFF_MAX_S, TASK_BACKOFF_BASE_S * 2 ** min(retries, 16))
    return base * (1 + random.random() / 2)


def retry_until(
    what: str,
    action: Callable[[], T],
    *,
    deadline: Callable[[], float],
    stopped: Callable[[], bool] = lambda: False,
) -> T:
    """Run `action`; while it fails with a transient error and `time.monotonic()` is before
    `deadline()` (read again after each try: a lease may be renewed meanwhile), sleep a short,
    growing backoff and run it again. Re-raises the last error once the deadline has passed (or
    `stopped()` is true). `action` must be safe to repeat: one transaction that rolls back."""
    tries = 0
    while True:
        try:
            return action()
        except Exception as exc:
            if not is_transient(exc) or stopped() or time.monotonic() >= deadline():
                raise
            pause = min(WRITE_BACKOFF_MAX_S, WRITE_BACKOFF_BASE_S * 2 ** min(tries, 8))
            pause *= 1 + random.random() / 2
            if tries == 0:
                log.warning("%s: database unreachable (%s); retrying", what, type(exc).__name__)
            tries += 1
            time.sleep(max(0.0, min(pause, deadline() - time.monotonic())))


def ride_out(what: str, action: Callable[[], T]) -> T:
    """`retry_until` for a running attempt's reads made where its lease is not at hand
    (`workers.job_inputs`, `workers.result_cache`): the heartbeat renews the lease every
    lease_s / 4, so at least three quarters of it are left when a read starts; the read is
    retried until then, less the second of slack the attempt's own writes keep."""
    from app.settings import get_settings

    give_up = time.monotonic() + 0.75 * get_settings().lease_s - 1.0
    return retry_until(what, action, deadline=lambda: give_up)


class PassLog:
    """How a periodic loop (the reaper) reports an outage: a pass that fails on a transient error
    logs one line without a traceback, the first pass that works again says so once; any other
    error keeps its traceback."""

    def __init__(self, what: str, logger: logging.Logger) -> None:
        self.what = what
        self.log = logger
        self.failed = 0  # passes failed in a row on a transient error
        self.since = 0.0

    def failure(self, exc: BaseException, retry_in_s: float) -> None:
        if not is_transient(exc):
            self.log.error(
                "%s pass failed; trying again in %.0f s", self.what, retry_in_s, exc_info=exc
            )
            return
        if not self.failed:
            self.since = time.monotonic()
        self.failed += 1
        self.log.warning(
            "%s pass %d: database unreachable (%s: %s); trying again in %.0f s",
            self.what,
            self.failed,
            type(exc).__name__,
            _first_line(exc),
            retry_in_s,
        )

    def success(self) -> None:
        if self.failed:
            self.log.warning(
                "%s: database reachable again after %d failed passes (%.0f s)",
                self.what,
                self.failed,
                time.monotonic() - self.since,
            )
            self.failed = 0


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0][:200] if text else ""
