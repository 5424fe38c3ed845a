"""The Celery application's configuration, the queues, and the only messages anyone sends.

A message carries just an id: the database says what the job is. The API sends by task name, so it
never imports the worker code (or torch).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from functools import lru_cache

from celery import Celery

from app import broker_fs  # registers the slimfs:// transport
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)

RUN_JOB = "slimformer.run_job"
VALIDATE_MODEL = "slimformer.validate_model"
DELIVER_WEBHOOK = "slimformer.deliver_webhook"
# Jobs are routed by device class (app/jobs/routing.py): one queue per class. Validation reads
# archive members and safetensors headers only, so any worker takes it, and it has its own queue
# so that it never waits behind a long job.
CPU_QUEUE = "cpu"
GPU_QUEUE = "gpu"
JOB_QUEUES = (CPU_QUEUE, GPU_QUEUE)
VALIDATE_QUEUE = "validate"
# Webhook deliveries are short HTTP calls: their own queue, consumed by a thread-pool worker that
# runs beside each job worker (`slimformer worker`), so a delivery never waits behind a job.
WEBHOOK_QUEUE = "webhooks"
# A job's `priority` (0-9, higher first) orders its queue. kombu's Redis transport and our
# filesystem one (app/broker_fs.py) both serve the LOWEST message priority first, one list (or
# file-name prefix) per level: so a job's message carries 9 - priority.
PRIORITY_LEVELS = 10


def message_priority(job_priority: int) -> int:
    """The broker's priority for a job's message: 0 (served first) for a job of priority 9."""
    return PRIORITY_LEVELS - 1 - min(max(job_priority, 0), PRIORITY_LEVELS - 1)


def celery_config(settings: Settings) -> dict:
    longest_job_s = 7 * 24 * 3600
    config: dict = {
        "broker_url": settings.resolved_broker_url,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,  # the database holds results
        "result_backend": None,
        # Long jobs: ack only after the task returns; if the process dies the message comes back.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_max_tasks_per_child": 20,  # returns memory torch keeps cached
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # wait out a broker restart
        "broker_connection_timeout": 5,
        # Publishing from the API must not hang a request when the broker is down: the job row is
        # committed already, and the reaper re-sends the message later.
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0.2,
            "interval_step": 0.5,
            "interval_max": 1,
        },
        # Per-job max_runtime_s is enforced cooperatively by the heartbeat; these are the backstop.
        "task_soft_time_limit": longest_job_s,
        "task_time_limit": longest_job_s + 600,
        "task_default_queue": settings.queue(CPU_QUEUE),
    }
    if settings.is_filesystem_broker:
        folder = settings.broker_dir
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        config["broker_transport_options"] = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            # Exchange bindings; kombu's default is ./control, relative to whatever the cwd is.
            "control_folder": str(folder / "control"),
            "store_processed": False,
            "polling_interval": settings.broker_polling_interval_s,
        }
    else:
        config["broker_transport_options"] = {
            # Redis redelivers an unacked message after the visibility timeout: make it longer
            # than any job, so a healthy long job is never handed to a second worker.
            "visibility_timeout": longest_job_s + 3600,
            # One Redis list per priority level (`cpu`, `cpu:1` … `cpu:9`), popped in that order.
            # The queue order strategy stays round-robin: "priority" would order the *queues* a
            # worker consumes (cpu before validate), not the messages within one.
            "priority_steps": list(range(PRIORITY_LEVELS)),
            "sep": ":",
        }
    return config


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("slimformer")
    app.conf.update(celery_config(settings))
    return app


_client: Celery | None = None


def client() -> Celery:
    global _client
    if _client is None:
        _client = make_celery()
    return _client


def unreachable(exc: BaseException) -> bool:
    """True for an error that says the broker cannot be reached now (refused, reset or timed-out
    connections, a Redis restart, a queue folder that cannot be written), as opposed to a bug."""
    import redis.exceptions
    from kombu.exceptions import ChannelError
    from kombu.exceptions import OperationalError as KombuOperationalError

    return isinstance(
        exc,
        (
            KombuOperationalError,
            ChannelError,
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            OSError,
        ),
    )


class Outage:
    """How broker failures are logged: one that says the broker cannot be reached is one line
    without a traceback, and while it lasts at most one line every `every_s` seconds (a reaper
    pass re-sending a hundred messages writes one, not a hundred tracebacks); the first call that
    works again says so once. Any other error keeps its traceback."""

    def __init__(self, logger: logging.Logger, every_s: float = 30.0) -> None:
        self.log = logger
        self.every_s = every_s
        self.failures = 0  # in a row, while the broker is unreachable
        self.since = 0.0
        self.last_line = 0.0
        self.lock = threading.Lock()

    def failed(self, what: str, exc: BaseException) -> None:
        if not unreachable(exc):
            self.log.warning("%s", what, exc_info=exc)
            return
        now = time.monotonic()
        with self.lock:
            if not self.failures:
                self.since = self.last_line = now
            elif now - self.last_line < self.every_s:
                self.failures += 1
                return
            self.failures += 1
            self.last_line = now
            failures = self.failures
        self.log.warning(
            "%s: broker unreachable (%s: %s)%s",
            what,
            type(exc).__name__,
            _first_line(exc),
            f"; {failures} failed calls in {now - self.since:.0f} s" if failures > 1 else "",
        )

    def worked(self) -> None:
        if not self.failures:  # the usual case: no lock taken
            return
        with self.lock:
            failures, self.failures = self.failures, 0
            since = self.since
        if failures:
            self.log.warning(
                "broker reachable again after %d failed calls (%.0f s)",
                failures,
                time.monotonic() - since,
            )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


outage = Outage(log)


def send_run_job(job_id: str, queue: str, priority: int = 0) -> bool:
    """Best effort: on failure the job stays queued and the reaper re-sends it. `queue` is one of
    JOB_QUEUES, chosen by `app.jobs.routing`; `priority` is the job's (0-9, higher first)."""
    if queue not in JOB_QUEUES:
        raise ValueError(f"{queue!r} is not a job queue ({', '.join(JOB_QUEUES)})")
    return _send(RUN_JOB, job_id, queue, priority=message_priority(priority))


