"""A lock on a run directory while a process trains in it.

`RUN/.lock` is locked with flock(2): the operating system releases it the moment its process
ends, however it ends, so a lock left behind by a killed trainer is never stale: the next trainer
simply takes it over (the file, holding the last owner's pid and host for messages, stays after a
kill; a clean release removes it). A second trainer on the same run gets one clear RunError
naming the process that holds it.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from imagetx.errors import RunError


class RunLock:
    """with RunLock(run_dir): ... holds RUN/.lock exclusively for the block (created if needed)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise RunError(
                    f"{self.path.parent} is in use by {holder}: wait for it to finish or stop it first "
                    "(two trainers would overwrite each other's checkpoints)"
                ) from None
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

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
