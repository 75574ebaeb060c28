"""torch.compile on a machine that cannot build its code: a warning and eager execution, never a
traceback (imagetx.system.compiling)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from imagetx.storage.checkpoint import model_state_dict, unwrap_model
from imagetx.system import compiling
from support.configs import TINY_MODEL
from support import REPO as ROOT



@pytest.fixture
def toolchain(monkeypatch, tmp_path):
    """A machine with exactly the tools named in `have` (and Python.h unless headers=False)."""

    def machine(have=(), headers=True, triton=True):
        for name in ("CC", "CXX"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr(compiling.shutil, "which", lambda name: f"/usr/bin/{name}" if name in have else None)
        include = tmp_path / "include"
        include.mkdir(exist_ok=True)
        (include / "Python.h").unlink(missing_ok=True)
        if headers:
            (include / "Python.h").write_text("")
        monkeypatch.setattr(compiling.sysconfig, "get_paths", lambda: {"include": str(include)})
        find_spec = compiling.importlib.util.find_spec
        monkeypatch.setattr(compiling.importlib.util, "find_spec", lambda name, *a: (
            (object() if triton else None) if name == "triton" else find_spec(name, *a)))
        return include

    return machine


def test_what_compiling_needs_is_named_per_device(toolchain, monkeypatch):
    toolchain(have=("gcc", "g++"))
    assert compiling.toolchain_problems("cuda") == [] and compiling.toolchain_problems("cpu") == []
    toolchain(have=("clang",))  # Triton takes clang where there is no gcc; Inductor's C++ needs g++
    assert compiling.toolchain_problems("cuda:1") == []
    assert compiling.toolchain_problems("cpu") == ["no C++ compiler ($CXX or g++)"]
    toolchain(have=("g++",))
    assert compiling.toolchain_problems("cuda") == ["no C compiler ($CC, gcc or clang)"]
    monkeypatch.setenv("CC", "/opt/missing-cc")  # an explicit choice is the one that counts
    monkeypatch.setenv("CXX", "/opt/missing-c++")
    missing_cc = "no C compiler ($CC, gcc or clang): /opt/missing-cc not found"
    assert compiling.toolchain_problems(torch.device("cuda", 0)) == [missing_cc]
    assert compiling.toolchain_problems("cpu") == ["no C++ compiler ($CXX or g++): /opt/missing-c++ not found"]
    include = toolchain(have=("gcc", "g++"), headers=False, triton=False)
    headers = f"no Python headers (Python.h in {include}; e.g. the python3-dev package)"
    no_triton = "Triton is not installed (it comes with torch's CUDA wheels)"
    assert compiling.toolchain_problems("cuda") == [no_triton, headers]
    assert compiling.toolchain_problems("cpu") == [headers]


def test_a_machine_without_a_compiler_runs_eagerly_with_one_warning(toolchain):
    toolchain(have=("g++",))
    module = nn.Linear(3, 2)
    with pytest.warns(UserWarning) as caught:
        assert compiling.compile_or_eager(module, "cuda") is module
    assert [str(w.message) for w in caught] == [
        "torch.compile cannot build code here, so the model runs eagerly (slower): no C compiler ($CC, gcc or clang)"
    ]


class Recorder(nn.Module):
    """A layer that counts its eager calls and has a method of its own, like DDP's no_sync; its
    tanh makes Inductor generate (and build) a C++ kernel on CPU."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.eager_calls = 0

    def forward(self, x):
        if not torch.compiler.is_compiling():
            self.eager_calls += 1
        return torch.tanh(self.linear(x))

    def no_sync(self):
        return "no_sync of the wrapped module"


def test_a_build_that_fails_at_the_first_call_falls_back_to_eager():
    """Inductor without a working C++ compiler fails when it builds the first graph; that call
    and every later one run eagerly, with one warning, and the wrapper is invisible elsewhere."""
    import torch._inductor.config as inductor

    # inductor's own patch, not monkeypatch: monkeypatch's undo deletes a config entry it read as
    # missing, and later compiles in the same process then fail (the compiled-step tests)
    with inductor.patch({"cpp.cxx": (None, "/opt/no-such-c++")}):
        _fails_at_the_first_call_then_eager()


def _fails_at_the_first_call_then_eager():
    module = Recorder()
    wrapped = compiling.CompiledOrEager(module)
    x = torch.randn(4, 3)
    message = "torch.compile could not build the model, so it runs eagerly .*C\\+\\+ compiler"
    with pytest.warns(UserWarning, match=message):
        assert torch.equal(wrapped(x), module(x))
    assert not wrapped.compiled and module.eager_calls == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second attempt
        assert torch.equal(wrapped(x), module(x))
    assert module.eager_calls == 4
    assert wrapped.no_sync() == "no_sync of the wrapped module"
    assert list(wrapped.parameters()) == list(module.parameters())  # listed once, for the optimizer
    assert unwrap_model(wrapped) is module and model_state_dict(wrapped).keys() == module.state_dict().keys()


def test_train_with_compile_on_a_machine_without_a_compiler_warns_and_trains(tmp_path):
    """The whole command, as a user without g++ meets it: one warning line, no traceback, exit 0."""
    sets = [*TINY_MODEL, "train.max_steps=2", "train.eval_every=0", "train.sample_every=0", "train.compile=true",
            "train.device=cpu", "train.log_every=1"]
    env = dict(os.environ, CXX=str(tmp_path / "no-such-c++"), IMAGETX_ALLOCATOR="system", PYTHONPATH=str(ROOT))
    args = [a for s in sets for a in ("--set", s)]
    result = subprocess.run([sys.executable, "-c", "from imagetx.cli import main; main()", "train", "--out",
                             str(tmp_path / "run"), *args], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning: torch.compile")]
    assert warned == [f"warning: torch.compile cannot build code here, so the model runs eagerly (slower): "
                      f"no C++ compiler ($CXX or g++): {tmp_path / 'no-such-c++'} not found"]
    assert (tmp_path / "run" / "checkpoints" / "step-00000002.pt").exists()
