"""Diagnostics: every note, warning and error line imagetx prints goes through `say`.

Results go to stdout; these lines go to stderr, one line each, prefixed with their kind
("note: ...", "warning: ...", "error: ..."). Under torchrun only rank 0 prints, since every
process would say the same. They are written through tqdm so that a progress bar on screen is
redrawn below the line instead of being broken by it.
"""

from __future__ import annotations

import os
import sys
import time


def _rank() -> int:
    """torchrun's RANK (0 without torchrun), read here rather than through imagetx.system.distributed
    so that printing a line never imports torch: the CLI says "interrupted" while it starts up."""
    return int(os.environ.get("RANK", 0))


def say(kind: str, message: str) -> None:
    """Print `kind: message` on stderr (rank 0 only). kind: "note", "warning" or "error"."""
    if _rank() != 0:
        return
    from tqdm import tqdm

    tqdm.write(f"{kind}: {message}", file=sys.stderr)


def note(message: str) -> None:
    say("note", message)


def warn(message: str) -> None:
    say("warning", message)


def error(message: str) -> None:
    say("error", message)


class _Lines:
    """Progress for a log file: a `note:` line at most every `every` seconds and one at the end."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, every: float = 30.0):
        self.total, self.desc, self.unit, self.n, self.every = total, desc, unit, initial, every
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.every:
            self._say()

    def _say(self) -> None:
        self.last = time.monotonic()
        rate = self.n / max(self.last - self.start, 1e-9)
        note(f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / max(self.total, 1):.0f}%, {rate:.3g} {self.unit}/s)")

    def close(self) -> None:
        if self.n:
            self._say()


def progress(total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0):
    """A progress display on stderr with update(n) and close(): tqdm's bar on a terminal; in a
    log file or CI a `note:` line every 30 seconds and one at the end, not carriage-return frames.
    Nothing when not enabled or on ranks other than 0."""
    if not enabled or _rank() != 0:
        return _Silent()
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=sys.stderr, dynamic_ncols=True)
    return _Lines(total, desc, unit, initial)


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass
