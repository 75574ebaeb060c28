"""Where each sequence position lives: generation order, internal layout and attention masks.

The image's sub-pixels (or pixels, for DMOL) form a grid of `rows x cols` = (H, W*C). The model
generates them in an order that depends on the attention pattern: raster order for local 1D and
full attention, block-raster order for local 2D (blocks of `query_shape` in raster order, raster
order inside each block). Hidden states are kept in an *internal layout* that makes the blocked
attention a pair of views:

- local1d / full: the raster sequence itself (length L).
- local2d: the grid padded up to whole blocks (Hp, Wp), stored block after block in block-raster
  order (length Hp*Wp). Padding positions carry no data; they are masked out as keys.

Two kinds of masks live here. `dense_mask` builds the (Lp, Lp) pattern straight from each
pattern's definition (spelled out in its docstring) and is the reference every fast path is
tested against. The `window_*` tensors describe the same pattern as, per query block, a fixed
window of keys plus a (block, query, key) mask: that is what the fast attention and the
decoding caches use.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import torch

from imagetx.model.config import ModelConfig


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Layout:
    """Index tensors and masks of one attention pattern (all on CPU; the model registers buffers).

    rows, cols: the sequence grid. internal_len: Lp. block: query block size (positions).
    order: long (L,) generation index -> grid index (row * cols + col).
    grid_to_internal: long (L,) grid index -> internal index.
    row_of, col_of: long (Lp,) grid coordinates of every internal position (padding included).
    valid: bool (Lp,) True for real positions.
    window_mask: bool (num_blocks, block, window) which window keys each query may see.
    """

    kind: str
    rows: int
    cols: int
    internal_len: int
    block: int
    num_blocks: int
    window: int
    order: torch.Tensor
    grid_to_internal: torch.Tensor
    row_of: torch.Tensor
    col_of: torch.Tensor
    valid: torch.Tensor
    window_mask: torch.Tensor | None
    # local2d geometry (effective, clipped to what can exist inside the grid)
    query_shape: tuple[int, int] = (0, 0)
    flange: tuple[int, int] = (0, 0)
    padded_grid: tuple[int, int] = (0, 0)
    # The model moves hidden states between three orders with two separate maps: generation
    # order -> internal layout at the input, internal layout -> grid (raster) order at the
    # output. Each map may be skipped only when it is itself the identity: local 2D with no
    # padding has an identity generation map (the internal layout *is* block-raster order) but,
    # with two or more blocks per row, not an identity grid map.
    generation_is_internal: bool = field(init=False)  # generation position k is internal position k
    grid_is_internal: bool = field(init=False)  # grid position g is internal position g
    # Host-side bookkeeping for decoding, as Python data worked out once here from these CPU
    # tensors: a decoding step reads it instead of reading a device tensor back (a host sync
    # per step on a GPU).
    order_list: list[int] = field(init=False)  # generation step -> grid index
    gen_to_internal_list: list[int] = field(init=False)  # generation step -> internal index
    # local patterns: per block b its window keys in visibility order, visibility[b]; how many of
    # them query i of block b sees, visible_count[b][i] (see visibility_order); and the place of
    # window key j in block b's order, visibility_slot[b][j]
    visibility: list[list[int]] | None = field(init=False)
    visible_count: list[list[int]] | None = field(init=False)
    visibility_slot: list[list[int]] | None = field(init=False)
    # local patterns as lower-right causal attention, for flash-class kernels (causal_groups)
    causal_groups: list[tuple[int, torch.Tensor, torch.Tensor]] | None = field(init=False)
    # every pattern: the keys each decoding step sees (visible_keys), the host data behind the
    # slot plans of static decoding (slot_plan, model/static.py)
    decoding_keys: tuple[list[list[int]], list[int], list[int]] = field(init=False)

    def __post_init__(self):
        same_length = self.internal_len == self.seq_len
        identity = torch.arange(self.seq_len)
        self.generation_is_internal = same_length and bool(torch.equal(self.gen_to_internal, identity))
        self.grid_is_internal = same_length and bool(torch.equal(self.grid_to_internal, identity))
        self.order_list = self.order.tolist()
        self.gen_to_internal_list = self.gen_to_internal.tolist()
        self.visibility = self.visible_count = self.visibility_slot = self.causal_groups = None
        if self.window_mask is not None:
            order, self.visible_count = visibility_order(self.window_mask, self.valid)
            self.visibility, self.visibility_slot = order.tolist(), torch.argsort(order, dim=1).tolist()
            self.causal_groups = causal_groups(self)
        self.decoding_keys = visible_keys(self)

    @property
    def seq_len(self) -> int:
        return self.rows * self.cols

    @property
    def gen_to_internal(self) -> torch.Tensor:
        return self.grid_to_internal[self.order]

    def dense_mask(self, config: ModelConfig) -> torch.Tensor:
        """bool (Lp, Lp): key j visible from query i, built from the pattern's definition."""
        return dense_mask(self, config)


