"""The key/value caches of decoding, one class per attention pattern (Attention.make_cache builds
them; decoding.IncrementalDecoder drives them).

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
"""

from __future__ import annotations

import torch

from imagetx.model import kernels
from imagetx.model.layout import Layout


class Position:
    """The position being decoded, shared by all caches of a decoder: generation step and its
    internal (layout) index."""

    step: int = 0
    internal: int = 0

    def rows(self) -> slice:
        """The position's row of a table over internal positions (the rotary angles): a slice,
        so that the table's row keeps its dimension."""
        return slice(self.internal, self.internal + 1)


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
