"""The order training images are visited in, and each process's share of it.

`DataOrder` draws one permutation per epoch from (seed, epoch), so a data position (epoch, index)
says exactly which images come next: a resumed run reads the images the uninterrupted one would
have read. `RankBatches` cuts that order into the micro-batches of one process under DDP.
"""

from __future__ import annotations

import torch

from imagetx.system.distributed import Dist


class DataOrder:
    """The order training images are visited in: epoch e is a permutation of range(n) drawn from
    (seed, e). A position (epoch, index) says where the next batch starts, so a resumed run reads
    exactly the images the uninterrupted one would have read."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._cache: tuple[int, torch.Tensor] | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = (epoch, torch.randperm(self.n, generator=g))
        return self._cache[1]

    def take(self, epoch: int, index: int, count: int) -> tuple[list[int], int, int]:
        """The next `count` indices from (epoch, index), running into the next epochs as needed
        -> (indices, epoch, index) with the position after them."""
        out: list[int] = []
        while len(out) < count:
            part = self.permutation(epoch)[index : index + count - len(out)].tolist()
            out += part
            index += len(part)
            if index >= self.n:
                epoch, index = epoch + 1, 0
        return out, epoch, index

    def advance(self, epoch: int, index: int, count: int) -> tuple[int, int]:
        """The data position after `count` more images (without materialising them)."""
        total = epoch * self.n + index + count
        return total // self.n, total % self.n


class RankBatches:
    """Infinite micro-batches of indices for one process, starting at a data position: each
    optimizer step takes the next batch_size * grad_accum * world_size indices; process r takes
    its contiguous slice and splits it into grad_accum micro-batches."""

    def __init__(self, order: DataOrder, epoch: int, index: int, batch_size: int, grad_accum: int, ctx: Dist):
        self.order, self.start = order, (epoch, index)
        self.batch_size, self.grad_accum, self.ctx = batch_size, grad_accum, ctx

    def __iter__(self):
        epoch, index = self.start
        per_rank = self.batch_size * self.grad_accum
        while True:
            idx, epoch, index = self.order.take(epoch, index, per_rank * self.ctx.world_size)
            mine = idx[self.ctx.rank * per_rank : (self.ctx.rank + 1) * per_rank]
            for a in range(self.grad_accum):
                yield mine[a * self.batch_size : (a + 1) * self.batch_size]
