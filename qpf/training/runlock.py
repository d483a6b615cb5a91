"""An exclusive lock on a run directory for the life of a training run.

``RUN_DIR/.lock`` is locked with ``fcntl.flock``: the kernel drops the lock when its holder
exits for any reason (``kill -9`` included), so a lock is never left held by a dead process.
The file also records the holder's process id, host and start time, which is what a second
run's error names; a file naming a process that no longer holds the lock is a stale lock
(its owner was killed) and is taken over with a warning. The file is never deleted, only
emptied on release: unlinking a lock file lets two later runs lock two different inodes.

flock is advisory and local: it excludes runs on one machine (and on file systems whose
locks span machines); it does not replace the multi-host coordinator.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """Another live process holds the run directory's lock."""


def _holder(text: str) -> dict[str, str]:
    """The ``key=value`` lines of a lock file (empty when the file is empty)."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """``with RunLock(run_dir):`` holds ``run_dir/.lock`` (creating ``run_dir``)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise ``RunLockedError`` naming the holder (``OSError`` when the
        directory cannot be created or written)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            os.close(fd)
            pid = info.get("pid", "?")
            where = f" on {info['host']}" if info.get("host") else ""
            since = f", started {info['started']}" if info.get("started") else ""
            raise RunLockedError(
                f"{self.run_dir} is in use by another training run (process {pid}{where}"
                f"{since}; lock file {self.path}): wait for it to finish, stop it "
                f"(kill {pid}), or choose another --run-dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._take_over(fd)
        return self

    def _take_over(self, fd: int) -> None:
        old = _holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        if old.get("pid"):
            pid = old["pid"]
            dead = not pid.isdigit() or not _alive(int(pid))
            state = "no longer running" if dead else "alive but not holding it"
            log.warning(
                "taking over the stale lock %s of process %s (%s; it was killed or crashed)",
                self.path,
                pid,
                state,
            )
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        text = f"pid={os.getpid()}\nhost={socket.gethostname()}\nstarted={started}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
        os.fsync(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # empty = no holder; the inode stays (see module docstring)
        os.close(fd)  # closing drops the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
