"""Dropout, the feed-forward block and the post-LN residual.

Each is the plain textbook code; in training on CPU the same computation runs through a lean
kernel of model/kernels.py (less time or memory, same result), unless `reference_mode()` is on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imagetx.model import kernels


def _kernel_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype a training kernel computes in for x: x's own, or the autocast dtype under CPU
    autocast; None where the plain code runs instead (reference mode, no grad, compiling, or
    autocast on another device, whose own dtype handling applies)."""
    if not kernels.enabled() or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    autocast = kernels.autocast_dtype(x.device.type)
    if autocast is None:
        return x.dtype
    return autocast if x.device.type == "cpu" else None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout(x, p, training); on CPU with a one-byte mask (kernels.dropout)."""
    if not training or p == 0:
        return x
    if kernels.enabled() and x.device.type == "cpu" and not torch.compiler.is_compiling():
        return kernels.dropout(x, p)
    return F.dropout(x, p, training=True)


class Dropout(nn.Dropout):
    """nn.Dropout through `dropout` above; same attribute (p) and no state."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class FeedForward(nn.Sequential):
    """The position-wise FFN: Linear(d, d_ff), ReLU, Linear(d_ff, d). Training runs through
    kernels.feed_forward (ReLU in place), in the autocast dtype under CPU autocast."""

    def __init__(self, d: int, d_ff: int):
        super().__init__(nn.Linear(d, d_ff), nn.ReLU(), nn.Linear(d_ff, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _kernel_dtype(x)
        if dtype is None:
            return super().forward(x)
        first, _, second = self
        return kernels.feed_forward(x, first.weight, first.bias, second.weight, second.bias, dtype)


def residual_dropout_layer_norm(x, f, norm: nn.LayerNorm, p: float, training: bool) -> torch.Tensor:
    """LayerNorm(x + dropout(f)) for post-LN layers; x, f float (..., d), the sum in the wider of
    their dtypes (under autocast x is the float32 residual stream, f a bfloat16 sublayer output).
    Training keeps only the output for the backward (kernels.residual_dropout_layer_norm)."""
    p = p if training else 0.0
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or f.requires_grad)
    if not needs_grad or _kernel_dtype(x) is None:
        # inference, the reference, or autocast on a device with its own dtype handling
        return norm(x + dropout(f, p, training=p > 0))
    return kernels.residual_dropout_layer_norm(x, f, norm.weight, norm.bias, p, norm.eps)


def embedding(rows: int, d: int) -> nn.Embedding:
    """A lookup table of rows vectors of size d, initialised N(0, 1/d) (scaled by sqrt(d) where used)."""
    emb = nn.Embedding(rows, d)
    nn.init.normal_(emb.weight, std=d**-0.5)
    return emb
