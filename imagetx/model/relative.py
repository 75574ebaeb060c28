"""Relative positions in the decoder's self-attention (ours, not the paper's): model.relative.

Every sequence position has image coordinates: row r, pixel column c and, for the categorical
output with 3 channels, channel ch (a grid row holds W*C sub-pixels: grid column = c * C + ch).
A DMOL position is a whole pixel, and a grayscale sub-pixel is one too: (r, c) only.

- "logits" (Shaw et al. 2018, the Music Transformer's relative attention, in 2D): each head adds
  q . r_row[dr] + q . r_col[dc] (+ q . r_ch[dch]) to its logits, (dr, dc, dch) the key's
  coordinates minus the query's. The tables are learned, per layer and head, over the offsets the
  pattern's window can hold. Computed as the query-by-offset products q @ table^T (..., lq,
  offsets), gathered into the window with static index tensors (RelativePositions.index): no
  (queries, keys, head_dim) tensor. It enters the attention as an additive bias, beside the mask.
- "rotary" (Su et al. 2021, axial in 2D): the head's dimensions in pairs, some rotated by the
  row, some by the column (and some by the channel), queries and keys each at their own position,
  so that q . k depends on the offsets only. Keys are rotated before they enter a decoding cache;
  the fused attention paths stay as they are.

Both apply only to the decoder's causal self-attention: the super-resolution encoder's
bidirectional attention and the decoder's cross-attention to the encoder keep the absolute
encodings (model.positional), as published.

The functions take explicit coordinates, so the same code serves the model (with its layout's
coordinates) and the shift-invariance test (with any): `attention_logits` composes them.
"""

from __future__ import annotations

import torch
from torch import nn

from imagetx.model.config import ModelConfig
from imagetx.model.layout import Layout

ROTARY_BASE = 10000.0


