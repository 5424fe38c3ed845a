"""This worker in the `workers` table: registered when Celery says it is ready, refreshed every
`worker_heartbeat_s` by a thread of the main process, removed on a clean shutdown. A worker killed
outright just stops refreshing; after `worker_lost_after_beats` missed beats routing, `/readyz`
and `/metrics` stop counting it, and `GET /v1/workers` shows it `lost`.

The device is detected once per worker (`probe`) in a short-lived child process: asking CUDA about
its devices initialises it, and CUDA must never be initialised in the main process, which forks
the pool's children. `slimformer worker` probes before it starts Celery (it needs the device to
choose the queues) and hands the answer on in `SLIMFORMER_WORKER_DEVICE`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading

from app.broker import VALIDATE_QUEUE
from app.db.session import session_scope
from app.settings import get_settings
from app.workers import repository
from workers.outage import is_transient

log = logging.getLogger("slimformer.presence")

DEVICE_ENV = "SLIMFORMER_WORKER_DEVICE"  # the probe's JSON, from `slimformer worker` to Celery
NODE_ENV = "SLIMFORMER_WORKER_NODE"  # the Celery node name, inherited by the pool's children
_PROBE = (
    "import json; from workers.compression.device import describe; print(json.dumps(describe()))"
)

_thread: Presence | None = None


def probe() -> dict:
    """{device: cpu|gpu, device_name, memory_bytes, visible_gpus} of this machine as the engine
    would use it (`workers.compression.device.select_device`, so `SLIMFORMER_DEVICE` and
    `CUDA_VISIBLE_DEVICES` count), found in a child process that exits."""
    result = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"could not detect this worker's device:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def default_queues(device: str) -> list[str]:
    """A worker takes the jobs of its device class, and validations."""
    return [device, VALIDATE_QUEUE]


class Presence(threading.Thread):
    def __init__(self, hostname: str, description: dict, queues: list[str]) -> None:
        super().__init__(name="slimformer-presence", daemon=True)
        self.hostname = hostname
        self.description = description
        self.queues = queues
        self.stopped = threading.Event()

    def register(self) -> None:
        with session_scope() as session:
            repository.register(
                session,
                hostname=self.hostname,
                device=self.description["device"],
                device_name=self.description.get("device_name"),
                memory_bytes=self.description.get("memory_bytes"),
                queues=self.queues,
            )

    def run(self) -> None:
        interval = get_settings().worker_heartbeat_s
        while not self.stopped.wait(interval):
            try:
                with session_scope() as session:
                    present = repository.beat(session, hostname=self.hostname)
                if not present:  # pruned while this worker could not reach the database
                    self.register()
            except Exception as exc:  # noqa: BLE001 - a database blip must not end the heartbeat
                log.warning(
                    "worker heartbeat failed; trying again in %.0f s",
                    interval,
                    exc_info=not is_transient(exc),  # an outage: one line a beat, no traceback
                )

    def stop(self) -> None:
        self.stopped.set()
        try:
            with session_scope() as session:
                repository.remove(session, hostname=self.hostname)
        except Exception:  # noqa: BLE001 - it will show as lost instead
            log.warning("could not remove this worker's registration", exc_info=True)


def start(hostname: str, consumed: list[str]) -> None:
    """Register this worker (node name `hostname`, consuming the Celery queues `consumed`) and
    keep its row fresh."""
    global _thread
    if _thread is not None and _thread.is_alive():
        return
    settings = get_settings()
    queues = sorted(name.removeprefix(settings.queue_prefix) for name in consumed)
    description = json.loads(os.environ[DEVICE_ENV]) if os.environ.get(DEVICE_ENV) else probe()
    _thread = Presence(hostname, description, queues)
    try:
        _thread.register()
    except Exception:  # noqa: BLE001 - the heartbeat registers it once the database answers
        log.exception("could not register this worker; the heartbeat will try again")
    _thread.start()
    log.info(
        "worker %s registered: %s (%s), queues %s",
        hostname,
        description["device"],
        description.get("device_name"),
        ",".join(queues),
    )


def stop() -> None:
    if _thread is not None:
        _thread.stop()
