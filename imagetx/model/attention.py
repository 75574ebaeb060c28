"""Masked self-attention in the three patterns (local 1D, local 2D, full) and cross-attention.

Each pattern has a fast path (blocked: every query block attends to a fixed window of keys,
so cost grows linearly with the image) and the dense reference (one (Lp, Lp) boolean mask built
from the definitions, see layout.dense_mask), which the tests hold the fast paths to and which
`reference_mode()` (model/kernels.py) runs. The local patterns run as lower-right causal
attention over each group of blocks' gathered keys (_grouped: flash-class kernels on a GPU, no
mask tensor), except local 1D on CPU, which takes its own path (model/local1d.py: the flash
split in float32, block matmuls in bfloat16); relative logits, which need a mask, take the key
windows and an additive mask (_blocked), as does local 1D on CPU with attention dropout.

Decoding one position at a time, each layer's attention reads and extends a key/value cache
(model/cache.py) that holds only what its pattern can see.

model.relative (model/relative.py) enters the decoder's self-attention only: "rotary" rotates
queries and keys at their positions before anything else sees them (the keys before they enter a
cache); "logits" adds its relative logits to the additive mask of every path (the windows' mask,
a causal mask for full attention, the dense reference's mask, each cache's slice of keys); on
the CPU fast path of local 1D, whose flash kernels take no mask, attention runs as
local1d._Local1DMatmul with the logits as its bias, in either dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.backends.cuda import SDPAParams, can_use_flash_attention

from imagetx.model import kernels, local1d
from imagetx.model.cache import FullCache, Local1DCache, Local2DCache, MemoryCache, Position
from imagetx.model.config import ModelConfig
from imagetx.model.layout import Layout
from imagetx.model.relative import (
    RelativeLogits,
    RelativePositions,
    relative_bias,
    rotate,
)


def _sdpa(q, k, v, mask=None, dropout=0.0, causal=False):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)


def window_bias(window_mask: torch.Tensor, n_heads: int, dtype=torch.float32) -> torch.Tensor:
    """bool (blocks, block, window) -> additive mask (1, heads * blocks, block, window) of 0 / -inf,
    on window_mask's device."""
    nb, lq, nk = window_mask.shape
    bias = torch.zeros_like(window_mask, dtype=dtype).masked_fill(~window_mask, float("-inf"))
    return bias.unsqueeze(0).expand(n_heads, nb, lq, nk).reshape(1, n_heads * nb, lq, nk)


class CausalGroups(NamedTuple):
    """The local patterns as lower-right causal attention (layout.causal_groups), on the model's
    device: per group of blocks, how many keys its queries all see before their own block,
    and the internal positions of its real queries (blocks, n) and of the keys they see in
    visibility order (blocks, F + n)."""

    before: list[int]
    queries: list[torch.Tensor]
    keys: list[torch.Tensor]
    masks: list[torch.Tensor | None]  # bool (n, F + n): query t sees keys 0 .. F + t (None where F = 0)


_flash = torch.ops.aten._scaled_dot_product_flash_attention  # CUDA's flash kernel, returning (out, lse, ...)


