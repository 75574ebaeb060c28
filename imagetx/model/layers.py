"""Dropout, the feed-forward block and the post-LN residual.

Each is the plain textbook code; in training on CPU the same computation runs through a lean
kernel of model/kernels.py (less time or memory, same result), unless `reference_mode()` is on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imagetx.model import kernels


def _compiling_or_autocast(x: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type)


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
    """The position-wise FFN: Linear(d, d_ff), ReLU, Linear(d_ff, d). Training in full precision
    runs through kernels.feed_forward (ReLU in place)."""

    def __init__(self, d: int, d_ff: int):
        super().__init__(nn.Linear(d, d_ff), nn.ReLU(), nn.Linear(d_ff, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not kernels.enabled() or not torch.is_grad_enabled() or _compiling_or_autocast(x):
            return super().forward(x)
        first, _, second = self
        return kernels.feed_forward(x, first.weight, first.bias, second.weight, second.bias)


def residual_dropout_layer_norm(x, f, norm: nn.LayerNorm, p: float, training: bool) -> torch.Tensor:
    """LayerNorm(x + dropout(f)) for post-LN layers; x, f float (..., d). Training in full
    precision keeps only the output for the backward (kernels.residual_dropout_layer_norm)."""
    p = p if training else 0.0
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or f.requires_grad)
    if not kernels.enabled() or not needs_grad or torch.is_autocast_enabled(x.device.type):
        # inference, mixed precision (autograd's own path handles the dtypes), or the reference
        return norm(x + dropout(f, p, training=p > 0))
    return kernels.residual_dropout_layer_norm(x, f, norm.weight, norm.bias, p, norm.eps)
