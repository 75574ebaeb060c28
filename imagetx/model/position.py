"""2D position encodings: sinusoidal (as in tensor2tensor) or learned, per row and "column x channel"."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sinusoid(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """pos long (N,) -> float (N, dim): sin and cos halves, timescales 1 .. 1e4 (as in tensor2tensor)."""
    nt = dim // 2
    inv = torch.exp(-math.log(1e4) * torch.arange(nt, dtype=torch.float64) / max(nt - 1, 1))
    angles = pos.double()[:, None] * inv[None, :]  # (N, nt)
    out = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(out, (0, dim - 2 * nt)).float()


class PositionEncoding2D(nn.Module):
    """Row and "column x channel" encodings of every position, added once before the first layer.

    Sinusoidal: half of the d dimensions encode the row, the other half the column. Learned: one
    table per axis (full width), summed.
    """

    def __init__(self, kind: str, d: int, row_of: torch.Tensor, col_of: torch.Tensor):
        super().__init__()
        self.kind = kind
        if kind == "sinusoidal":
            half = d // 2
            table = torch.cat([sinusoid(row_of, half), sinusoid(col_of, d - half)], dim=1)
            self.register_buffer("table", table, persistent=False)  # (Lp, d)
        else:
            self.register_buffer("row_of", row_of.clone(), persistent=False)
            self.register_buffer("col_of", col_of.clone(), persistent=False)
            self.rows = nn.Parameter(torch.randn(int(row_of.max()) + 1, d) * d**-0.5)
            self.cols = nn.Parameter(torch.randn(int(col_of.max()) + 1, d) * d**-0.5)

    def forward(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """-> float (Lp, d), or (len(index), d) for the given internal positions."""
        if self.kind == "sinusoidal":
            return self.table if index is None else self.table[index]
        r, c = self.row_of, self.col_of
        if index is not None:
            r, c = r[index], c[index]
        return self.rows[r] + self.cols[c]
