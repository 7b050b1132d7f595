"""The run-directory lock: one run at a time writes a run directory.

``run_dir/.vfmbench.lock`` holds the holder's host, pid and start time (JSON) and is locked with
``flock`` while the run lasts. The kernel drops the ``flock`` when the holder exits, however it
exits (SIGKILL included), so a lock file left behind is stale exactly when it can be locked: the
next run takes it over and says so. A second run on a directory in use stops at once with a
``UserError`` (exit 2) naming the holder. The lock is released and the file removed on exit.

The lock is advisory (other programs may still write the folder), and on network filesystems
without working ``flock`` a holder on another host cannot be seen; the file then still names the
last holder for a person to check.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import socket
from pathlib import Path
from typing import Any

from .errors import UserError

LOCK_NAME = ".vfmbench.lock"


class RunLockedError(UserError):
    """The run directory is in use by another run."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_holder(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process (the lock file names no holder yet)"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (started {holder.get('started', '?')})"


class RunLock:
    """An acquired lock on a run directory; ``release()`` (or leaving the ``with`` block) frees it."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None
        self.stale: dict[str, Any] = {}

    def acquire(self) -> "RunLock":
        import fcntl

        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # the file may be removed by its releasing holder between open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = read_holder(self.path)
                raise RunLockedError(
                    f"run directory {str(self.run_dir)!r} is in use by {describe(holder)}: two runs must not write one "
                    f"directory. Wait for that run to finish (or stop it), or pass another --out; if no such process "
                    f"exists, delete {str(self.path)!r}"
                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # locked a file its holder had just removed: try the new one
                os.close(fd)
                continue
            previous = read_holder(self.path)
            if previous and previous.get("pid") != os.getpid():
                self.stale = previous  # left by a run that ended without releasing (killed): taken over
            me = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            self.fd = fd
            return self
        raise RunLockedError(f"could not lock run directory {str(self.run_dir)!r}: its lock file keeps changing; is another run starting?")

    def release(self) -> None:
        if self.fd is None:
            return
        import fcntl

        try:
            self.path.unlink(missing_ok=True)  # removed while still locked: a waiting run then locks a fresh file
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire() if self.fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_dir(run_dir: str | Path, log=None):
    """Lock ``run_dir`` on rank 0 and return the lock, a context manager that releases it (under
    torchrun the other ranks get a no-op one and learn the outcome, so that every rank stops with
    the same message when the directory is in use)."""
    import contextlib

    from . import dist

    lock, error = None, None
    if dist.is_main():
        try:
            lock = RunLock(run_dir).acquire()
            if lock.stale and log is not None:
                alive = lock.stale.get("host") == socket.gethostname() and _pid_alive(int(lock.stale.get("pid", 0) or 0))
                log(f"took over the lock of {describe(lock.stale)}, which ended without releasing it" + ("" if not alive else " (its pid now belongs to another process)"))
        except RunLockedError as e:
            error = str(e)
    error = dist.broadcast_object(error)
    if error:
        raise RunLockedError(error)
    return lock if lock is not None else contextlib.nullcontext()
