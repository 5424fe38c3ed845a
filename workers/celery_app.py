"""The worker's Celery application: configuration from `app.broker`, tasks from `workers.tasks`."""

from __future__ import annotations

import os

from celery.signals import worker_process_init, worker_ready, worker_shutdown

from app.broker import make_celery
from app.db.session import dispose_engines

celery_app = make_celery()
celery_app.conf.imports = ("workers.tasks",)


@worker_process_init.connect
def _fresh_connections(**_: object) -> None:
    # A forked child must not share the parent's database connections. CUDA is only ever
    # initialised here, in the child, by the first job: never in the parent that forks.
    dispose_engines()


@worker_ready.connect
def _start_reaper(**_: object) -> None:
    if os.environ.get("SLIMFORMER_REAPER", "1") == "1":
        from workers.reaper import start_reaper_thread

        start_reaper_thread()


@worker_shutdown.connect
def _stop_reaper(**_: object) -> None:
    from workers.reaper import stop_reaper_thread

    stop_reaper_thread()
