"""Every file imagetx writes (checkpoints, config.toml, metrics.jsonl, PNG grids and samples, NPZ
arrays) goes through atomic_write: a crash, a full disk or Ctrl-C never leaves a half-written
file under the final name, and never damages the file it replaces."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None]) -> Path:
    """Write `data` (bytes, or a function writing to a binary file) to path atomically: to a
    temporary file in the same directory, flushed to disk, then renamed over path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if isinstance(data, (bytes, bytearray)):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fsync(f.fileno())
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
    return path
