"""Consistency with a low-resolution input: the values each sub-pixel can take so that the image
still area-downsamples exactly to its source.

A super-resolution source is the target area-downsampled (imagetx.data.transforms.area_downsample):
for integer factors (fh, fw) = (H / h, W / w), each source value s is the mean of its cell's k =
fh*fw values (one channel) rounded half to even. So the cell's sum T lies in [lo, hi], k*s -+ k/2
with the ends included where they round to s. A value v for a sub-pixel of the cell, with P the
sum of the cell's values placed before it and R of its values still to come after it, can still
reach that range iff lo - P - 255 R <= v <= hi - P. The range is never empty when the values
placed so far were in range, so restricting every conditional to it and renormalising is a
distribution over exactly the images consistent with the source.

Two users: sampling (`imagetx superres --consistent`, AreaConsistency follows the values as they
are drawn) and models with model.consistent (CellOrder gives the range of every sub-pixel from the
true prefix, and the likelihood is that of the restricted conditionals). model.range_input also
feeds each position its range and the mean its cell's remaining values need (range_inputs): the
clamped range alone is [0, 255] for a cell's first values and says nothing of the sum still owed.

area_downsample rounds integer-factor means exactly (integer arithmetic), so the ends are exact.
"""

from __future__ import annotations

import torch
from torch import nn


