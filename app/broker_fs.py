"""kombu's filesystem transport with atomic message writes: the embedded default's broker.

The stock transport creates the message file and then writes into it, so a consumer polling the
folder at that moment reads an empty file and its consumer loop crashes. Here a message is written
to a temporary file beside the queue folder and renamed in, so a reader sees all of it or nothing.

Priorities: the stock consumer takes a queue's files in sorted name order, so a name that starts
with the message's priority (0 first, as kombu's Redis transport orders them) and then the time
makes the folder a priority queue, first in first out within a level.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

SCHEME = "slimfs"


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: dict, **kwargs: object) -> None:
        priority = self._get_message_priority(payload, reverse=False)  # 0-9, 0 served first
        # Zero-padded, so that sorting the names sorts the times; no dot before the queue name.
        name = f"{priority}_{int(round(monotonic() * 1000)):015d}_{uuid.uuid4()}.{queue}.msg"
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


class Transport(filesystem.Transport):
    Channel = Channel
    driver_type = driver_name = SCHEME


TRANSPORT_ALIASES[SCHEME] = f"{__name__}:Transport"
