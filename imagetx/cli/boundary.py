"""The CLI's error boundary: every failure a command expects becomes one `error: ...` line and an
exit code (imagetx.cli's docstring lists them), and every command checks its outputs alike."""

from __future__ import annotations

import os
import traceback
from contextlib import contextmanager

import typer

from imagetx import console
from imagetx.errors import CheckpointError, ConfigError, DatasetError, RunError


def one_line(exc: BaseException) -> str:
    """The user-facing line of an exception. One re-raised from a DataLoader worker carries the
    worker's whole traceback in its message: its last line is the original message."""
    text = str(exc)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    if isinstance(exc, OSError) and exc.strerror:  # disk full, permission denied, is a directory...
        where = exc.filename if exc.filename is not None else ""
        text = f"{where}: {exc.strerror}" if where else exc.strerror
    return text


class Command(typer.core.TyperCommand):
    """Usage lines name arguments plainly (`imagetx sample [OPTIONS] CHECKPOINT`), not in braces;
    a Ctrl-C anywhere in a command is one `error: interrupted` line and exit 130 (Typer alone
    turns it into a silent 130 where it lands outside the error boundary, e.g. while the command
    imports its modules)."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in super().collect_usage_pieces(ctx)]

    ran = False  # a command was invoked: it reports its own interruption (see main)

    def invoke(self, ctx):
        Command.ran = True
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            console.error("interrupted")
            raise typer.Exit(130) from None


@contextmanager
def expected_failures():
    """The CLI's one error boundary. Expected failures become one `error: ...` line on stderr and
    an exit code, never a traceback: 2 for usage (ConfigError), 1 at runtime (a checkpoint, data
    set, image or file that cannot be used, the disk full), 130 on Ctrl-C. Anything else is a bug:
    its traceback is shown with a line asking to report it. IMAGETX_DEBUG=1 shows the traceback
    of every failure."""
    debug = os.environ.get("IMAGETX_DEBUG", "") not in ("", "0")
    try:
        yield
    except ConfigError as exc:
        if debug:
            raise
        console.error("; ".join(exc.problems))
        raise typer.Exit(2) from None
    except (CheckpointError, RunError, DatasetError, OSError) as exc:
        if debug:
            raise
        # a DatasetError's first line says what is wrong; the rest shows the expected tree
        console.error(one_line(exc))
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        if debug:
            raise
        console.error("interrupted")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception:
        if debug:
            raise
        traceback.print_exc()
        console.error("this is a bug in imagetx: please report it with the traceback above and the command you ran")
        raise typer.Exit(1) from None


def check_outputs(files=(), dirs=()) -> None:
    """The one check of every command's outputs, at the boundary and before any work: each
    (flag, path) of a file to write (files) or a directory to write into (dirs), None for one
    not given. An output that is a directory where a file is meant (or the other way round), or
    in a directory that does not exist or cannot be written, is a usage error (exit 2) in every
    command alike. sample and superres make the same checks (imagetx.checks) in their own
    problems(), where they are reported together with the command's other usage errors."""
    from imagetx.checks import output_dir_problems, output_file_problems
    from imagetx.errors import raise_problems

    problems = [p for flag, path in files if path is not None for p in output_file_problems(path, flag)]
    problems += [p for flag, path in dirs if path is not None for p in output_dir_problems(path, flag)]
    raise_problems(problems)
