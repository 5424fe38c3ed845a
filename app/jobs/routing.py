"""Which queue a job's message goes to, and what the job says while it waits.

A job asks for a device class (`resources.device`: cpu | gpu | any); its stages may require one
(`StageConfig.runs_on`, e.g. dynamic_int8's CPU kernels). `resolve_device` settles that at
submission; `choose` picks the queue each time a message is sent (at submission, and whenever the
reaper re-queues or re-sends), so both paths route the same way:

- `cpu` and `gpu` jobs go to their own queue, live worker or not: they wait there for one.
- `any` goes to `gpu` while a live worker consumes the gpu queue, else to `cpu`. GPU workers are
  the production shape; CPU workers take what no GPU is there for. A message already on a queue
  whose workers died is re-routed by the reaper after `requeue_after_s` (the claim is a
  conditional update, so a job sent twice still runs once).

No live worker for the chosen queue: the job stays `queued` and its progress message says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.broker import CPU_QUEUE, GPU_QUEUE
from app.workers.repository import live_queue_counts

DEVICES = ("cpu", "gpu", "any")


class DeviceConflict(ValueError):
    pass


@dataclass(frozen=True)
class Route:
    queue: str  # cpu | gpu
    live_workers: int  # live workers consuming that queue
    message: str  # the waiting job's progress message


def device_class(device: str) -> str:
    """The class of a torch device string (`cuda:1` -> gpu); anything that is not CUDA is cpu."""
    return "gpu" if device.strip().lower().startswith("cuda") else "cpu"


def resolve_device(requested: str, runs_on: str | None, *, method: str = "this recipe") -> str:
    """The device class a job is stored with: what was asked, narrowed by what a stage requires
    (`runs_on` of `method`). Raises DeviceConflict when the two disagree."""
    if runs_on is None:
        return requested
    required = device_class(runs_on)
    if requested not in ("any", required):
        raise DeviceConflict(
            f"{method} runs on the {required} only: ask for device {required!r} or 'any'"
        )
    return required


def choose(device: str, live: Mapping[str, int]) -> Route:
    """The queue for a job of `device`, given the live workers per queue."""
    if device == "any":
        queue = GPU_QUEUE if live.get(GPU_QUEUE, 0) else CPU_QUEUE
    elif device in (CPU_QUEUE, GPU_QUEUE):
        queue = device
    else:
        raise ValueError(f"unknown device class {device!r}")
    count = live.get(queue, 0)
    if count:
        message = f"waiting for a {queue} worker"
    elif device == "any":
        message = "waiting for a worker: none is live"
    else:
        message = f"waiting for a {queue} worker: none is live"
    return Route(queue=queue, live_workers=count, message=message)


def route(session: Session, device: str) -> Route:
    return choose(device, live_queue_counts(session))
