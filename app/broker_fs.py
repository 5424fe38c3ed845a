"""kombu's filesystem transport with atomic message writes: the embedded default's broker.

The stock transport creates the message file and then writes into it, so a consumer polling the
folder at that moment reads an empty file and its consumer loop crashes. Here a message is written
to a temporary file beside the queue folder and renamed in, so a reader sees all of it or nothing.

Priorities: the stock consumer takes a queue's files in sorted name order, so a name that starts
with the message's priority (0 first, as kombu's Redis transport orders them) and then the time
makes the folder a priority queue, first in first out within a level.

A message's file name also carries its task id (Slimformer's are the job, model or delivery id), so
the messages waiting for an id can be listed and removed without reading them:
`<priority>_<ms>_<uuid>_<task id>.<queue>.msg`, which the stock consumer reads the same way (it only
looks at what follows the first dot).
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

SCHEME = "slimfs"
_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,100}$")


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: dict, **kwargs: object) -> None:
        priority = self._get_message_priority(payload, reverse=False)  # 0-9, 0 served first
        task_id = str(payload.get("headers", {}).get("id", ""))
        carried = f"_{task_id}" if _SAFE_ID.match(task_id) else ""
        # Zero-padded, so that sorting the names sorts the times; no dot before the queue name.
        name = (
            f"{priority}_{int(round(monotonic() * 1000)):015d}_{uuid.uuid4()}{carried}.{queue}.msg"
        )
        staging = os.path.join(os.path.dirname(self.data_folder_out.rstrip("/")), "staging")
        os.makedirs(staging, exist_ok=True)
        try:
            fd, temp = tempfile.mkstemp(dir=staging, suffix=".part")
            with os.fdopen(fd, "wb") as handle:
                handle.write(str_to_bytes(dumps(payload)))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, os.path.join(self.data_folder_out, name))
        except OSError as exc:
            raise ChannelError(f"Cannot add message {name!r} to the queue folder") from exc


def _waiting(folder: Path, queues: Iterable[str]) -> Iterable[tuple[str, str]]:
    """(file name, task id) of each message waiting in these queues."""
    suffixes = {f".{queue}.msg" for queue in queues}
    for name in os.listdir(folder):
        stem, dot, rest = name.partition(".")
        if dot and f".{rest}" in suffixes:
            parts = stem.split("_", 3)  # priority, ms, uuid, task id (which may hold underscores)
            if len(parts) == 4:
                yield name, parts[3]


def message_ids(folder: Path, queues: Iterable[str]) -> set[str]:
    return {task_id for _, task_id in _waiting(folder, queues)}


def remove_messages(folder: Path, task_id: str, queues: Iterable[str]) -> int:
    removed = 0
    for name, carried in list(_waiting(folder, queues)):
        if carried != task_id:
            continue
        try:
            os.remove(folder / name)
            removed += 1
        except FileNotFoundError:  # a consumer took it first: it drops it without running
            continue
    return removed


class Transport(filesystem.Transport):
    Channel = Channel
    driver_type = driver_name = SCHEME


TRANSPORT_ALIASES[SCHEME] = f"{__name__}:Transport"
