"""Masked self-attention in the three patterns (local 1D, local 2D, full) and cross-attention.

Each pattern has a fast path (blocked: every query block attends to a fixed window of keys,
so cost grows linearly with the image) and the dense reference (one (Lp, Lp) boolean mask built
from the definitions, see layout.dense_mask), which the tests hold the fast path to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imagetx.model.config import ModelConfig
from imagetx.model.layout import Layout


def _sdpa(q, k, v, mask=None, dropout=0.0, causal=False):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)


def window_bias(window_mask: torch.Tensor, n_heads: int, dtype=torch.float32) -> torch.Tensor:
    """bool (blocks, block, window) -> additive mask (1, heads * blocks, block, window) of 0 / -inf."""
    nb, lq, nk = window_mask.shape
    bias = torch.zeros(window_mask.shape, dtype=dtype).masked_fill(~window_mask, float("-inf"))
    return bias.unsqueeze(0).expand(n_heads, nb, lq, nk).reshape(1, n_heads * nb, lq, nk)


class _Local1DWindows(torch.autograd.Function):
    """t (B, h, L, hd) -> windows (B, h * nb, 2 * lq, hd): [previous block | own block].

    The windows overlap, so they are one strided view of a single copy of t: window (head j,
    block b) starts at block j * nb + b - 1 of a flat buffer with one leading block of zeros.
    Block 0's memory half is the previous head's last block (or the zeros): always masked.
    The backward adds the two halves' gradients back (autograd's generic as_strided backward
    does the same with index arithmetic, several times slower).
    """

    @staticmethod
    def forward(ctx, t, lq: int, nb: int):
        B, h, L, hd = t.shape
        ctx.shape = t.shape
        flat = t.new_zeros(B, h * nb + 1, lq, hd)
        flat[:, 1:].view(B, h, nb * lq, hd)[:, :, :L] = t
        return flat.as_strided((B, h * nb, 2 * lq, hd), (flat.stride(0), lq * hd, hd, 1))

    @staticmethod
    def backward(ctx, grad):
        B, h, L, hd = ctx.shape
        lq = grad.shape[2] // 2
        g = grad[:, :, lq:].clone(memory_format=torch.contiguous_format)  # (B, h*nb, lq, hd): block m as its own window's block
        g[:, :-1] += grad[:, 1:, :lq]  # block m as the memory half of window m + 1
        return g.view(B, h, -1, hd)[:, :, :L], None, None


def local1d_windows(t: torch.Tensor, block: int, num_blocks: int) -> torch.Tensor:
    """t (B, h, L, hd) -> windows (B, h * num_blocks, 2 * block, hd), see _Local1DWindows."""
    return _Local1DWindows.apply(t, block, num_blocks)


def local2d_windows(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    """t (B, h, Lp, hd) in block-raster layout -> windows (B, h * num_blocks, kh*kw, hd)."""
    B, h, _, hd = t.shape
    qh, qw = layout.query_shape
    fh, fw = layout.flange
    Hp, Wp = layout.padded_grid
    nbh, nbw = Hp // qh, Wp // qw
    g = t.view(B, h, nbh, nbw, qh, qw, hd).permute(0, 1, 2, 4, 3, 5, 6)  # (B, h, nbh, qh, nbw, qw, hd)
    g = g.reshape(B, h, Hp, Wp, hd)
    g = F.pad(g, (0, 0, fw, fw, fh, 0))  # (B, h, fh + Hp, Wp + 2fw, hd)
    w = g.unfold(2, fh + qh, qh).unfold(3, qw + 2 * fw, qw)  # (B, h, nbh, nbw, hd, kh, kw)
    w = w.permute(0, 1, 2, 3, 5, 6, 4)  # (B, h, nbh, nbw, kh, kw, hd)
    return w.reshape(B, h * nbh * nbw, (fh + qh) * (qw + 2 * fw), hd)


class Attention(nn.Module):
    """Multi-head attention without biases (as published), in one of the patterns.

    kind: "local1d" | "local2d" | "full" (causal self-attention over `layout`), "bidirectional"
    (encoder self-attention) or "cross" (queries from x, keys and values from `memory`).
    """

    def __init__(self, config: ModelConfig, kind: str, layout: Layout | None = None):
        super().__init__()
        d, a = config.d_model, config.attn_dim
        self.kind = kind
        self.layout = layout
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        self.use_dense_reference = False  # tests switch this on to run the dense masked path
        if kind == "cross":
            self.q = nn.Linear(d, a, bias=False)
            self.kv = nn.Linear(d, 2 * a, bias=False)
        else:
            self.qkv = nn.Linear(d, 3 * a, bias=False)
        self.out = nn.Linear(a, d, bias=False)
        self._mask_config = config
        self._dense = None

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, L, _ = t.shape
        return t.view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # (B, h, L, hd)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x float (B, Lp, d) in internal layout -> (B, Lp, d).

        memory: encoder output (B, S, d) for cross-attention. bias: the local patterns' additive
        window mask (1, heads * blocks, block, window), shared by all layers (see window_bias).
        """
        B, L, _ = x.shape
        if self.kind == "cross":
            q = self._heads(self.q(x))
            k, v = (self._heads(t) for t in self.kv(memory).chunk(2, dim=-1))
        else:
            q, k, v = (self._heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        p = self.dropout if self.training else 0.0
        if self.kind in ("cross", "bidirectional"):
            o = _sdpa(q, k, v, dropout=p)
        elif self.use_dense_reference:
            o = _sdpa(q, k, v, mask=self.dense_mask().to(x.device), dropout=p)
        elif self.kind == "full":
            o = _sdpa(q, k, v, dropout=p, causal=True)
        else:
            o = self._blocked(q, k, v, p, bias)
        o = o.transpose(1, 2).reshape(B, L, -1)  # (B, L, h*hd)
        return self.out(o)

    def _blocked(self, q, k, v, p, bias):
        lay = self.layout
        B, h, L, hd = q.shape
        nb, lq = lay.num_blocks, lay.block
        if self.kind == "local1d":
            kw, vw = local1d_windows(k, lq, nb), local1d_windows(v, lq, nb)
            if nb * lq != L:
                q = F.pad(q, (0, 0, 0, nb * lq - L))
        else:
            kw, vw = local2d_windows(k, lay), local2d_windows(v, lay)
        # Heads and blocks share one batch dimension: 4D inputs with a 4D mask take the fused
        # (flash) kernel on CPU, which keeps no (query x key) probabilities for the backward.
        q = q.reshape(B, h * nb, lq, hd)
        o = _sdpa(q, kw, vw, mask=bias, dropout=p)  # (B, h*nb, lq, hd)
        return o.view(B, h, nb * lq, hd)[:, :, :L]

    def dense_mask(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = self.layout.dense_mask(self._mask_config)
        return self._dense
