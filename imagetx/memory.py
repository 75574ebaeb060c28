"""Keep the process's memory honest on glibc: return freed tensor memory to the OS.

glibc raises its mmap threshold after large blocks are freed (up to 32 MB), after which tensors
of a few MB to 32 MB come from the heap, where freed space is kept and fragments: a CPU training
step's resident memory then grows to about twice its live tensors. A fixed threshold keeps every
tensor of 1 MB or more in its own mapping, released on free.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
_done = False


def use_mmap_for_large_tensors(threshold_bytes: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold (Linux only; a no-op elsewhere). Returns True when applied."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))
    except (OSError, AttributeError):
        return False
    return _done
