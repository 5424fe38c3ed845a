"""Job event streams without a database connection per stream.

One `EventFeed` per API process keeps a `_Hub` per watched job: the events since the hub began and
the job's status. One notifier thread keeps every hub current with one query for all watched jobs:
woken by PostgreSQL `NOTIFY` (sent by `app/db/session.py` when a transaction wrote a job event), and
otherwise polling every `sse_poll_s` (the embedded SQLite default) or every `LISTEN_FALLBACK_S` (a
safety net under `LISTEN`). A stream reads its hub in memory and waits on its own `asyncio.Event`.
A stream whose cursor is older than its hub (a first read, a `Last-Event-ID` resume) asks the
notifier to reach back that far, and waits: a thousand streams opened at once cost one query for all
of them, not one each in the threadpool (on PostgreSQL those kept every pooled connection busy for
seconds, and GETs alongside waited behind them). Waking a stream never waits on it, so a slow client
blocks nobody.
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
from sqlalchemy.orm import Session

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
    want: int | None = None  # a stream waits for the events after this cursor (below `base`)
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
        """Events after `cursor` from memory, or None when the hub does not reach back that far
        yet: the notifier is asked to fill it from `cursor` (one query for every stream waiting),
        and wakes the subscribers when it has. Only for a job this loop has subscribed to."""
        with self._lock:
            hub = self._hubs[job_id]
            if hub.gone:
                return Read([], True)
            if hub.base is None or cursor < hub.base:
                hub.want = cursor if hub.want is None else min(hub.want, cursor)
                events = None
            else:
                events = [event for event in hub.events if event.seq > cursor]
                last = events[-1].seq if events else cursor
                return Read(events, hub.status in TERMINAL and last >= hub.last_seq)
        self._poke.set()
        return None

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
        # Per hub: where it begins (None: not filled yet), its last seq, and how far back a
        # stream waits for it to reach. Only this thread changes `base`, `last_seq` and `events`.
        with self._lock:
            wanted = {
                job_id: (hub.base, hub.last_seq, hub.want) for job_id, hub in self._hubs.items()
            }
        if not wanted:
            return
        # job id -> (base, event_seq, status, events older than the hub's base, newer events)
        found: dict[str, tuple[int, int, str, list[JobEventOut], list[JobEventOut]]] = {}
        with session_scope() as session:
            rows = session.execute(
                select(Job.id, Job.event_seq, Job.status).where(Job.id.in_(list(wanted)))
            ).all()
            # Status first, then events: a terminal status is read with its event.
            for job_id, event_seq, status in rows:
                base, last_seq, want = wanted[job_id]
                older: list[JobEventOut] = []
                if base is None:  # a first fill: from the oldest cursor waiting, else from now
                    base = last_seq = want if want is not None else event_seq
                elif want is not None and want < base:  # a stream reaches back before the hub
                    older = _events(session, job_id, after=want, upto=base)
                    base = want
                newer = _events(session, job_id, after=last_seq) if event_seq > last_seq else []
                found[job_id] = (base, event_seq, status, older, newer)
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
                    base, event_seq, status, older, newer = found[job_id]
                    changed = base != hub.base or bool(newer) or status != hub.status
                    if hub.base is None:
                        hub.last_seq = base
                    hub.base = base
                    hub.events = older + hub.events + newer
                    if newer:
                        hub.last_seq = newer[-1].seq
                    hub.status = status
                if hub.want is not None and hub.base is not None and hub.want >= hub.base:
                    hub.want = None
                if changed:
                    woken += hub.subscribers
        for subscriber in woken:
            subscriber.loop.call_soon_threadsafe(subscriber.wake.set)


def _events(
    session: Session, job_id: str, *, after: int, upto: int | None = None
) -> list[JobEventOut]:
    """The job's events with after < seq (<= upto), read a page at a time."""
    events: list[JobEventOut] = []
    while True:
        page, has_more = repository.events_after(
            session=session, job_id=job_id, after=after, limit=PAGE
        )
        events += [
            JobEventOut.model_validate(row) for row in page if upto is None or row.seq <= upto
        ]
        if not has_more or (upto is not None and page[-1].seq >= upto):
            return events
        after = page[-1].seq


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