def lower_right_causal(q, k, v, mask: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """Attention of q (N, h, n, hd) over k, v (N, h, S, hd), S >= n, where query t sees keys
    0 .. S - n + t (causal, aligned to the last key). On a GPU where the flash kernel runs, that
    kernel, whose causal flag means exactly this alignment when S > n (as torch's own
    causal_lower_right bias uses it; that bias cannot be built inside torch.compile or a fake
    tensor mode, this can); elsewhere scaled_dot_product_attention with mask, the same pattern
    as bool (n, S)."""
    if q.device.type == "cuda" and can_use_flash_attention(SDPAParams(q, k, v, None, dropout, True, False)):
        return _flash(q, k, v, dropout, is_causal=True, scale=q.shape[-1] ** -0.5)[0]
    return _sdpa(q, k, v, mask=mask, dropout=dropout)


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

    def __init__(self, config: ModelConfig, kind: str, layout: Layout | None = None,
                 positions: RelativePositions | None = None):
        super().__init__()
        d, a = config.d_model, config.attn_dim
        self.kind = kind
        self.layout = layout
        # model.relative: the decoder's self-attention only (positions given); the encoder and the
        # cross-attention to its memory keep their absolute positions
        self.relative = positions.kind if positions is not None else "none"
        # shared with the model, which owns (and moves) its buffers: not a submodule of each layer
        object.__setattr__(self, "positions", positions)
        self.rel = RelativeLogits(config.n_heads, config.head_dim, positions.sizes) if self.relative == "logits" else None
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
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

    def memory_cache(self, memory: torch.Tensor) -> MemoryCache:
        """Cross-attention: encoder output (B, S, d) -> its keys and values, for decoding."""
        return MemoryCache(*(self._heads(t) for t in self.kv(memory).chunk(2, dim=-1)))

    def make_cache(self, batch: int, like: torch.Tensor, position: Position, visibility=None, window: int = 1):
        """An empty self-attention cache of this layer's pattern for `batch` images decoded at
        `position`, on like's device and in its dtype; visibility: local 2D only, the model's
        buffer of layout.visibility (long (blocks, window) on like's device); window: the
        positions per pass of parallel decoding (1: one at a time)."""
        args = (batch, self.n_heads, self.head_dim, self.layout, like, position)
        if self.kind == "local2d":
            return Local2DCache(*args, visibility, window=window)
        if self.kind == "full":
            return FullCache(*args)
        return Local1DCache(*args, window=window)

    def forward(self, x: torch.Tensor, memory=None, windows=None, cache=None) -> torch.Tensor:
        """x float (B, Lp, d) in internal layout -> (B, Lp, d).

        memory: encoder output (B, S, d) for cross-attention. windows: how the local patterns
        find their keys, shared by all layers (ImageTransformer.attention_windows): the additive
        window mask (1, heads * blocks, block, window) (see window_bias), or CausalGroups.
        cache: decoding one position, x (B, 1, d) at cache.position: the keys and values before
        it come from the cache (make_cache, memory_cache), which this call extends.
        """
        B, L, _ = x.shape
        p = self.dropout if self.training else 0.0
        if self.kind == "cross":
            q = self._heads(self.q(x))
            kv = cache if cache is not None else self.memory_cache(memory)
            o = _sdpa(q, kv.k, kv.v, dropout=p) if cache is None else kernels.decode_attention(q, kv.k, kv.v)
        else:
            qkv = self.qkv(x)
            grouped = isinstance(windows, CausalGroups)
            if cache is None and self.kind == "local1d" and not grouped and local1d.applies(qkv, p):
                if self.relative == "rotary":
                    qkv = kernels.rotate_qkv(qkv, self.positions.cos, self.positions.sin, self.n_heads)
                bias_fn = self._window_logits if self.relative == "logits" else None
                return self.out(local1d.attend(qkv, self.n_heads, self.layout.block, windows, bias_fn))
            rotary = self.relative == "rotary"  # keys at their own position, before any cache
            pos = self.positions
            # one decoding step: fewest operations (its in-place writes are eager code: a compiled
            # step takes relative.rotate, which the compiler fuses anyway)
            if rotary and cache is not None and kernels.enabled() and not torch.compiler.is_compiling():
                at = cache.position.rows()
                qkv = kernels.rotate_qkv(qkv, pos.cos[at], pos.sin[at], self.n_heads)
                rotary = False
            q, k, v = (self._heads(t) for t in qkv.chunk(3, dim=-1))
            if rotary:
                at = slice(None) if cache is None else cache.position.rows()
                q, k = rotate(q, pos.cos[at], pos.sin[at]), rotate(k, pos.cos[at], pos.sin[at])
            o = self._attend(q, k, v, p, windows, cache)
        o = o.transpose(1, 2).reshape(B, L, -1)  # (B, L, h*hd)
        return self.out(o)

    def _relative_bias(self, q: torch.Tensor, pick) -> torch.Tensor:
        """Relative logits of q (B, h, ..., hd) over the keys pick(index) selects from each of
        the model's static index tensors, in q's dtype (an attention mask)."""
        index = [pick(ix) for ix in self.positions.index]
        return relative_bias(q, self.rel.tables, index).to(q.dtype)

    def _window_logits(self, q: torch.Tensor) -> torch.Tensor:
        """q (B, h, blocks, block, hd) -> its relative logits over each block's key window
        (B, h, blocks, block, window)."""
        return self._relative_bias(q, lambda ix: ix)

    def _attend(self, q, k, v, p, windows, cache):
        logits = self.relative == "logits"
        if cache is not None:
            return cache.attend(q, k, v, self._relative_bias if logits else None)
        if self.kind == "bidirectional":
            return _sdpa(q, k, v, dropout=p)
        if not kernels.enabled():
            mask = self.dense_mask().to(q.device)
            if logits:  # the offsets straight from every pair's coordinates
                rel = relative_bias(q, self.rel.tables, self.positions.dense_index())
                mask = rel.masked_fill(~mask, float("-inf")).to(q.dtype)
            return _sdpa(q, k, v, mask=mask, dropout=p)
        if self.kind == "full":
            if logits:
                L = q.shape[2]
                causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
                mask = self._relative_bias(q, lambda ix: ix[0]).masked_fill(~causal, float("-inf"))
                return _sdpa(q, k, v, mask=mask, dropout=p)
            return _sdpa(q, k, v, dropout=p, causal=True)
        if isinstance(windows, CausalGroups):
            return self._grouped(q, k, v, p, windows)
        return self._blocked(q, k, v, p, windows)

    def _grouped(self, q, k, v, p, groups: CausalGroups):
        """The local patterns as lower-right causal attention (layout.causal_groups): per group
        of blocks, its real queries and the keys they see gathered in visibility order, then
        causal attention aligned to the last key (lower_right_causal; plain causal where no key
        comes before the block), the flash kernel on a GPU: no mask read, no key outside the
        window computed. Padding queries' outputs stay zero (they are never read)."""
        B, h, _, hd = q.shape
        out = q.new_zeros(q.shape)
        for before, queries, keys, mask in zip(*groups):
            blocks, n = queries.shape
            qg, kg, vg = (t[:, :, ix].flatten(1, 2) for t, ix in ((q, queries), (k, keys), (v, keys)))
            if before:
                o = lower_right_causal(qg, kg, vg, mask, p)  # (B, h * blocks, n, hd)
            else:
                o = _sdpa(qg, kg, vg, dropout=p, causal=True)
            out[:, :, queries] = o.view(B, h, blocks, n, hd)
        return out

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
        if self.relative == "logits":  # per image: the relative logits beside the window mask
            rel = self._window_logits(q.reshape(B, h, nb, lq, hd))  # (B, h, nb, lq, window)
            bias = rel.view(B, h * nb, lq, -1).add_(bias)  # (B, h*nb, lq, window), in q's dtype
        # Heads and blocks share one batch dimension: 4D inputs with a 4D mask take the fused
        # (flash) kernel on CPU, which keeps no (query x key) probabilities for the backward.
        q = q.reshape(B, h * nb, lq, hd)  # (B, h*nb, lq, hd)
        o = _sdpa(q, kw, vw, mask=bias, dropout=p)  # (B, h*nb, lq, hd)
        return o.view(B, h, nb * lq, hd)[:, :, :L]

    def dense_mask(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = self.layout.dense_mask(self._mask_config)
        return self._dense
