"""The run-directory lock: one trainer at a time, and a killed trainer's lock is taken over."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from imagetx.errors import RunError
from imagetx.system.lock import RunLock

HOLD = """
import sys, time
from imagetx.system.lock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_process_is_refused_and_a_killed_holder_releases_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunError, match=rf"in use by process {holder.pid} on .*: wait for it"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: no cleanup runs
        holder.wait()
    deadline = time.monotonic() + 10
    while True:  # the kernel releases the lock with the process
        try:
            lock = RunLock(tmp_path).acquire()
            break
        except RunError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert "process " in (tmp_path / ".lock").read_text()
    lock.release()
    with RunLock(tmp_path):  # and again, after a clean release
        pass


def test_a_second_trainer_on_a_run_gets_one_line(tmp_path):
    from support.cli import invoke, one_error_line, sets

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        one_error_line(invoke("train", "--out", out, "--resume", "auto", "--max-steps", 1, *sets()), 1,
                       f"is in use by process {holder.pid}")
        assert [p.name for p in out.iterdir()] == [".lock"]  # the trainer wrote nothing
    finally:
        holder.kill()
        holder.wait()
    result = invoke("train", "--out", out, "--resume", "auto", "--max-steps", 1, *sets())
    assert result.exit_code == 0, result.output  # the killed holder's lock is taken over
    assert not (out / ".lock").exists()
