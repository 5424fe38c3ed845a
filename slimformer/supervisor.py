"""`slimformer serve`'s child processes: started, watched, restarted when they die, stopped whole.

Each child runs in a session of its own, so that everything it starts (Celery's pool processes, the
webhook worker) is one process group that can be signalled and waited for as a unit. A child that
exits while serve runs is restarted with exponential backoff (reset once it has stayed up a
minute). Stopping is warm first (SIGTERM: a Celery worker hands its running job back), then the
group's stragglers are terminated, then killed; stop returns when no process of the group is left.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

STABLE_AFTER_S = 60.0
MAX_BACKOFF_S = 30.0


class AlreadyServing(RuntimeError):
    """Another `serve` holds this data directory."""


def lock_data_dir(data_dir: Path) -> IO[str]:
    """Hold an exclusive lock on `data_dir` for this process's lifetime (released at exit, even a
    crash's: the kernel drops flock locks with the file descriptor)."""
    handle = (data_dir / "serve.lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise AlreadyServing(
                f"another `slimformer serve` (pid {holder}) is using {data_dir}: stop it first, "
                "or pass another --data-dir"
            ) from exc
        raise
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def stop_group(process: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """Warm shutdown of the leader, then the rest of its group; returns when the group is gone."""
    pgid = process.pid
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        _wait(lambda: process.poll() is not None, grace_s)
    # What the leader started may outlive it (an orphan is reparented, still in the group).
    _signal_group(pgid, signal.SIGTERM)
    if not _wait(lambda: process.poll() is not None and not group_alive(pgid), 10.0):
        _signal_group(pgid, signal.SIGKILL)
        _wait(lambda: process.poll() is not None and not group_alive(pgid), 10.0)


def _wait(done: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


class Supervisor:
    """One child command, kept running until `stop`."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        env: dict[str, str],
        log: Callable[[str], None],
    ) -> None:
        self.name = name
        self._command = list(command)
        self._env = env
        self._log = log
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._watch, name=f"supervise-{name}", daemon=True)
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> None:
        self._process = self._spawn()
        self._thread.start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self._command, env=self._env, start_new_session=True)

    def _watch(self) -> None:
        backoff = 1.0
        started = time.monotonic()
        while not self._stopping.wait(0.5):
            process = self._process
            assert process is not None
            code = process.poll()
            if code is None:
                if time.monotonic() - started > STABLE_AFTER_S:
                    backoff = 1.0
                continue
            self._log(
                f"slimformer: the {self.name} exited ({_describe(code)}); "
                f"restarting it in {backoff:.0f} s"
            )
            stop_group(process, grace_s=0)
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, MAX_BACKOFF_S)
            with self._lock:
                if self._stopping.is_set():
                    return
                self._process = self._spawn()
                self.restarts += 1
                started = time.monotonic()

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            if self._process is not None:
                stop_group(self._process)
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
