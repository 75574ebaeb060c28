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


def cpu_description() -> str:
    """This processor as a results table names it: the model name lscpu shows (/proc/cpuinfo),
    its native bf16 features and the cores this process may use, e.g. "AMD EPYC (avx512_bf16),
    2 cores"; platform.processor() where /proc/cpuinfo cannot be read."""
    import os
    import platform

    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    features = f" ({', '.join(cpu_bf16_features())})" if cpu_bf16_features() else ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}{features}, {cores} cores"
