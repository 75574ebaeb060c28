"""torch.compile where this machine can build the code it generates; eager execution otherwise.

torch.compile compiles what it generates with the system's tools: on CUDA, Triton builds each
kernel's launcher with a C compiler ($CC, else gcc or clang) against Python's headers; on CPU,
Inductor builds C++ kernels with $CXX (else g++), also against Python.h. A machine without them
(a slim container, a fresh cloud image) would fail at the first training step with a long
traceback. Instead, a missing tool is one warning that names it, before any work, and the model
runs eagerly; a build that fails for any other reason falls back the same way at that call.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sysconfig
import warnings
from pathlib import Path

import torch
from torch import nn


def toolchain_problems(device: torch.device | str) -> list[str]:
    """What torch.compile needs to build code for `device` that this machine lacks, one phrase
    per missing tool; [] when nothing is missing."""
    device = torch.device(device)
    problems = []
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            problems.append("Triton is not installed (it comes with torch's CUDA wheels)")
        chosen, fallbacks, what = os.environ.get("CC"), ("gcc", "clang"), "C compiler ($CC, gcc or clang)"
    else:
        chosen, fallbacks, what = os.environ.get("CXX"), ("g++",), "C++ compiler ($CXX or g++)"
    if not any(shutil.which(name) for name in ([chosen] if chosen else fallbacks)):
        problems.append(f"no {what}" + (f": {chosen} not found" if chosen else ""))
    headers = Path(sysconfig.get_paths()["include"])
    if not (headers / "Python.h").is_file():
        problems.append(f"no Python headers (Python.h in {headers}; e.g. the python3-dev package)")
    return problems


class CompiledOrEager(nn.Module):
    """`module` through torch.compile until a build fails, then `module` itself, eagerly.

    Attributes it does not have are looked up on `module`, as torch.compile's own wrapper does
    (DDP's no_sync, for one); the wrapped module is `_orig_mod`, the name checkpoint.unwrap_model
    and the state-dict prefixes already know."""

    def __init__(self, module: nn.Module, **options):
        super().__init__()
        self._orig_mod = module
        # kept out of the submodules: its parameters are module's, and would be listed twice
        self.__dict__["_compiled"] = torch.compile(module, **options)

    @property
    def compiled(self) -> bool:
        """False once a build failed and calls run eagerly."""
        return self.__dict__["_compiled"] is not None

    def forward(self, *args, **kwargs):
        compiled = self.__dict__["_compiled"]
        if compiled is not None:
            # imported here: torch._dynamo pulls in Triton, a second of start-up for every run
            from torch._dynamo.exc import BackendCompilerFailed  # Inductor's build errors derive from it

            try:
                return compiled(*args, **kwargs)
            except BackendCompilerFailed as exc:
                # the build fails before the graph runs: nothing was computed or changed, so the
                # same call runs again eagerly
                self.__dict__["_compiled"] = None
                reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
                warnings.warn(f"torch.compile could not build the model, so it runs eagerly (slower): {reason}",
                              stacklevel=2)
        return self._orig_mod(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "_orig_mod":  # not set yet: no wrapped module to ask
                raise
            return getattr(self._orig_mod, name)


def compile_or_eager(module: nn.Module, device: torch.device | str, **options) -> nn.Module:
    """`module` through torch.compile(module, **options) (a CompiledOrEager) where this machine
    has what compiling for `device` needs; otherwise `module` itself, with one warning that
    names what is missing."""
    problems = toolchain_problems(device)
    if problems:
        missing = "; ".join(problems)
        warnings.warn(f"torch.compile cannot build code here, so the model runs eagerly (slower): {missing}",
                      stacklevel=2)
        return module
    return CompiledOrEager(module, **options)
