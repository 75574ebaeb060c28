"""Masked self-attention in the three patterns (local 1D, local 2D, full) and cross-attention.

Each pattern has a fast path (blocked: every query block attends to a fixed window of keys,
so cost grows linearly with the image) and the dense reference (one (Lp, Lp) boolean mask built
from the definitions, see layout.dense_mask), which the tests hold the fast paths to and which
`reference_mode()` (model/kernels.py) runs. Local 1D on CPU in float32 takes a third path, the
flash split of kernels.local1d_flash; elsewhere the key windows and an additive mask (_blocked).

Decoding one position at a time, each layer's attention reads and extends a key/value cache that
holds only what its pattern can see:
- local1d: a window of two blocks, [previous block | current block] (constant memory per image);
- local2d: a ring of the last fh + qh grid rows (the top flange and the current block row) and
  the current block's key window, rebuilt from the ring when a new block starts;
- both local caches hold the window so that each query's keys are a contiguous slice of it
  (visibility_order), and attend without a mask;
- full: the whole prefix;
- cross: the encoder's keys and values, computed once per image.

Parallel (Jacobi) decoding (decoding.generate, decode="parallel") runs a window of W positions
per pass and then goes back to the first position whose input was wrong: the positions after it
are computed again, and their keys overwrite the ones the pass wrote. The local caches are sized
for `window` so that going back never needs anything a pass overwrote: the local 1D cache holds
as many blocks as a pass can reach plus the one before its first (reserve() makes room once per
pass), the local 2D ring as many block rows as a pass can reach plus the flange, and the local 2D
window is gathered again when decoding goes back into an earlier block.

model.relative (model/relative.py) enters the decoder's self-attention only: "rotary" rotates
queries and keys at their positions before anything else sees them (the keys before they enter a
cache); "logits" adds its relative logits to the additive mask of every path (the windows' mask,
a causal mask for full attention, the dense reference's mask, each cache's slice of keys); on
the CPU fast path of local 1D, whose flash kernels take no mask, attention runs as
kernels._Local1DMatmul with the logits as its bias, in either dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imagetx.model import kernels
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


class Position:
    """The position being decoded, shared by all caches of a decoder: generation step and its
    internal (layout) index."""

    step: int = 0
    internal: int = 0


class FullCache:
    """Keys and values of every position so far, in generation order."""

    def __init__(self, B, h, hd, layout: Layout, like: torch.Tensor, position: Position):
        self.k = like.new_zeros(B, h, layout.seq_len, hd)
        self.v = like.new_zeros(B, h, layout.seq_len, hd)
        self.position = position

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value buffers (B, h, N, hd) that attention reads."""
        return self.k, self.v

    def second_buffers(self) -> None:
        """Buffers that also take each new key and value (the local 2D ring), or None."""
        return None

    def prepare(self) -> tuple[int, int, int, int]:
        """Get ready for the position being decoded (once per position) -> (slot, lo, hi, off2):
        its key and value go to slot `slot` of the buffers, it attends to slots [lo, hi), and
        off2 is the element offset of its place in second_buffers() (0 without)."""
        return self.place(self.position.step)

    def place(self, step: int) -> tuple[int, int, int, int]:
        """prepare()'s answer for generation step `step`, changing nothing (the fused parallel
        step's places; valid after reserve() for the pass)."""
        return step, 0, step + 1, 0

    def reserve(self, first: int, last: int) -> None:
        """Make room for a pass over generation steps [first, last] (nothing to do here)."""

    def attend(self, q, k, v, relative=None):
        """relative: None, or Attention._relative_bias: the relative logits of q over the keys
        read, given how to pick them from each static index (blocks, block, window)."""
        slot, lo, hi, _ = self.prepare()
        self.k[:, :, slot] = k[:, :, 0]
        self.v[:, :, slot] = v[:, :, 0]
        mask = None if relative is None else relative(q, lambda ix: ix[0, slot, lo:hi])
        return kernels.decode_attention(q, self.k, self.v, lo, hi, mask)