def factors(image_size: tuple[int, int], source_size: tuple[int, int]) -> tuple[int, int] | None:
    """(fh, fw) when the source size divides the image size on both sides, else None."""
    (H, W), (h, w) = image_size, source_size
    return None if H % h or W % w else (H // h, W // w)


def cell_sum_range(sources: torch.Tensor, fh: int, fw: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sources uint8 (B, h, w, C) -> (lo, hi) long (B, h, w, C): the sums of a cell's fh*fw values
    whose area mean rounds (half to even, as area_downsample does) to the source value."""
    k = fh * fw
    s = sources.long()
    half = k // 2
    if k % 2:  # no sum rounds half way
        lo, hi = k * s - half, k * s + half
    else:  # the sums k*s -+ k/2 are ties, which round to s where s is even
        odd = s % 2
        lo, hi = k * s - half + odd, k * s + half - odd
    return lo.clamp(min=0), hi.clamp(max=255 * k)


def _value_range(lo_sum, hi_sum, placed, after) -> tuple[torch.Tensor, torch.Tensor]:
    """The values v that keep a cell's sum reachable: lo - P - 255 R <= v <= hi - P, in [0, 255]."""
    return (lo_sum - placed - 255 * after).clamp(min=0), (hi_sum - placed).clamp(max=255)


def _range_inputs(lo_sum, hi_sum, placed, after) -> torch.Tensor:
    """-> long (..., 3): the value range (lo, hi) and the mean that this value and the R = after
    still to come need for the middle of the cell's sum range, (lo + hi) / 2 - P over R + 1,
    rounded; clamped to [0, 255] (embedding rows) since after values out of their own range
    (a perturbed or primed prefix) the range can leave it."""
    lo, hi = _value_range(lo_sum, hi_sum, placed, after)
    left = after + 1
    mean = torch.div(lo_sum + hi_sum - 2 * placed + left, 2 * left, rounding_mode="floor")
    return torch.stack(torch.broadcast_tensors(lo, hi, mean), -1).clamp(0, 255)


class AreaConsistency:
    """The sampling side: bounds(g) -> the values grid position g may take, record(g, value) as
    each value is placed (see decoding.generate). Works in any generation order, for categorical
    (one sub-pixel per step, bounds long (B,)) and DMOL (one pixel per step, each channel its own
    cell sum, bounds long (B, C))."""

    def __init__(self, sources: torch.Tensor, image_size: tuple[int, int], per_pixel: bool = False):
        """sources uint8 (B, h, w, C); image_size (H, W) of the images drawn; per_pixel: DMOL."""
        B, h, w, C = sources.shape
        f = factors(image_size, (h, w))
        if f is None:
            raise ValueError(f"consistent sampling needs the image size to be a multiple of the source size, "
                             f"got {image_size[0]}x{image_size[1]} from {h}x{w}")
        self.fh, self.fw = f
        self.W, self.C, self.per_pixel = image_size[1], C, per_pixel
        self.lo, self.hi = cell_sum_range(sources, self.fh, self.fw)  # (B, h, w, C)
        self.placed = torch.zeros_like(self.lo)  # sum of the values placed in each cell
        self.left = torch.full((h, w, C), self.fh * self.fw, dtype=torch.long, device=sources.device)

    def _where(self, g: int) -> tuple:
        """Grid position g -> index of its cell (and channel) in the (B, h, w, C) tensors."""
        pixel, channel = (g, slice(None)) if self.per_pixel else divmod(g, self.C)
        row, col = divmod(pixel, self.W)
        return row // self.fh, col // self.fw, channel

    def bounds(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        i, j, c = self._where(g)
        return _value_range(self.lo[:, i, j, c], self.hi[:, i, j, c], self.placed[:, i, j, c], self.left[i, j, c] - 1)

    def range_inputs(self, g: int) -> torch.Tensor:
        """Categorical only: long (B, 3), see _range_inputs, for grid position g."""
        i, j, c = self._where(g)
        return _range_inputs(self.lo[:, i, j, c], self.hi[:, i, j, c], self.placed[:, i, j, c], self.left[i, j, c] - 1)

    def record(self, g: int, value: torch.Tensor) -> None:
        i, j, c = self._where(g)
        self.placed[:, i, j, c] += value.long()
        self.left[i, j, c] -= 1

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The values placed so far, to restore() after a parallel decoding pass has recorded
        its guesses."""
        return self.placed.clone(), self.left.clone()

    def restore(self, state: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.placed.copy_(state[0])
        self.left.copy_(state[1])


class CellOrder(nn.Module):
    """The teacher-forced side, for one geometry: which cell sum each sub-pixel belongs to and where
    it comes in that cell's generation order, worked out once (buffers), so that bounds(x, sources)
    is a gather, a running sum and a scatter per call (ImageTransformer.log_probs, every training step).

    image_size (H, W), source_size (h, w) with integer factors, channels C, order long (L,)
    generation step -> grid position, one sub-pixel per position (categorical: L = H*W*C) or one
    pixel (DMOL: L = H*W, its channels each in their own cell sum)."""

    def __init__(self, image_size: tuple[int, int], source_size: tuple[int, int], channels: int, order: torch.Tensor):
        super().__init__()
        (H, W), (h, w), C = image_size, source_size, channels
        self.fh, self.fw = factors((H, W), (h, w))
        device = order.device
        rows = torch.arange(H, device=device)[:, None, None] // self.fh
        cols = torch.arange(W, device=device)[None, :, None] // self.fw
        cell = (rows * w + cols).expand(H, W, C)  # (H, W, C) the cell of each sub-pixel
        channel = torch.arange(C, device=device).expand(H, W, C)
        group = (cell * C + channel).reshape(-1)  # (H*W*C,) a cell sum per (cell, channel)
        per = H * W * C // order.numel()  # sub-pixels per position: 1 or C
        # the generation step of every sub-pixel; sorting by (group, step) lines up each cell's
        # values in the order they are generated, so a running sum gives the sum placed before each
        step = torch.empty(order.numel(), dtype=torch.long, device=device)
        step[order] = torch.arange(order.numel(), device=device)
        step = step.repeat_interleave(per)  # (H*W*C,)
        n = group.numel()
        perm = torch.argsort(group * n + step)  # (H*W*C,) grouped, then in generation order
        sorted_group = group[perm]
        first = torch.ones(n, dtype=torch.bool, device=device)
        first[1:] = sorted_group[1:] != sorted_group[:-1]  # the first of each group
        start = torch.cummax(torch.where(first, torch.arange(n, device=device), 0), 0).values
        after = self.fh * self.fw - 1 - (torch.arange(n, device=device) - start)  # values of the group still to come
        for name, value in (("perm", perm), ("sorted_group", sorted_group), ("start", start), ("after", after)):
            self.register_buffer(name, value, persistent=False)

    def _sorted_sums(self, x: torch.Tensor, sources: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """-> (lo_sum, hi_sum, placed) long (B, H*W*C) in the sorted order (perm): each sub-pixel's
        cell sum range and the sum of its cell's values generated before it."""
        B = x.shape[0]
        lo_sum, hi_sum = cell_sum_range(sources, self.fh, self.fw)  # (B, h, w, C)
        values = x.reshape(B, -1).long()[:, self.perm]
        running = values.cumsum(1) - values  # the sum of everything sorted before
        placed = running - running[:, self.start]  # ... within the group
        return lo_sum.reshape(B, -1)[:, self.sorted_group], hi_sum.reshape(B, -1)[:, self.sorted_group], placed

    def bounds(self, x: torch.Tensor, sources: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x long or uint8 (B, H, W, C), sources uint8 (B, h, w, C) -> (lo, hi) long (B, H, W, C):
        what AreaConsistency.bounds gives each sub-pixel while x is generated in this order."""
        lo_v, hi_v = _value_range(*self._sorted_sums(x, sources), self.after)
        lo, hi = torch.empty_like(lo_v), torch.empty_like(hi_v)
        lo[:, self.perm], hi[:, self.perm] = lo_v, hi_v
        return lo.view(x.shape), hi.view(x.shape)

    def range_inputs(self, x: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C), sources (B, h, w, C) -> long (B, H, W, C, 3): what
        AreaConsistency.range_inputs gives each sub-pixel while x is generated in this order."""
        sorted_inputs = _range_inputs(*self._sorted_sums(x, sources), self.after)  # (B, H*W*C, 3)
        inputs = torch.empty_like(sorted_inputs)
        inputs[:, self.perm] = sorted_inputs
        return inputs.view(*x.shape, 3)


def value_bounds(x: torch.Tensor, sources: torch.Tensor, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The range of every sub-pixel of x given the values before it (see CellOrder), for a
    one-off call: x (B, H, W, C), sources (B, h, w, C), order the generation order."""
    B, H, W, C = x.shape
    return CellOrder((H, W), tuple(sources.shape[1:3]), C, order.to(x.device)).bounds(x, sources)
