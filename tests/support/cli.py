"""The `imagetx` command run in-process (Typer's runner), and its one-line errors."""

from __future__ import annotations

from typer.testing import CliRunner

from imagetx.cli import app
from support.configs import TINY_MODEL


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def sets(*items: str) -> list[str]:
    return [a for s in (*TINY, *items) for a in ("--set", s)]


def one_error_line(result, code: int, text: str):
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], result.stderr
    assert "Traceback" not in result.output


TINY = [
    *TINY_MODEL, "train.batch_size=4", "train.log_every=1", "train.eval_every=0", "train.sample_every=2",
    "train.sample_count=2", "train.checkpoint_every=0",
]
