"""Every expected failure imagetx raises: each carries one line for the user (ConfigError: one
line per problem); the CLI prints it as `error: ...` and exits 2 (ConfigError, a usage error) or
1 (the others, runtime failures). Anything else escaping to the CLI is a bug."""

from __future__ import annotations


class ConfigError(ValueError):
    """An invalid configuration or argument; the message lists every problem, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


def raise_problems(problems: list[str]) -> None:
    """Raise one ConfigError listing every problem, if there are any (the end of every
    `problems()` check: configs, command arguments)."""
    if problems:
        raise ConfigError(problems)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, not from imagetx, or incompatible with this version.
    The message names the file and what is wrong."""


class RunError(RuntimeError):
    """A training or evaluation run that cannot start or has to stop (unusable output directory,
    non-finite loss, incompatible data)."""


class ImageFileError(RunError):
    """An input image that cannot be used; the message names the file and the problem."""


class DatasetError(Exception):
    """Missing or malformed data. First line: the problem and what to do; then details."""


__all__ = ["CheckpointError", "ConfigError", "DatasetError", "ImageFileError", "RunError", "raise_problems"]