def send_validate_model(model_id: str) -> bool:
    return _send(VALIDATE_MODEL, model_id, VALIDATE_QUEUE)


def send_deliver_webhook(message_id: str, countdown: float | None = None) -> bool:
    """Best effort: a pending delivery whose message is lost is re-sent by the sweeper."""
    return _send(DELIVER_WEBHOOK, message_id, WEBHOOK_QUEUE, countdown=countdown)


def _send(
    task: str,
    resource_id: str,
    queue: str,
    countdown: float | None = None,
    priority: int | None = None,
) -> bool:
    try:
        # The task id is the resource's id: a message can be found by the id it carries (to
        # withdraw a cancelled job's, or to tell a waiting message from a lost one).
        client().send_task(
            task,
            args=[resource_id],
            queue=get_settings().queue(queue),
            countdown=countdown,
            priority=priority,
            task_id=resource_id,
        )
    except Exception as exc:  # noqa: BLE001 - any broker failure means "the reaper will retry"
        outage.failed(f"could not send {task} for {resource_id}; it will be re-sent", exc)
        return False
    outage.worked()
    return True


# kombu's Redis transport keeps a queue's priority-0 messages in a list named after it and each
# other level's in one beside it (`<queue>:<n>`, the `sep` and `priority_steps` set above).
REDIS_PRIORITY_SEPARATOR = ":"
REDIS_PRIORITY_STEPS = tuple(range(1, PRIORITY_LEVELS))
# Remove every message of one queue list that mentions the id (its task id and argsrepr do).
REDIS_WITHDRAW = """
local removed = 0
for _, key in ipairs(KEYS) do
  for _, item in ipairs(redis.call('LRANGE', key, 0, -1)) do
    if string.find(item, ARGV[1], 1, true) then
      removed = removed + redis.call('LREM', key, 1, item)
    end
  end
end
return removed
"""


@lru_cache
def redis_client():  # noqa: ANN201 - redis.Redis, imported lazily
    """The broker's Redis, for what Celery has no verb for (and shared state such as rate limits)."""
    import redis

    url = get_settings().redis_url
    if url is None:
        raise RuntimeError("the broker is not Redis")
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def _redis_lists(queues: Iterable[str]) -> list[str]:
    return [
        name
        for queue in queues
        for name in (
            queue,
            *(f"{queue}{REDIS_PRIORITY_SEPARATOR}{step}" for step in REDIS_PRIORITY_STEPS),
        )
    ]


def withdraw_run_job(job_id: str) -> int:
    """Remove the waiting messages of a job cancelled while queued, from both job queues (the
    reaper may have re-routed it); how many went. Best effort: a message already taken by a
    worker, or one this broker cannot remove, is dropped by the worker without running
    (`workers/tasks.py`)."""
    settings = get_settings()
    queues = [settings.queue(name) for name in JOB_QUEUES]
    try:
        if settings.is_filesystem_broker:
            return broker_fs.remove_messages(settings.broker_dir / "queue", job_id, queues)
        if settings.redis_url:
            script = redis_client().register_script(REDIS_WITHDRAW)
            return int(script(keys=_redis_lists(queues), args=[job_id]))
    except Exception as exc:  # noqa: BLE001 - the worker drops what is left
        outage.failed(f"could not withdraw the messages of {job_id}", exc)
    return 0


def waiting_ids(queue_names: Iterable[str]) -> dict[str, set[str]] | None:
    """For each of these queues (names without the prefix), the ids that have a message waiting
    in it; None when the broker cannot tell: then nothing can be known to be waiting."""
    settings = get_settings()
    names = list(queue_names)
    try:
        if settings.is_filesystem_broker:
            folder = settings.broker_dir / "queue"
            return {name: broker_fs.message_ids(folder, [settings.queue(name)]) for name in names}
        if settings.redis_url:
            client = redis_client()
            waiting = {}
            for name in names:
                items = (
                    item
                    for key in _redis_lists([settings.queue(name)])
                    for item in client.lrange(key, 0, -1)
                )
                ids = {json.loads(item).get("headers", {}).get("id") for item in items}
                waiting[name] = ids - {None}
            outage.worked()
            return waiting
    except Exception as exc:  # noqa: BLE001 - the caller then assumes nothing is waiting
        outage.failed("could not list the waiting messages", exc)
    return None


def ping() -> None:
    with client().connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=2)
