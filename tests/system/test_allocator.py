"""The allocator restart: which environment it builds, and that the command really runs under it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from imagetx.system import allocator
from imagetx.system.allocator import allocator_in_use, fast_allocator_env, find_fast_allocator
from support.configs import TINY_MODEL
from support import REPO as ROOT



@pytest.mark.parametrize("preload,kind", [
    ("", "system"),
    ("libtcmalloc_minimal.so.4", "tcmalloc"),
    ("/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4 libfoo.so", "tcmalloc"),
    ("libfoo.so /usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "jemalloc"),
    ("libmymalloc.so", "system"),
])
def test_allocator_in_use_reads_ld_preload(preload, kind):
    assert allocator_in_use({"LD_PRELOAD": preload}) == kind


def test_fast_allocator_env(monkeypatch):
    monkeypatch.setattr(allocator, "find_fast_allocator", lambda: "libtcmalloc_minimal.so.4")
    env = fast_allocator_env({"PATH": "/bin", "LD_PRELOAD": "libother.so"})
    assert env == {"PATH": "/bin", "LD_PRELOAD": "libtcmalloc_minimal.so.4 libother.so"}
    assert fast_allocator_env({})["LD_PRELOAD"] == "libtcmalloc_minimal.so.4"
    assert fast_allocator_env({"IMAGETX_ALLOCATOR": "system"}) is None  # opted out
    assert fast_allocator_env({"LD_PRELOAD": "libjemalloc.so.2"}) is None  # already preloaded: no loop
    monkeypatch.setattr(allocator, "find_fast_allocator", lambda: None)
    assert fast_allocator_env({}) is None  # nothing installed: keep malloc


TINY = [
    *TINY_MODEL, "train.batch_size=4", "train.max_steps=1", "train.eval_every=0", "train.sample_every=0",
]


def run_train(tmp_path, **env):
    sets = [a for s in (*TINY, f"train.out={tmp_path / 'run'}") for a in ("--set", s)]
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "IMAGETX_ALLOCATOR")}
    return subprocess.run(
        [sys.executable, "-m", "imagetx.cli", "train", *sets], cwd=ROOT, env={**clean, **env},
        capture_output=True, text=True, timeout=300,
    )


@pytest.mark.skipif(find_fast_allocator() is None, reason="neither tcmalloc nor jemalloc is installed")
def test_train_command_restarts_under_the_fast_allocator(tmp_path):
    proc = run_train(tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kind = allocator_in_use({"LD_PRELOAD": find_fast_allocator()})
    assert f"(memory allocator: {kind})" in proc.stderr
    assert "finished at step 1" in proc.stderr  # same arguments after the restart

    proc = run_train(tmp_path / "system", IMAGETX_ALLOCATOR="system")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(memory allocator: system)" in proc.stderr