class Local1DCache:
    """Keys and values of [previous block | current block]: the keys a query sees are a
    contiguous range of it (visibility_order), so attention takes a slice and no mask.

    For a window of W > 1 positions per pass (parallel decoding) it holds `span` = 2 +
    ceil((W - 1) / block) blocks, top, top + 1, ...: the block before a pass's first one and
    every block the pass can reach, so that a pass never drops a block that decoding goes back to.
    """

    def __init__(self, B, h, hd, layout: Layout, like: torch.Tensor, position: Position, window: int = 1):
        self.lq = layout.block
        self.span = 2 + -(-(window - 1) // self.lq)
        self.k = like.new_zeros(B, h, self.span * self.lq, hd)
        self.v = like.new_zeros(B, h, self.span * self.lq, hd)
        self.top = -1  # the block whose keys sit at slot 0 (-1: block 0 sits at slot lq)
        self.count = layout.visible_count
        # block 0 sees only its own half, blocks b > 0 both halves: in storage order either way
        order = layout.visibility
        self.first = [keys[0] for keys in order]
        for b, lo in enumerate(self.first):
            if order[b][: self.count[b][-1]] != list(range(lo, lo + self.count[b][-1])):
                raise ValueError("local 1D keys are not a contiguous range of the cache")
        self.position = position

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k, self.v

    def second_buffers(self) -> None:
        return None

    def _shift(self, top: int) -> None:
        """Move the blocks from `top` on to the front: block `top` to slot 0."""
        src, n = (top - self.top) * self.lq, max(0, self.top + self.span - top) * self.lq  # n = 0: nothing kept
        for t in (self.k, self.v):
            moved = t[:, :, src : src + n]
            t[:, :, :n] = moved.clone() if src < n else moved  # overlapping ranges: through a copy
        self.top = top

    def reserve(self, first: int, last: int) -> None:
        """Make room for a pass over generation steps [first, last]: keep the block before
        first's, and every block up to last's fits."""
        if last // self.lq >= self.top + self.span:
            self._shift(first // self.lq - 1)

    def place(self, step: int) -> tuple[int, int, int, int]:
        """See FullCache.place."""
        b, i = divmod(step, self.lq)
        base = (b - 1 - self.top) * self.lq  # slot of the window's first key [block b - 1 | block b]
        lo = base + self.first[b]
        return base + self.lq + i, lo, lo + self.count[b][i], 0

    def prepare(self) -> tuple[int, int, int, int]:
        """See FullCache.prepare. A new block that does not fit moves the blocks from the one
        before it to the front (one position per pass: the current block becomes the memory)."""
        step = self.position.step
        if step // self.lq >= self.top + self.span:
            self._shift(step // self.lq - 1)
        return self.place(step)

    def attend(self, q, k, v, relative=None):
        slot, lo, hi, _ = self.prepare()
        self.k[:, :, slot] = k[:, :, 0]
        self.v[:, :, slot] = v[:, :, 0]
        b, i = divmod(self.position.step, self.lq)
        base = (b - 1 - self.top) * self.lq  # cache slot - base = window slot
        mask = None if relative is None else relative(q, lambda ix: ix[b, i, lo - base : hi - base])
        return kernels.decode_attention(q, self.k, self.v, lo, hi, mask)


class Local2DCache:
    """A ring of the last fh + qh rows of keys/values (padded by fw columns either side) and the
    key window of the current query block, stored in the order the block's queries come to see
    its keys (visibility_order): each query attends to a prefix of the window, with no mask.

    For a window of W > 1 positions per pass (parallel decoding) the ring holds qh more rows per
    block row a pass can reach: a key written by a pass then never lands on a row that a block
    decoded after going back still reads (its top flange and its own rows), and the window of a
    block that decoding goes back into is gathered again from the ring."""

    def __init__(self, B, h, hd, layout: Layout, like: torch.Tensor, position: Position, visibility: torch.Tensor,
                 window: int = 1):
        (self.qh, self.qw), (self.fh, self.fw) = layout.query_shape, layout.flange
        Wp = layout.padded_grid[1]
        self.nbw = Wp // self.qw
        self.kh, self.kw = self.fh + self.qh, self.qw + 2 * self.fw
        reach = -(-(window - 1) // (self.qh * layout.cols))  # block rows a pass can go past its first
        self.R = self.kh + reach * self.qh
        self.lq = layout.block
        self.ring_k = like.new_zeros(B, h, self.R, Wp + 2 * self.fw, hd)
        self.ring_v = like.new_zeros(B, h, self.R, Wp + 2 * self.fw, hd)
        self.win_k = like.new_zeros(B, h, self.kh * self.kw, hd)
        self.win_v = like.new_zeros(B, h, self.kh * self.kw, hd)
        self.order = visibility  # long (blocks, window) on like's device: gathers each block's window
        self.count = layout.visible_count
        self.slot_of = layout.visibility_slot  # window key -> its place in the order
        self.visibility = layout.visibility  # the same order as host data (ring_rows)
        self.gen_to_internal = layout.gen_to_internal_list
        self.position = position
        self.block = -1

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.win_k, self.win_v

    def second_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ring_k, self.ring_v

    def reserve(self, first: int, last: int) -> None:
        """Make room for a pass over generation steps [first, last]: a pass that goes back into
        an earlier block than the window holds gathers it again."""
        if self.block != self.gen_to_internal[first] // self.lq:
            self.block = -1

    def ring_place(self, internal: int) -> tuple[int, int]:
        """-> (ring row, ring column) of internal position `internal`."""
        blk, i = divmod(internal, self.lq)
        bi, bj = divmod(blk, self.nbw)
        qr, qc = divmod(i, self.qw)
        return (bi * self.qh + qr + self.fh) % self.R, bj * self.qw + qc + self.fw

    def ring_rows(self, blk: int) -> list[int]:
        """The keys of block blk's window in visibility order, as rows of the ring seen as
        (R * (Wp + 2 fw), hd) per image and head (the fused parallel step reads them there)."""
        bi, bj = divmod(blk, self.nbw)
        width = self.ring_k.shape[3]
        rows = []
        for key in self.visibility[blk]:
            wr, wc = divmod(key, self.kw)
            rows.append(((bi * self.qh + wr) % self.R) * width + bj * self.qw + wc)
        return rows

    def prepare(self) -> tuple[int, int, int, int]:
        """See FullCache.prepare. A new query block gathers its window from the ring, in
        visibility order; off2 is the ring place (row, column) of the position."""
        blk, i = divmod(self.position.internal, self.lq)
        bi, bj = divmod(blk, self.nbw)
        qr, qc = divmod(i, self.qw)
        if blk != self.block:  # gather the new block's window from the ring, in visibility order
            self.block = blk
            # the window's padded rows are ring rows s, s + 1, ..., s + kh - 1 (mod R)
            s, c0 = (bi * self.qh) % self.R, bj * self.qw
            B, h, _, _, hd = self.ring_k.shape
            for win, ring in ((self.win_k, self.ring_k), (self.win_v, self.ring_v)):
                cols = ring[:, :, :, c0 : c0 + self.kw]
                rows = [cols[:, :, s : s + self.kh]]
                if s + self.kh > self.R:  # wrapped round
                    rows.append(cols[:, :, : s + self.kh - self.R])
                w = torch.cat(rows, dim=2).view(B, h, self.kh * self.kw, hd)
                torch.index_select(w, 2, self.order[blk], out=win)
        slot = self.slot_of[blk][(self.fh + qr) * self.kw + (self.fw + qc)]
        self.ring_at = self.ring_place(self.position.internal)  # (row, column)
        off2 = self.ring_at[0] * self.ring_k.stride(2) + self.ring_at[1] * self.ring_k.stride(3)
        return slot, 0, self.count[blk][i], off2

    def attend(self, q, k, v, relative=None):
        slot, _, n, _ = self.prepare()
        ring_row, ring_col = self.ring_at
        self.win_k[:, :, slot] = k[:, :, 0]
        self.win_v[:, :, slot] = v[:, :, 0]
        self.ring_k[:, :, ring_row, ring_col] = k[:, :, 0]
        self.ring_v[:, :, ring_row, ring_col] = v[:, :, 0]
        mask = None
        if relative is not None:  # the window is stored in visibility order
            blk, i = divmod(self.position.internal, self.lq)
            mask = relative(q, lambda ix: ix[blk, i][self.order[blk, :n]])
        return kernels.decode_attention(q, self.win_k, self.win_v, 0, n, mask)


class MemoryCache:
    """Cross-attention's keys and values of the encoder output (B, h, S, hd), computed once."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v


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

    def forward(self, x: torch.Tensor, memory=None, bias=None, cache=None) -> torch.Tensor:
        """x float (B, Lp, d) in internal layout -> (B, Lp, d).

        memory: encoder output (B, S, d) for cross-attention. bias: the local patterns' additive
        window mask (1, heads * blocks, block, window), shared by all layers (see window_bias).
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
            if cache is None and self.kind == "local1d" and kernels.local1d_flash_applies(qkv, p):
                if self.relative == "rotary":
                    qkv = kernels.rotate_qkv(qkv, self.positions.cos, self.positions.sin, self.n_heads)
                bias_fn = self._window_logits if self.relative == "logits" else None
                return self.out(kernels.local1d_flash(qkv, self.n_heads, self.layout.block, bias, bias_fn))
            rotary = self.relative == "rotary"  # keys at their own position, before any cache
            pos = self.positions
            if rotary and cache is not None and kernels.enabled():  # one decoding step: fewest operations
                at = cache.position.internal
                qkv = kernels.rotate_qkv(qkv, pos.cos[at : at + 1], pos.sin[at : at + 1], self.n_heads)
                rotary = False
            q, k, v = (self._heads(t) for t in qkv.chunk(3, dim=-1))
            if rotary:
                at = slice(None) if cache is None else slice(cache.position.internal, cache.position.internal + 1)
                q, k = rotate(q, pos.cos[at], pos.sin[at]), rotate(k, pos.cos[at], pos.sin[at])
            o = self._attend(q, k, v, p, bias, cache)
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

    def _attend(self, q, k, v, p, bias, cache):
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
        return self._blocked(q, k, v, p, bias)

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
