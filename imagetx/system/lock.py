"""Locks held with flock(2): on a run directory while a process trains in it, and on a data cache
entry while a process converts it.

The operating system releases an flock the moment its process ends, however it ends, so a lock
left behind by a killed process is never stale: the next one simply takes it over (the file,
holding the last owner's pid and host for messages, stays after a kill; a clean release removes
it). A second trainer on the same run gets one clear RunError naming the process that holds it;
a second converter of the same data waits (`FileLock.acquire(wait=...)`).
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Callable
from pathlib import Path

from imagetx.errors import RunError


class FileLock:
    """An exclusive flock on `path` (created if needed), with the holder named inside it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None

    def busy(self, holder: str) -> Exception:
        """The error for a lock another process holds, when not waiting."""
        return RunError(f"{self.path} is held by {holder}")

    def acquire(self, wait: Callable[[str], None] | None = None):
        """Take the lock. Held by another process: raise self.busy(holder), or, with `wait`,
        call wait(holder) once and block until it is free."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        told = False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                if wait is None:
                    os.close(fd)
                    raise self.busy(holder) from None
                if not told:
                    wait(holder)
                    told = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:  # the holder may have released and removed the file between our open and flock
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked: see acquire
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class RunLock(FileLock):
    """with RunLock(run_dir): ... holds RUN/.lock exclusively for the block (created if needed)."""

    def __init__(self, run_dir: str | os.PathLike):
        super().__init__(Path(run_dir) / ".lock")

    def busy(self, holder: str) -> Exception:
        return RunError(
            f"{self.path.parent} is in use by {holder}: wait for it to finish or stop it first "
            "(two trainers would overwrite each other's checkpoints)"
        )
