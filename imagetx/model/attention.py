"""Masked self-attention in the three patterns (local 1D, local 2D, full) and cross-attention.

Each pattern has a fast path (blocked: every query block attends to a fixed window of keys,
so cost grows linearly with the image) and the dense reference (one (Lp, Lp) boolean mask built
from the definitions, see layout.dense_mask), which the tests hold the fast paths to. Local 1D
has two fast paths: on CPU in float32, two flash-attention calls straight on the qkv projection
(_Local1DFlash); elsewhere, the key windows and an additive mask (_blocked).
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


_flash_forward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_flash_backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _block_views(qkv: torch.Tensor, heads: int, block: int):
    """qkv (B, L, 3 * h * hd) -> q, k, v as (B * nb, h, block, hd) views, no copy: every block of
    every image is one batch entry, so block m's previous block is entry m - 1."""
    B, L, three_a = qkv.shape
    t = qkv.view(B * (L // block), block, 3, heads, three_a // (3 * heads))
    return tuple(t[:, :, i].transpose(1, 2) for i in range(3))


class _Local1DFlash(torch.autograd.Function):
    """Local 1D attention on CPU straight from the fused qkv projection, with no copies.

    A query block attends to its own block causally and to the whole previous block. The two
    halves are separate flash-attention calls on strided views of qkv (own block: entries m with
    is_causal; previous block: queries of entry m, keys of entry m - 1) merged by their
    log-sum-exps. The first block of each image has no previous block: its log-sum-exp there is
    -inf. The backward runs the flash backward of each half with the merged output and
    log-sum-exp, which is exactly that half's share of the gradient (the split used by ring
    attention); +inf in place of the log-sum-exp gives the excluded half zero weight.
    Replaces the window copies, the additive mask and the layout copies around them.
    """

    @staticmethod
    def forward(ctx, qkv, heads: int, block: int):
        B, L, three_a = qkv.shape
        n = B * (L // block)
        scale = (three_a // (3 * heads)) ** -0.5
        q, k, v = _block_views(qkv, heads, block)
        o, lse = _flash_forward(q, k, v, 0.0, True, scale=scale)  # o: (n, h, block, hd), memory (n, block, h, hd)
        first = None
        if n > 1:
            o_prev, lse_prev = _flash_forward(q[1:], k[:-1], v[:-1], 0.0, False, scale=scale)
            first = (torch.arange(1, n, device=qkv.device) % (L // block) == 0).view(-1, 1, 1)
            lse_prev = lse_prev.masked_fill(first, float("-inf"))
            merged = torch.logaddexp(lse[1:], lse_prev)
            o[1:].lerp_(o_prev, torch.exp(lse_prev - merged).unsqueeze(-1))  # weights of the two halves
            lse[1:] = merged
        ctx.save_for_backward(qkv, o, lse, first)
        ctx.heads, ctx.block, ctx.scale = heads, block, scale
        return o.transpose(1, 2).reshape(B, L, three_a // 3)  # (B, L, h * hd), a view when o is (n, block, h, hd) in memory

    @staticmethod
    def backward(ctx, grad):
        qkv, o, lse, first = ctx.saved_tensors
        heads, block, scale = ctx.heads, ctx.block, ctx.scale
        B, L, three_a = qkv.shape
        n = B * (L // block)
        q, k, v = _block_views(qkv, heads, block)
        g = grad.reshape(n, block, heads, -1).transpose(1, 2)  # (n, h, block, hd)
        dq, dk, dv = _flash_backward(g, q, k, v, o, lse, 0.0, True, scale=scale)
        out = torch.empty_like(qkv)
        gq, gk, gv = _block_views(out, heads, block)
        if n == 1:
            for dst, src in ((gq, dq), (gk, dk), (gv, dv)):
                dst.copy_(src)
            return out, None, None
        lse_prev = lse[1:].masked_fill(first, float("inf"))
        dq_p, dk_p, dv_p = _flash_backward(g[1:], q[1:], k[:-1], v[:-1], o[1:], lse_prev, 0.0, False, scale=scale)
        # Both halves' shares summed straight into the gradient of qkv: the queries of entry m
        # also attended to entry m - 1; the keys and values of entry m also served entry m + 1.
        torch.add(dq[1:], dq_p, out=gq[1:])
        gq[:1].copy_(dq[:1])
        for dst, own, prev in ((gk, dk, dk_p), (gv, dv, dv_p)):
            torch.add(own[:-1], prev, out=dst[:-1])
            dst[-1:].copy_(own[-1:])
        return out, None, None


def local1d_flash(qkv: torch.Tensor, heads: int, block: int) -> torch.Tensor:
    """Local 1D causal attention from qkv (B, L, 3 * h * hd) -> (B, L, h * hd), see _Local1DFlash.
    L need not divide into blocks (the tail is padded)."""
    L = qkv.shape[1]
    pad = -L % block
    if pad:
        qkv = F.pad(qkv, (0, 0, 0, pad))
    o = _Local1DFlash.apply(qkv.contiguous(), heads, block)
    return o[:, :L] if pad else o


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
        p = self.dropout if self.training else 0.0
        if self.kind == "cross":
            q = self._heads(self.q(x))
            k, v = (self._heads(t) for t in self.kv(memory).chunk(2, dim=-1))
        else:
            qkv = self.qkv(x)
            if self._use_local1d_flash(qkv, p):
                return self.out(local1d_flash(qkv, self.n_heads, self.layout.block))
            q, k, v = (self._heads(t) for t in qkv.chunk(3, dim=-1))
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

    def _use_local1d_flash(self, qkv: torch.Tensor, p: float) -> bool:
        """The copy-free local 1D path: CPU, float32, no attention dropout, flash kernels present.
        Otherwise (CUDA, autocast, attention dropout) local 1D runs through the windows and mask
        of _blocked."""
        return (
            self.kind == "local1d" and not self.use_dense_reference and p == 0.0
            and qkv.device.type == "cpu" and qkv.dtype == torch.float32 and _flash_backward is not None
        )

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
