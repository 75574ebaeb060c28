"""Stopping a training run cleanly on SIGINT / SIGTERM.

`StopSignals` turns the first signal into a request that the loop reads after each step; the run
then saves a checkpoint and exits with 130 (SIGINT) or 143 (SIGTERM). A second signal acts as usual.
"""

from __future__ import annotations

import signal
import sys
import threading


class StopSignals:
    """Turns the first SIGINT / SIGTERM into a request to stop after the current step (the run
    then saves a checkpoint); a second one acts as usual."""

    def __init__(self, announce: bool):
        self.received: int | None = None
        self.announce = announce
        self._old: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum
        self._restore()
        if self.announce:
            print(
                f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                "(send it again to quit at once)",
                file=sys.stderr,
                flush=True,
            )

    def _restore(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}

    def __exit__(self, *exc):
        self._restore()
