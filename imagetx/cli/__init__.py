"""The `imagetx` command: parse arguments, build a config, call a library function, map errors.

Results go to stdout, progress and diagnostics to stderr. Exit codes: 0 ok, 1 a runtime failure
(missing data, bad checkpoint, non-finite loss), 2 a usage error (bad flag, unknown key, bad
value), 130 after Ctrl-C (a checkpoint is saved first), 143 after SIGTERM.

This module is the console script (main); the commands are in imagetx.cli.commands, the error boundary
in imagetx.cli.boundary, the options several commands share in imagetx.cli.options and the
result tables in imagetx.cli.tables.
"""

from __future__ import annotations

import signal
import sys


def _interrupted_while_starting(signum, frame):
    sys.stderr.write("error: interrupted\n")
    raise SystemExit(130)


# The error boundary goes up before anything slow is imported (Typer here, torch in each command):
# a Ctrl-C while the console script starts is one line and exit 130, as later, not a traceback.
# Only while this module is imported; from then on main() catches the KeyboardInterrupt.
try:
    _sigint_before = signal.getsignal(signal.SIGINT)
    if _sigint_before is signal.default_int_handler:
        try:
            signal.signal(signal.SIGINT, _interrupted_while_starting)
        except ValueError:  # imported outside the main thread: nothing to install
            pass
except KeyboardInterrupt:  # it came while the handler was being installed (signal.signal runs Python code)
    _interrupted_while_starting(signal.SIGINT, None)

import importlib
import warnings

import typer

try:  # Typer >= 0.17 carries its own copy of Click
    from typer._click.exceptions import ClickException as _ClickException
    from typer._click.exceptions import NoArgsIsHelpError as _NoArgsIsHelp
except ImportError:
    from click.exceptions import ClickException as _ClickException
    from click.exceptions import NoArgsIsHelpError as _NoArgsIsHelp
from imagetx import console
from imagetx.cli.boundary import Command
from imagetx.cli.commands import app

_COMPUTE_COMMANDS = {"train", "eval-bpd", "sample", "superres", "eval-fid", "serve"}


def _import_torch_deferring_ctrl_c() -> None:
    """Import torch (and numpy through it) with SIGINT held back until the import is done.

    torch's start-up imports numpy from C++ and treats any failure as "numpy unavailable", clearing
    the error: a Ctrl-C that lands there is lost and the command runs on (a training run then goes
    on for its whole length). Elsewhere in the import a Ctrl-C can abort the process from inside a
    pybind11 callback, or leave a half-imported extension that fails as "cannot load module more
    than once". Held back, it is delivered as soon as the import ends: one `error: interrupted`
    line and exit 130, as at any later moment."""
    posix = hasattr(signal, "pthread_sigmask")  # elsewhere there is nothing to hold back
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if posix else None
    try:
        importlib.import_module("torch")
    finally:
        if posix:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:  # the module is imported: main() takes over
    signal.signal(signal.SIGINT, _sigint_before)


def main() -> None:
    """The console script: the compute commands first restart once with tcmalloc or jemalloc
    preloaded when one is installed (see imagetx.system.allocator; IMAGETX_ALLOCATOR=system to keep malloc)."""
    # library warnings (a skipped file in a data set, an outdated checkpoint) are one line on
    # stderr, like every other diagnostic
    warnings.showwarning = lambda message, *args, **kwargs: console.warn(str(message))
    try:
        if len(sys.argv) > 1 and sys.argv[1] in _COMPUTE_COMMANDS:
            from imagetx.system.allocator import restart_with_fast_allocator

            restart_with_fast_allocator()
            _import_torch_deferring_ctrl_c()
        code = app(standalone_mode=False, prog_name="imagetx")
    except _ClickException as exc:  # Typer's own usage errors, in the same one-line form as ours
        if isinstance(exc, _NoArgsIsHelp):
            typer.echo(exc.format_message())
        else:
            command = " ".join(a for a in sys.argv[1:2] if not a.startswith("-"))
            console.error(f"{exc.format_message()} (see: imagetx {command + ' ' if command else ''}--help)")
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):  # Ctrl-C while Python, torch or the command starts up
        console.error("interrupted")
        sys.exit(130)
    if code == 130 and not Command.ran:  # Ctrl-C while the arguments were parsed: Typer's silent 130
        console.error("interrupted")
    sys.exit(code if isinstance(code, int) else 0)
