"""Diagnostics: every note, warning and error line imagetx prints goes through `say`.

Results go to stdout; these lines go to stderr, one line each, prefixed with their kind
("note: ...", "warning: ...", "error: ..."). Under torchrun only rank 0 prints, since every
process would say the same. They are written through tqdm so that a progress bar on screen is
redrawn below the line instead of being broken by it.
"""

from __future__ import annotations

import sys

from imagetx.distributed import env_ranks


def say(kind: str, message: str) -> None:
    """Print `kind: message` on stderr (rank 0 only). kind: "note", "warning" or "error"."""
    if env_ranks()[0] != 0:
        return
    from tqdm import tqdm

    tqdm.write(f"{kind}: {message}", file=sys.stderr)


def note(message: str) -> None:
    say("note", message)


def warn(message: str) -> None:
    say("warning", message)


def error(message: str) -> None:
    say("error", message)
