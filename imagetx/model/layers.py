"""Dropout, the feed-forward block and the post-LN residual, lean in time and memory on CPU.

`keep_mask` draws dropout's keep mask from 16 random bits per element (four elements per 64-bit
draw of the default generator), about 4x faster on CPU than `rand_like(x) >= p`; p is rounded to
a multiple of 1/65536 and the scale uses the rounded value, so the expectation is exact.

The post-LN residual LayerNorm(x + dropout(f)) is one autograd function. Autograd's own version
keeps, per sublayer, the LayerNorm's input and a float dropout mask: two extra (B, L, d) tensors.
This one keeps the output (which the next linear layer keeps anyway, so it costs nothing), the
per-row 1/std and a one-byte mask, and recovers the normalized input in the backward pass as
(y - beta) / gamma (the "memory-efficient" LayerNorm of NVIDIA Apex). At the published CIFAR-10
config that is about 1 GB less per training step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_LEVELS = 1 << 16


def keep_mask(like: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """Dropout with rate 0 < p < 1 for a tensor shaped like `like`: (keep, scale), keep uint8 0/1
    of like's shape, scale = 1 / P(keep). Uses the default generator (so torch.manual_seed and
    activation checkpointing's RNG replay apply)."""
    levels = round(p * _LEVELS)
    if like.device.type == "cpu" and 0 < levels < _LEVELS and not torch.compiler.is_compiling():
        n = like.numel()
        bits = torch.empty(-(-n // 4), dtype=torch.int64).random_(-(2**63), None)  # full 64-bit range
        keep = bits.view(torch.int16)[:n] >= levels - _LEVELS // 2  # P = 1 - levels / 65536
        return keep.view(like.shape).view(torch.uint8), _LEVELS / (_LEVELS - levels)
    keep = torch.rand(like.shape, device=like.device) >= p
    return keep.view(torch.uint8), 1.0 / (1.0 - p)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float):
        keep, scale = keep_mask(x, p)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout with a one-byte mask and fast CPU random bits (see keep_mask); other devices and
    torch.compile use F.dropout itself."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.dropout(x, p, training=True)
    return _Dropout.apply(x, p)


class Dropout(nn.Dropout):
    """nn.Dropout through `dropout` above; same attribute (p) and no state."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class _FeedForward(torch.autograd.Function):
    """relu(x W1^T + b1) W2^T + b2 with the ReLU and its backward in place. Autograd's version
    allocates both anew (two tokens x d_ff tensors per layer and step) and, with an in-place
    ReLU on the view that linear returns, adds two more copies in the backward."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        x2 = x.reshape(-1, x.shape[-1])  # (tokens, d)
        h = torch.addmm(b1, x2, w1.t()).clamp_min_(0)  # (tokens, d_ff)
        y = torch.addmm(b2, h, w2.t())
        ctx.save_for_backward(x2, h, w1, w2)
        ctx.shape = x.shape
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_y):
        x2, h, w1, w2 = ctx.saved_tensors
        gy = grad_y.reshape(-1, grad_y.shape[-1])  # (tokens, d)
        gh = gy @ w2
        torch.ops.aten.threshold_backward.grad_input(gh, h, 0, grad_input=gh)  # zero where relu was off
        gx = (gh @ w1).view(ctx.shape) if ctx.needs_input_grad[0] else None
        return gx, gh.t() @ x2, gh.sum(0), gy.t() @ h, gy.sum(0)


class FeedForward(nn.Sequential):
    """The position-wise FFN: Linear(d, d_ff), ReLU, Linear(d_ff, d). Training in full precision
    runs through _FeedForward; inference, autocast and torch.compile use the modules as they are."""

    def __init__(self, d: int, d_ff: int):
        super().__init__(nn.Linear(d, d_ff), nn.ReLU(), nn.Linear(d_ff, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type) or torch.compiler.is_compiling():
            return super().forward(x)
        first, _, second = self
        return _FeedForward.apply(x, first.weight, first.bias, second.weight, second.bias)


class _ResidualDropoutLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, f, weight, bias, p: float, eps: float):
        keep, scale = None, 1.0
        if p > 0:
            keep, scale = keep_mask(f, p)
            s = torch.addcmul(x, f, keep, value=scale)  # x + f * keep * scale in one pass
        else:
            s = x + f
        y, _, rstd = torch.native_layer_norm(s, (x.shape[-1],), weight, bias, eps)
        ctx.scale = scale
        ctx.save_for_backward(y, rstd, weight, bias, keep)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        y, rstd, weight, bias, keep = ctx.saved_tensors
        # |gamma| is kept away from 0 only to avoid dividing by zero; trained gammas sit near 1.
        inv_w = 1.0 / torch.where(weight.abs() < 1e-6, torch.full_like(weight, 1e-6), weight)
        xhat = torch.addcmul(-bias * inv_w, y, inv_w)  # (y - beta) / gamma in one pass
        zeros = torch.zeros_like(rstd)
        # LayerNorm's backward evaluated at its normalized input (mean 0, 1/std 1), then rescaled
        grad_xhat, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
            grad_y.contiguous(), xhat, (y.shape[-1],), zeros, torch.ones_like(rstd), weight, bias,
            [True, True, True],
        )
        grad_s = grad_xhat.mul_(rstd)
        grad_f = grad_s if keep is None else grad_s.mul(keep).mul_(ctx.scale)
        return grad_s, grad_f, grad_w, grad_b, None, None


def residual_dropout_layer_norm(x, f, norm: nn.LayerNorm, p: float, training: bool) -> torch.Tensor:
    """LayerNorm(x + dropout(f)) for post-LN layers; x, f float (..., d)."""
    p = p if training else 0.0
    if not (torch.is_grad_enabled() and (x.requires_grad or f.requires_grad)) or torch.is_autocast_enabled(x.device.type):
        # inference, or mixed precision (where autograd's own path handles the dtypes)
        return norm(x + dropout(f, p, training=p > 0))
    return _ResidualDropoutLayerNorm.apply(x, f, norm.weight, norm.bias, p, norm.eps)
