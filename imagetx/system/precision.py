"""Which floating-point precision a command computes in, and why.

"auto" picks bf16 where the hardware multiplies bf16 matrices natively: GPUs of compute
capability 8.0 or more (Ampere and newer; older ones only emulate it), and CPUs with AVX512-BF16
or AMX (read from the processor's feature flags, not from a timing). Everything else
computes in fp32. "fp32" and "bf16" force it; bf16 forced on a CPU without native bf16 runs, with
a warning that it will be slow.

bf16 here means mixed precision: the weights the optimizer updates, its state, the loss, the
log-softmax and every reported number stay fp32; matrix products (and, in sampling, the cached
keys and values) are bf16.
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch

from imagetx.system.cpu import cpu_bf16_features

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Precision:
    """A resolved precision: `bf16` True for bf16 mixed precision; `reason` says why, in words."""

    bf16: bool
    reason: str

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    def describe(self) -> str:
        return f"{'bf16 mixed precision' if self.bf16 else 'fp32'} ({self.reason})"

    def autocast(self, device: torch.device) -> AbstractContextManager:
        """bf16 autocast on `device` when bf16, else autocast off (fp32 throughout)."""
        if self.bf16:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return torch.autocast(device.type, enabled=False)


FP32 = Precision(False, "exact")


@contextmanager
def float32_matmuls(precision: str):
    """Within the block, float32 matrix products on CUDA compute at `precision`
    (torch.set_float32_matmul_precision: "highest" exact, "high" TF32); restored after."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def training_matmuls(precision: Precision, device: torch.device) -> AbstractContextManager:
    """What a training run's float32 products compute in: TF32 on a GPU when training in fp32
    (10-bit mantissas in the products, fp32 sums: the usual fp32 training on Ampere and newer,
    several times faster than exact fp32); exact everywhere else (on CPU torch would let oneDNN
    use bf16 for it). Held-out evaluation inside runs under float32_matmuls("highest")."""
    if device.type == "cuda" and not precision.bf16:
        return float32_matmuls("high")
    return float32_matmuls(torch.get_float32_matmul_precision())


def precision_problems(value, name: str = "--precision") -> list[str]:
    """The one check of a precision name: [] or the problem in words."""
    if value in PRECISIONS:
        return []
    return [f"{name} must be one of {', '.join(PRECISIONS)}; got {value!r}"]


def cuda_native_bf16() -> bool:
    """Whether the current CUDA device multiplies bf16 natively (compute capability >= 8.0), not
    counting the emulation that torch >= 2.4 also reports as "supported" by default."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch without the keyword counts native support only
        return torch.cuda.is_bf16_supported()


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """(whether `device` multiplies bf16 matrices natively, the evidence in words). On CUDA it
    asks about the current device: select_device made it the one computed on."""
    if device.type == "cuda":
        if cuda_native_bf16():
            return True, "this GPU has native bf16"
        return False, "this GPU has no native bf16 (it needs compute capability 8.0 or more: Ampere or newer)"
    if device.type == "cpu":
        features = cpu_bf16_features()
        if features:
            return True, f"this CPU has {' and '.join(f.upper().replace('_', '-') for f in features)}"
        return False, "this CPU has no native bf16 (neither AMX-BF16 nor AVX512-BF16)"
    return False, f"no native bf16 detection for {device.type}"


def resolve(requested: str, device: torch.device | str, default_reason: str = "") -> Precision:
    """"auto" | "fp32" | "bf16" on `device` -> Precision. Forcing bf16 where it is not native
    warns (UserWarning, shown as one `warning:` line by the CLI)."""
    if requested not in PRECISIONS:
        raise ValueError(precision_problems(requested, "precision")[0])
    device = torch.device(device)
    native, why = native_bf16(device)
    if requested == "fp32":
        return Precision(False, default_reason or "chosen")
    if requested == "bf16":
        if not native:
            warnings.warn(f"bf16 was chosen but {why}: it runs, emulated and slowly; "
                          "fp32 (precision auto or fp32) is faster here", stacklevel=2)
        return Precision(True, "chosen")
    return Precision(native, f"auto: {why}")
