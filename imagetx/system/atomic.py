"""Every file imagetx writes (checkpoints, config.toml, metrics.jsonl, PNG grids and samples, NPZ
arrays, the data cache) goes through atomic_write or atomic_path: a crash, a full disk or Ctrl-C
never leaves a half-written file under the final name, and never damages the file it replaces."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None]) -> Path:
    """Write `data` (bytes, or a function writing to a binary file) to path atomically: to a
    temporary file in the same directory (.NAME.tmp-PID), flushed to disk, then renamed over
    path. Temporary files of the same name left by a killed process are removed first."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            if isinstance(data, (bytes, bytearray)):
                f.write(data)
            else:
                data(f)
    return Path(path)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """with atomic_path(path) as tmp: write the file `tmp` (by any means: np.lib.format.open_memmap,
    a library's save); when the block ends without an error it is flushed to disk and renamed
    over path, otherwise deleted. A process that has the old file open (or memory-mapped) keeps
    reading the old contents."""
    path = Path(path)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete .NAME.tmp-PID files (or folders) beside path whose process no longer runs (a save
    that was killed half-way); -> the files removed. A temporary of a running process is left alone."""
    path = Path(path)
    return remove_left_by_dead_processes(path.parent, f".{path.name}.tmp-*")


def remove_left_by_dead_processes(folder: str | os.PathLike, pattern: str) -> list[Path]:
    """Delete the files (or folders) in folder that match pattern and end in -PID of a process
    that no longer runs (this one's are kept); -> the files removed."""
    removed = []
    for tmp in Path(folder).glob(pattern):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            if tmp.is_dir() and not tmp.is_symlink():  # a folder written whole (imagetx export)
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
