"""What this processor can do, read from its feature flags (never from a timing): the native
bf16 matrix features that precision "auto" and the compiled decoding step (imagetx.model.native)
look for."""

from __future__ import annotations

import functools
from pathlib import Path

_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def bf16_features(cpuinfo: str) -> tuple[str, ...]:
    """The native bf16 matrix features (amx_bf16, avx512_bf16) named in the flags line of a
    Linux /proc/cpuinfo text; () when there are none."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return tuple(f for f in _BF16_CPU_FLAGS if f in flags)
    return ()


@functools.lru_cache(maxsize=1)
def cpu_bf16_features() -> tuple[str, ...]:
    """This processor's native bf16 matrix features (see bf16_features); () when it has none or
    its flags cannot be read (not Linux)."""
    try:
        return bf16_features(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        return ()
