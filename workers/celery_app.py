"""The worker's Celery application: configuration from `app.broker`, tasks from `workers.tasks`."""

from __future__ import annotations

import os

from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown

from app.broker import make_celery
from app.db.session import dispose_engines

PRESENCE_ENV = "SLIMFORMER_PRESENCE"

celery_app = make_celery()
celery_app.conf.imports = ("workers.tasks",)


@worker_init.connect
def _name_the_node(sender: object = None, **_: object) -> None:
    # Before the pool forks: its children name the jobs they claim after this node
    # (`workers.attempt.worker_name`), which is how the registry tells busy workers from idle ones.
    from workers.presence import NODE_ENV

    hostname = getattr(sender, "hostname", None)
    if hostname:
        os.environ[NODE_ENV] = hostname


@worker_process_init.connect
def _fresh_connections(**_: object) -> None:
    # A forked child must not share the parent's database connections. CUDA is only ever
    # initialised here, in the child, by the first job: never in the parent that forks (the
    # device probe runs in a process of its own, `workers.presence.probe`).
    dispose_engines()
    # Jobs allocate and free per-block tensors all the time: hand large frees back to the OS,
    # so a job's resident memory follows what it holds (`process_memory`).
    from workers.compression.process_memory import return_large_frees

    return_large_frees()


@worker_ready.connect
def _start_background(sender: object = None, **_: object) -> None:
    from workers import presence

    consumed = list(sender.app.amqp.queues.consume_from or {})  # type: ignore[union-attr]
    # The webhook companion of a job worker (`slimformer worker`) runs no job: not registered.
    if os.environ.get(PRESENCE_ENV, "1") == "1":
        presence.start(sender.hostname, consumed)  # type: ignore[union-attr]
    if os.environ.get("SLIMFORMER_REAPER", "1") == "1":
        from workers.reaper import start_reaper_thread

        start_reaper_thread()


@worker_shutdown.connect
def _stop_background(**_: object) -> None:
    from workers import presence
    from workers.reaper import stop_reaper_thread

    stop_reaper_thread()
    presence.stop()
