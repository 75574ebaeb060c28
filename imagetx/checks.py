"""The one check of each user value that several commands take: a sampling temperature, a random
seed, a class label, an output file or directory. Each returns a list of one-line problems (empty
when the value is fine), for a command's `problems()`; errors.raise_problems turns them into one
ConfigError (exit 2) before any work starts. Device names: distributed.device_problems.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def count_problems(value, flag: str) -> list[str]:
    """The one check of a count (images, samples, batch size): an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return [f"{flag} must be >= 1, got {value}"]
    return []


def temperature_problems(temperature) -> list[str]:
    """The one check of a sampling temperature given by a user: a finite number >= 0."""
    t = temperature
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        return [f"--temperature must be a finite number >= 0 (0 = greedy), got {t}"]
    return []


SEED_MAX = 2**63 - 1


def seed_problems(seed, flag: str = "--seed") -> list[str]:
    """The one check of a random seed: an integer in [0, 2^63 - 1] (what torch generators take)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        return [f"{flag} must be an integer in [0, {SEED_MAX}], got {seed}"]
    return []


def label_problems(model_config, label: int | None, required: bool = False) -> list[str]:
    """The one check of a --label against a model: only for class-conditional models, in
    [0, num_classes - 1], and present when `required`."""
    k = model_config.num_classes
    if not k:
        return ["--label given, but this model is unconditional (trained without classes)"] if label is not None else []
    if label is None:
        return [f"this model is class-conditional: give --label in [0, {k - 1}]"] if required else []
    if not 0 <= label < k:
        return [f"--label must be in [0, {k - 1}] for this model, got {label}"]
    return []


def output_dir_problems(directory: str | os.PathLike, flag: str) -> list[str]:
    """Whether files can be written into `directory` (existing, or creatable). Creates nothing."""
    d = Path(directory)
    if d.exists():
        if not d.is_dir():
            return [f"{flag} {d} exists and is not a directory"]
        return [] if os.access(d, os.W_OK | os.X_OK) else [f"output directory {d} is not writable"]
    parent = d.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return [f"cannot create output directory {d}: {parent} is not a writable directory"]
    return []


def output_file_problems(path: str | os.PathLike, flag: str) -> list[str]:
    """Whether a file can be written at `path`: not a directory, in an existing writable one."""
    path, parent = Path(path), Path(path).parent
    if path.is_dir():
        return [f"{flag} {path} is a directory; give a file name, e.g. {path / 'samples.png'}"]
    if parent.exists() and not parent.is_dir():
        return [f"{flag} {path}: {parent} is a file, not a directory"]
    if not parent.is_dir():
        return [f"output directory {parent} does not exist; create it first"]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"output directory {parent} is not writable"]
    return []


def physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on this platform
        return None


def memory_problems(nbytes: int, what: str, flag: str) -> list[str]:
    """Whether holding `nbytes` (what a command is asked to keep in memory) fits in half this
    machine's memory."""
    total = physical_memory_bytes()
    if total is not None and nbytes > total // 2:
        return [f"{flag}: {what} would take {nbytes / 2**30:.1f} GiB of memory, more than half of this "
                f"machine's {total / 2**30:.0f} GiB; ask for fewer per run"]
    return []