def coordinates(config: ModelConfig, layout: Layout) -> list[torch.Tensor]:
    """long (Lp,) per axis of every internal position (padding included): [row, pixel column]
    and, for 3-channel categorical sub-pixels, the channel."""
    per = config.tokens_per_pixel
    coords = [layout.row_of, layout.col_of // per]
    return coords + [layout.col_of % per] if per > 1 else coords


# ---- rotary ----------------------------------------------------------------------------------
def rotary_pairs(head_dim: int, axes: int) -> list[int]:
    """Rotated dimension pairs per axis (rows, columns[, channels]). A channel index takes three
    values, so it gets a quarter of the pairs (at least one); rows and columns share the rest.
    An odd head dimension leaves its last dimension unrotated."""
    pairs = head_dim // 2
    ch = max(1, pairs // 4) if axes == 3 else 0
    rest = pairs - ch
    return [(rest + 1) // 2, rest // 2] + ([ch] if axes == 3 else [])


def rotary_angles(coords: list[torch.Tensor], head_dim: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """coords: long (N,) per axis -> (cos, sin) (N, P) in dtype, P = sum of rotary_pairs: the angle
    of each rotated pair at each position, frequencies base^(-k/n) per axis as in RoPE."""
    pieces = []
    for pos, n in zip(coords, rotary_pairs(head_dim, len(coords))):
        inv = ROTARY_BASE ** (-torch.arange(n, dtype=torch.float64) / n)
        pieces.append(pos.double()[:, None] * inv[None, :])  # (N, n)
    angles = torch.cat(pieces, dim=1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x float (..., hd) -> x with dimension i and P + i rotated by the angle of pair i (i < P);
    cos, sin (..., P) broadcast against x[..., :P] (one row per position). Computed in x's dtype."""
    P = cos.shape[-1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x[..., :P], x[..., P : 2 * P]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * P :]], dim=-1)


# ---- relative logits -------------------------------------------------------------------------
def offsets(q_coords: list[torch.Tensor], k_coords: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per axis, long (..., lq) query and (..., keys) key coordinates -> key minus query
    (..., lq, keys)."""
    return [k[..., None, :] - q[..., :, None] for q, k in zip(q_coords, k_coords)]


def relative_bias(q: torch.Tensor, tables, index: list[torch.Tensor]) -> torch.Tensor:
    """The relative logits hd^-0.5 * sum over axes of q . table[offset].

    q float (B, h, ..., lq, hd); tables: per axis float (h, n, hd), row k the offset lo + k;
    index: per axis long (..., lq, keys) in [0, n), the offset minus lo, broadcast against q's
    leading dimensions -> float (B, h, ..., lq, keys). Multiplies q by each table first
    (query-by-offset products (B, h, ..., lq, n)), then gathers: nothing of size keys x hd.
    """
    q = q * q.shape[-1] ** -0.5  # scaled like q . k: on the small side of the products
    bias = None
    for table, ix in zip(tables, index):
        by_offset = torch.einsum("bh...d,hnd->bh...n", q, table.to(q.dtype))  # (B, h, ..., lq, n)
        ix = ix.expand(*by_offset.shape[:-1], ix.shape[-1])
        term = by_offset.gather(-1, ix)  # (B, h, ..., lq, keys)
        bias = term if bias is None else bias.add_(term)  # in place: no backward reads either sum
    return bias


def attention_logits(q, k, q_coords, k_coords, relative: str, tables=None, lows=None) -> torch.Tensor:
    """The attention logits of queries q (B, h, lq, hd) at coordinates q_coords (per axis long
    (lq,)) over keys k (B, h, keys, hd) at k_coords -> float (B, h, lq, keys), unmasked: the
    scaled q . k with the relative positions of `relative` ("rotary": rotated at their
    coordinates; "logits": plus relative_bias with `tables` covering offsets from `lows`, offsets
    beyond them clamped into them).
    What the model computes from its layout's coordinates, for any coordinates."""
    hd = q.shape[-1]
    if relative == "rotary":
        q = rotate(q, *rotary_angles(q_coords, hd, q.dtype))
        k = rotate(k, *rotary_angles(k_coords, hd, k.dtype))
    logits = q @ k.transpose(-1, -2) * hd**-0.5
    if relative == "logits":
        # offsets beyond a table are pairs the pattern masks: any row will do
        index = [(d - lo).clamp(0, t.shape[1] - 1) for d, lo, t in zip(offsets(q_coords, k_coords), lows, tables)]
        logits = logits + relative_bias(q, tables, index)
    return logits


class RelativeLogits(nn.Module):
    """One layer's learned relative-logit tables: per axis (heads, offsets, head_dim)."""

    def __init__(self, n_heads: int, head_dim: int, sizes: list[int]):
        super().__init__()
        self.tables = nn.ParameterList(nn.Parameter(torch.randn(n_heads, n, head_dim) * head_dim**-0.5) for n in sizes)


def _window_coordinates(layout: Layout, coords: list[torch.Tensor], per: int):
    """The fast path's windows (see attention._blocked) in coordinates: per axis the queries'
    long (blocks, block) and the window keys' (blocks, window), and which (query, key) pairs of
    real positions are visible, bool (blocks, block, window). Full attention: one block of all."""
    L, Lp = layout.seq_len, layout.internal_len
    if layout.kind == "full":
        visible = torch.ones(L, L, dtype=torch.bool).tril()[None]
        return [c[None] for c in coords], [c[None] for c in coords], visible
    nb, lq, W = layout.window_mask.shape
    real_q = torch.zeros(nb * lq, dtype=torch.bool)
    real_q[:Lp] = layout.valid
    p = torch.arange(nb * lq).clamp(max=Lp - 1).view(nb, lq)  # padded queries: any position
    q_coords = [c[p] for c in coords]
    if layout.kind == "local1d":
        key = (torch.arange(nb)[:, None] - 1) * lq + torch.arange(W)[None, :]  # (nb, W) internal index
        inside = (key >= 0) & (key < L)
        k_coords = [c[key.clamp(0, L - 1)] for c in coords]
    else:
        (qh, qw), (fh, fw) = layout.query_shape, layout.flange
        nbw = layout.padded_grid[1] // qw
        kh, kw = fh + qh, qw + 2 * fw
        bi, bj = torch.arange(nb) // nbw, torch.arange(nb) % nbw
        row = (bi * qh - fh)[:, None] + (torch.arange(kh)[:, None].expand(kh, kw).reshape(-1))[None, :]
        col = (bj * qw - fw)[:, None] + (torch.arange(kw)[None, :].expand(kh, kw).reshape(-1))[None, :]
        inside = (row >= 0) & (col >= 0)  # the window mask holds the rest
        k_coords = [row, torch.div(col, per, rounding_mode="floor"), col % per][: len(coords)]
    visible = layout.window_mask & inside[:, None, :] & real_q.view(nb, lq, 1)
    return q_coords, k_coords, visible


class RelativePositions(nn.Module):
    """The static part of model.relative, built once per model and shared by its decoder layers
    (buffers only: nothing in a checkpoint).

    rotary: cos, sin float32 (Lp, P) at every internal position.
    logits: lows, sizes: per axis the smallest offset and the number of offsets a visible (query,
    key) pair of real positions can have; index: per axis long (blocks, block, window) the offset
    of every window key from every query minus its low, clamped into the table (pairs outside it
    are masked); full attention is one block of all positions.
    """

    def __init__(self, config: ModelConfig, layout: Layout):
        super().__init__()
        self.kind = config.relative
        coords = coordinates(config, layout)
        self.axes = len(coords)
        for a, c in enumerate(coords):
            self.register_buffer(f"coord{a}", c.clone(), persistent=False)
        self.lows: list[int] = []
        self.sizes: list[int] = []
        if self.kind == "rotary":
            cos, sin = rotary_angles(coords, config.head_dim)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)
        if self.kind == "logits":
            q_coords, k_coords, visible = _window_coordinates(layout, coords, config.tokens_per_pixel)
            for a, d in enumerate(offsets(q_coords, k_coords)):  # (blocks, block, window)
                seen = d[visible]
                lo, hi = int(seen.min()), int(seen.max())
                self.lows.append(lo)
                self.sizes.append(hi - lo + 1)
                self.register_buffer(f"index{a}", (d - lo).clamp(0, hi - lo), persistent=False)

    @property
    def coords(self) -> list[torch.Tensor]:
        return [getattr(self, f"coord{a}") for a in range(self.axes)]

    @property
    def index(self) -> list[torch.Tensor]:
        return [getattr(self, f"index{a}") for a in range(self.axes)]

    def dense_index(self) -> list[torch.Tensor]:
        """The reference's offsets: per axis long (Lp, Lp), straight from the coordinates of every
        pair of internal positions, minus the low and clamped (pairs outside are masked)."""
        c = self.coords
        return [(d - lo).clamp(0, n - 1) for d, lo, n in zip(offsets(c, c), self.lows, self.sizes)]
