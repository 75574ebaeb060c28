"""Expected failures: each carries one line for the user; the CLI prints it and exits non-zero."""

from __future__ import annotations

from imagetx.model.config import ConfigError


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, not from imagetx, or incompatible with this version.
    The message names the file and what is wrong."""


class RunError(RuntimeError):
    """A training or evaluation run that cannot start or has to stop (unusable output directory,
    non-finite loss, incompatible data)."""


__all__ = ["CheckpointError", "ConfigError", "RunError"]
