"""Job event streams without a database connection per stream.

One `EventFeed` per API process keeps a `_Hub` per watched job: the events since the hub began and
the job's status. One notifier thread keeps every hub current with one query for all watched jobs:
woken by PostgreSQL `NOTIFY` (sent by `app/db/session.py` when a transaction wrote a job event), and
otherwise polling every `sse_poll_s` (the embedded SQLite default) or every `LISTEN_FALLBACK_S` (a
safety net under `LISTEN`). A stream reads its hub in memory and waits on its own `asyncio.Event`;
only a stream whose cursor is older than its hub (a `Last-Event-ID` resume, a first read) queries the
database, once, in the threadpool. Waking a stream never waits on it, so a slow client blocks nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select as select_module
import threading
import time
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.engine import make_url

from app.db.session import JOB_EVENTS_CHANNEL, session_scope
from app.db.tables import Job
from app.jobs import repository
from app.jobs.lifecycle import TERMINAL
from app.jobs.schemas import JobEventOut
from app.settings import get_settings

log = logging.getLogger(__name__)

PAGE = 500
LISTEN_FALLBACK_S = 5.0
POKE_CHECK_S = 0.1  # how soon a new stream's hub is filled while waiting on LISTEN


@dataclass
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    wake: asyncio.Event


@dataclass
class _Hub:
    subscribers: list[_Subscriber] = field(default_factory=list)
    base: int | None = None  # the hub holds every event with seq > base
    last_seq: int = 0
    events: list[JobEventOut] = field(default_factory=list)
    status: str | None = None
    gone: bool = False  # the job no longer exists


@dataclass(frozen=True)
class Read:
    events: list[JobEventOut]
    done: bool  # everything up to the terminal status has been read (or the job is gone)


class EventFeed:
    def __init__(self) -> None:
        self._hubs: dict[str, _Hub] = {}
        self._lock = threading.Lock()
        self._poke = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the stream side (event loop) ----

    def subscribe(self, job_id: str) -> _Subscriber:
        subscriber = _Subscriber(asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._hubs.setdefault(job_id, _Hub()).subscribers.append(subscriber)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="sse-notifier", daemon=True)
                self._thread.start()
        self._poke.set()
        return subscriber

    def unsubscribe(self, job_id: str, subscriber: _Subscriber) -> None:
        with self._lock:
            hub = self._hubs.get(job_id)
            if hub is None:
                return
            if subscriber in hub.subscribers:
                hub.subscribers.remove(subscriber)
            if not hub.subscribers:
                del self._hubs[job_id]

    def read(self, job_id: str, cursor: int) -> Read | None:
        """Events after `cursor` from memory, or None when the hub does not reach back that far."""
        with self._lock:
            hub = self._hubs.get(job_id)
            if hub is None or hub.base is None or cursor < hub.base:
                return None
            if hub.gone:
                return Read([], True)
            events = [event for event in hub.events if event.seq > cursor]
            last = events[-1].seq if events else cursor
            return Read(events, hub.status in TERMINAL and last >= hub.last_seq)

    def watching(self) -> int:
        with self._lock:
            return sum(len(hub.subscribers) for hub in self._hubs.values())

    # ---- the notifier thread ----

    def _run(self) -> None:
        settings = get_settings()
        listener = None
        while True:
            if listener is None and not settings.is_embedded_database:
                listener = _listen(settings.resolved_database_url)
            timeout = settings.sse_poll_s if listener is None else LISTEN_FALLBACK_S
            with self._lock:
                idle = not self._hubs
            if idle:
                # Nothing watched: sleep until a stream subscribes (no query at all).
                self._poke.wait()
            elif listener is not None:
                try:
                    _wait_for_notify(listener, timeout, self._poke)
                except Exception:  # noqa: BLE001 - the listener died: poll until it is back
                    log.warning("event notifier lost its LISTEN connection", exc_info=True)
                    _close(listener)
                    listener = None
            else:
                self._poke.wait(timeout)
            self._poke.clear()
            try:
                self._refresh()
            except Exception:  # noqa: BLE001 - the database is away: streams wait, then resume
                log.warning("event notifier could not read the database", exc_info=True)
                self._poke.wait(settings.sse_poll_s)

    def _refresh(self) -> None:
        with self._lock:
            wanted = {
                job_id: hub.last_seq if hub.base is not None else None
                for job_id, hub in self._hubs.items()
            }
        if not wanted:
            return
        found: dict[str, tuple[int, str, list[JobEventOut]]] = {}
        with session_scope() as session:
            rows = session.execute(
                select(Job.id, Job.event_seq, Job.status).where(Job.id.in_(list(wanted)))
            ).all()
            for job_id, event_seq, status in rows:
                since = wanted[job_id]
                events: list[JobEventOut] = []
                if since is not None and event_seq > since:
                    # Status first, then events: a terminal status is read with its event.
                    while True:
                        page, has_more = repository.events_after(
                            session=session, job_id=job_id, after=since, limit=PAGE
                        )
                        events += [JobEventOut.model_validate(row) for row in page]
                        if not has_more:
                            break
                        since = page[-1].seq
                found[job_id] = (event_seq, status, events)
        woken: list[_Subscriber] = []
        with self._lock:
            for job_id in wanted:
                hub = self._hubs.get(job_id)
                if hub is None:
                    continue
                if job_id not in found:
                    changed = not hub.gone
                    hub.gone, hub.base = True, hub.base if hub.base is not None else 0
                else:
                    event_seq, status, events = found[job_id]
                    changed = hub.base is None or bool(events) or status != hub.status
                    if hub.base is None:
                        hub.base = hub.last_seq = event_seq
                    hub.events += events
                    if events:
                        hub.last_seq = events[-1].seq
                    hub.status = status
                if changed:
                    woken += hub.subscribers
        for subscriber in woken:
            subscriber.loop.call_soon_threadsafe(subscriber.wake.set)


def _listen(url: str):  # noqa: ANN202 - a psycopg connection, or None
    try:
        import psycopg

        conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        connection = psycopg.connect(conninfo, autocommit=True)
        connection.execute(f"LISTEN {JOB_EVENTS_CHANNEL}")
        return connection
    except Exception:  # noqa: BLE001 - no LISTEN: the notifier polls instead
        log.warning("event notifier cannot LISTEN; polling instead", exc_info=True)
        return None


def _wait_for_notify(connection, timeout: float, poke: threading.Event) -> None:  # noqa: ANN001
    """Return on a notification (all pending ones drained), a poke or the timeout."""
    deadline = time.monotonic() + timeout
    while not poke.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            connection.execute("SELECT 1")  # notices a dead connection
            return
        ready, _, _ = select_module.select([connection.fileno()], [], [], min(left, POKE_CHECK_S))
        if ready:
            for _ in connection.notifies(timeout=0):
                pass
            return


def _close(connection) -> None:  # noqa: ANN001
    with contextlib.suppress(Exception):
        connection.close()


_feed = EventFeed()


def feed() -> EventFeed:
    return _feed