def visibility_order(window_mask: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
    """Per block of a local pattern, its window keys in the order the block's queries come to
    see them, so that what each query sees is a prefix of that order: no mask is needed when
    decoding (scaled_dot_product_attention with a mask is several times slower for one query).

    window_mask bool (blocks, block, window), valid bool (blocks * block,) or shorter (the real
    queries; others are never decoded), both on the CPU -> (order long (blocks, window),
    count[b][i]: query i of block b sees keys order[b, :count[b][i]]). Raises ValueError when a
    real query stops seeing a key an earlier one saw: then no order works (the causal patterns
    here never do that).
    """
    nb, lq, W = window_mask.shape
    real = torch.zeros(nb * lq, dtype=torch.bool)
    real[: valid.numel()] = valid
    real = real.view(nb, lq, 1)
    m = window_mask & real
    i = torch.arange(lq).view(1, lq, 1)
    first = torch.where(m.any(1), m.int().argmax(1), lq)  # (nb, W): the first query that sees each key
    sees = first.unsqueeze(1) <= i  # (nb, lq, W)
    if not torch.equal(m, sees & real):
        raise ValueError("a query of this attention pattern does not see every key an earlier query saw")
    order = torch.argsort(first, dim=1, stable=True)
    return order, sees.sum(-1).tolist()


def window_positions(layout: Layout) -> torch.Tensor:
    """Local patterns: long (blocks, window), the internal position of key j of block b's window
    (layout.window_mask's key order), or -1 where the window reaches outside the padded grid."""
    nb, lq, W = layout.num_blocks, layout.block, layout.window
    if layout.kind == "local1d":  # [previous block | own block]
        pos = (torch.arange(nb)[:, None] - 1) * lq + torch.arange(W)[None, :]
        return torch.where((pos >= 0) & (pos < layout.internal_len), pos, -1)
    (qh, qw), (fh, fw), (Hp, Wp) = layout.query_shape, layout.flange, layout.padded_grid
    kw = qw + 2 * fw
    nbw = Wp // qw
    b, j = torch.arange(nb)[:, None], torch.arange(W)[None, :]
    r = (b // nbw) * qh + j // kw - fh  # padded-grid row and column of each window key
    c = (b % nbw) * qw + j % kw - fw
    inside = (r >= 0) & (r < Hp) & (c >= 0) & (c < Wp)
    pos = ((r // qh) * nbw + c // qw) * (qh * qw) + (r % qh) * qw + c % qw
    return torch.where(inside, pos, -1)


def causal_groups(layout: Layout) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """A local pattern as lower-right causal attention over gathered keys, the form flash-class
    kernels take: the n real queries of block b (in order) see the same F keys before them (the
    previous block, or the valid flange) and, in visibility order, the block's own real keys up
    to themselves, so query t sees the first F + t + 1 keys of block b's visibility order.
    Blocks with the same (F, n) form a group -> per group (F, queries long (blocks, n): the
    internal positions of its blocks' real queries, keys long (blocks, F + n): those of the keys
    they see, in visibility order); CPU tensors. Padding queries are in no group (their outputs
    are never read). Raises ValueError for a pattern not of this form."""
    positions = window_positions(layout)
    real = torch.zeros(layout.num_blocks * layout.block, dtype=torch.bool)
    real[: layout.valid.numel()] = layout.valid
    real = real.view(layout.num_blocks, layout.block).tolist()
    groups: dict[tuple[int, int], tuple[list, list]] = {}
    for b, (count, order) in enumerate(zip(layout.visible_count, layout.visibility)):
        queries = [i for i in range(layout.block) if real[b][i]]
        if not queries:
            continue
        before = count[queries[0]] - 1
        if any(count[i] != before + t + 1 for t, i in enumerate(queries)):
            raise ValueError("this attention pattern is not causal over a fixed set of earlier keys")
        keys = positions[b, order[: before + len(queries)]]
        if bool((keys < 0).any()):
            raise ValueError("a visible key lies outside the padded grid")
        q_list, k_list = groups.setdefault((before, len(queries)), ([], []))
        q_list.append([b * layout.block + i for i in queries])
        k_list.append(keys.tolist())
    return [(before, torch.tensor(q), torch.tensor(k)) for (before, _), (q, k) in sorted(groups.items())]


@dataclass(frozen=True)
class SlotPlan:
    """Where each key of a cached decoding lives in a static cache of `slots` slots, as host data
    (model/static.py makes its tables from it; slot_plan makes the plan).

    slot_of[k]: the slot generation step k's key and value are written to.
    group_of[k]: step k's block, the group of steps that share one list of keys.
    count[k]: how many keys of its block's list step k sees (a prefix).
    rank[g][s]: while block g's steps run, slot s holds the key at place rank[g][s] of g's list,
    or a key none of them sees (rank = slots, above every count): step k sees slot s exactly
    when rank[group_of[k]][s] < count[k]."""

    slots: int
    slot_of: list[int]
    group_of: list[int]
    count: list[int]
    rank: list[list[int]]


def visible_keys(layout) -> tuple[list[list[int]], list[int], list[int]]:
    """The keys each decoding step sees, by generation step -> (lists, group, count): step k sees
    lists[group[k]][:count[k]], each list in the order its block's steps come to see the keys.
    Raises ValueError where a step would see a key that is not generated before it or itself."""
    L = layout.seq_len
    if layout.window_mask is None:  # full attention: one list, the whole prefix
        return [list(range(L))], [0] * L, [k + 1 for k in range(L)]
    gen_of = {p: k for k, p in enumerate(layout.gen_to_internal_list)}
    positions = window_positions(layout).tolist()
    lists, group, count, index = [], [], [], {}
    for k, p in enumerate(layout.gen_to_internal_list):
        b, i = divmod(p, layout.block)
        if b not in index:
            index[b] = len(lists)
            lists.append([gen_of.get(positions[b][j], L) for j in layout.visibility[b]])  # L: padding
        group.append(index[b])
        count.append(layout.visible_count[b][i])
    most = [0] * len(lists)
    for g, n in zip(group, count):
        most[g] = max(most[g], n)
    lists = [keys[:n] for keys, n in zip(lists, most)]  # the keys some step sees; past them padding's
    latest = [list(itertools.accumulate(keys, max)) for keys in lists]  # the latest key of each prefix
    for k, (g, n) in enumerate(zip(group, count)):
        if latest[g][n - 1] != k:  # distinct keys: k is among them exactly when it is the latest
            raise ValueError(f"decoding step {k} would see a key generated after it, or not its own")
    return lists, group, count


def slot_plan(layout, window: int = 1) -> SlotPlan:
    """Slots for every key of a cached decoding in `layout` by passes of up to `window` positions
    (1: one position per step), allocated greedily, lowest free slot first, in generation order.

    A slot is reused once no step reads its key for window - 1 steps more: parallel decoding runs
    a pass over steps k .. k + W - 1, then goes back to any of them, so a key the first of them
    reads must outlive every key the pass writes. For window > 1 the plan also covers window - 1
    steps past the last, L .. L + window - 2, which a pass near the end computes and nobody
    reads: each writes a slot of its own and sees only those slots (group G, rank 0, count 1)."""
    lists, group, count = layout.decoding_keys
    L = layout.seq_len
    last_step = [0] * len(lists)
    for k, g in enumerate(group):
        last_step[g] = k  # steps of a block are consecutive and counts grow: the last reads most
    last_read = list(range(L))  # a step reads its own key
    for g, keys in enumerate(lists):
        for j in keys:
            last_read[j] = max(last_read[j], last_step[g])
    freed_after: list[list[int]] = [[] for _ in range(L)]
    for j, k in enumerate(last_read):
        freed_after[min(k + window - 1, L - 1)].append(j)
    slot_of, free, slots = [0] * L, [], 0
    for k in range(L):
        if free:
            slot_of[k] = heapq.heappop(free)
        else:
            slot_of[k], slots = slots, slots + 1
        for j in freed_after[k]:
            heapq.heappush(free, slot_of[j])
    past = window - 1  # steps past the end
    slot_of += list(range(slots, slots + past))
    slots += past
    rank = [[slots] * slots for _ in range(len(lists) + (1 if past else 0))]
    for g, keys in enumerate(lists):
        for place, j in enumerate(keys):
            rank[g][slot_of[j]] = place
    for s in slot_of[L:]:
        rank[-1][s] = 0
    return SlotPlan(slots, slot_of, group + [len(lists)] * past, count + [1] * past, rank)


def make_layout(config: ModelConfig) -> Layout:
    rows, cols = config.grid
    if config.attention == "local2d":
        return _layout_2d(config, rows, cols)
    L = rows * cols
    idx = torch.arange(L)
    row_of, col_of = idx // cols, idx % cols
    valid = torch.ones(L, dtype=torch.bool)
    if config.attention == "full":
        return Layout("full", rows, cols, L, L, 1, L, idx, idx, row_of, col_of, valid, None)
    lq = min(config.block_length, L)
    nb = _ceil_div(L, lq)
    mask = local1d_window_mask(lq, nb)
    return Layout("local1d", rows, cols, L, lq, nb, 2 * lq, idx, idx, row_of, col_of, valid, mask)


def local1d_window_mask(block: int, num_blocks: int) -> torch.Tensor:
    """bool (num_blocks, block, 2 * block): which keys of its window [previous block | own block]
    each query of each block may see (key j of block b's window sits at (b - 1) * block + j)."""
    i = torch.arange(block)[:, None]
    j = torch.arange(2 * block)[None, :]
    own = (j >= block) & (j - block <= i)
    prev = (j < block).expand(block, 2 * block)
    mask = (own | prev).unsqueeze(0).repeat(num_blocks, 1, 1)
    mask[0, :, :block] = False  # block 0 has no memory block
    return mask


def _layout_2d(config: ModelConfig, rows: int, cols: int) -> Layout:
    qh, qw = min(config.query_shape[0], rows), min(config.query_shape[1], cols)
    nbh, nbw = _ceil_div(rows, qh), _ceil_div(cols, qw)
    Hp, Wp = nbh * qh, nbw * qw
    # Flange beyond what any block can reach is all padding: clipping it changes nothing.
    fh = min(config.memory_flange[0], (nbh - 1) * qh)
    fw = min(config.memory_flange[1], (nbw - 1) * qw)
    lq, nb = qh * qw, nbh * nbw
    # internal index p -> (block row, block col, row in block, col in block)
    p = torch.arange(Hp * Wp)
    blk, inner = p // lq, p % lq
    row_of = (blk // nbw) * qh + inner // qw
    col_of = (blk % nbw) * qw + inner % qw
    valid = (row_of < rows) & (col_of < cols)
    grid_index = row_of * cols + col_of
    grid_to_internal = torch.empty(rows * cols, dtype=torch.long)
    grid_to_internal[grid_index[valid]] = p[valid]
    order = grid_index[valid]  # internal order restricted to real positions = block-raster
    # Static window mask: window (kh, kw) = rows [r0 - fh, r0 + qh), cols [c0 - fw, c0 + qw + fw).
    kh, kw = fh + qh, qw + 2 * fw
    wr = torch.arange(kh)[:, None].expand(kh, kw).reshape(-1)
    wc = torch.arange(kw)[None, :].expand(kh, kw).reshape(-1)
    qr, qc = torch.arange(lq) // qw, torch.arange(lq) % qw
    top = (wr < fh)[None, :].expand(lq, -1)
    in_rows = (wr >= fh)[None, :]
    left = in_rows & (wc < fw)[None, :]
    in_block = in_rows & (wc >= fw)[None, :] & (wc < fw + qw)[None, :]
    causal = ((wr - fh)[None, :] * qw + (wc - fw)[None, :]) <= (qr * qw + qc)[:, None]
    static = top | left | (in_block & causal)  # (lq, kh*kw)
    # Which window keys are real positions, per block: pad the validity grid like the keys.
    vgrid = torch.zeros(fh + Hp, Wp + 2 * fw, dtype=torch.bool)
    vgrid[fh : fh + rows, fw : fw + cols] = True
    vwin = vgrid.unfold(0, kh, qh).unfold(1, kw, qw)  # (nbh, nbw, kh, kw)
    vwin = vwin.reshape(nb, kh * kw)
    mask = static[None] & vwin[:, None, :]
    # A padding query sees itself, so no softmax row is empty (its output is never used).
    self_key = (qr + fh) * kw + (qc + fw)
    mask[:, torch.arange(lq), self_key] = True
    return Layout(
        "local2d", rows, cols, Hp * Wp, lq, nb, kh * kw, order, grid_to_internal, row_of, col_of,
        valid, mask, query_shape=(qh, qw), flange=(fh, fw), padded_grid=(Hp, Wp),
    )


def dense_mask(layout: Layout, config: ModelConfig) -> torch.Tensor:
    """bool (Lp, Lp) straight from the definitions below (unclipped sizes).

    local1d: key j visible from query i iff j <= i and j // lq >= i // lq - 1 (raster order).
    local2d: top flange (fh rows above the block, fw columns of overhang either side), left
    flange (the block's rows, fw columns to its left), and the block itself causally in
    block-raster order; positions outside the image are never visible (except to themselves).
    full: j <= i.
    """
    Lp = layout.internal_len
    i = torch.arange(Lp)[:, None]
    j = torch.arange(Lp)[None, :]
    if layout.kind == "full":
        return j <= i
    if layout.kind == "local1d":
        lq = config.block_length
        return (j <= i) & (j // lq >= i // lq - 1)
    qh, qw = config.query_shape
    fh, fw = config.memory_flange
    ri, ci = layout.row_of[:, None], layout.col_of[:, None]
    rj, cj = layout.row_of[None, :], layout.col_of[None, :]
    r0, c0 = (ri // qh) * qh, (ci // qw) * qw
    top = (rj >= r0 - fh) & (rj < r0) & (cj >= c0 - fw) & (cj < c0 + qw + fw)
    left = (rj >= r0) & (rj < r0 + qh) & (cj >= c0 - fw) & (cj < c0)
    same_block = (rj // qh == ri // qh) & (cj // qw == ci // qw)
    # inside a block, internal order is raster order within the block
    before = (rj - r0) * qw + (cj - c0) <= (ri - r0) * qw + (ci - c0)
    visible = (top | left | (same_block & before)) & layout.valid[None, :]
    return visible | (i == j)
