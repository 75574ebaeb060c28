"""Autoregressive decoding: the cached incremental decoder and the full-recompute reference.

The incremental decoder runs the model's own modules (ImageTransformer.embed_inputs,
decoder_input, Block.forward) on one position at a time; each layer's attention reads and extends
its cache (see model/attention.py), so one decoding step costs the same whatever the image size
(local patterns).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from imagetx.model import consistency, dmol, kernels, native, noise
from imagetx.model.attention import Position


def for_decoding(model, dtype: torch.dtype = torch.float32, batch: int = 1):
    """The model to sample from in `dtype`: `model` itself for its own dtype, else an inference
    copy in `dtype` (bf16: half the bytes per step; its caches are bf16 too, since they take the
    weights' dtype). On CPU a bf16 copy's linear layers are PackedLinear for `batch` rows, except
    the decoder layers' when the fused step (model/native) decodes with them.
    Sampling draws from float32 log-probabilities in either case (see draw)."""
    if next(model.parameters()).dtype == dtype:
        return model
    frozen = copy.deepcopy(model).eval().requires_grad_(False).to(dtype)
    fused = native.applies(frozen)
    in_blocks = {id(m) for m in frozen.blocks.modules()} if fused else set()
    for parent in list(frozen.modules()):
        if id(parent) in in_blocks:
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and kernels.packing_applies(child.weight):
                setattr(parent, name, kernels.PackedLinear(child, batch))
    return frozen


class IncrementalDecoder:
    """Runs the decoder one position at a time, in generation order, for a batch of B images.

    step(k, prev) takes the value of generation position k-1 (long (B,) for categorical, (B, C)
    for DMOL; ignored at k = 0) and returns the output at position k: logits (B, 256) or DMOL
    parameters (B, P), equal to model(x)[position k] for any x with that prefix. A
    model.range_input model also takes position k's range inputs, long (B, 3) (see
    AreaConsistency.range_inputs).
    """

    def __init__(self, model, batch: int, labels=None, source=None):
        self.model = model
        p = next(model.parameters())
        like = torch.empty(0, device=p.device, dtype=p.dtype)
        self.cond, memory = model.condition(labels, source)  # (B, 1 or Lp, d) or None
        self.position = Position()
        visibility = getattr(model, "visibility", None)  # local 2D: a buffer on the model's device
        self.caches = [block.make_cache(batch, like, self.position, memory, visibility) for block in model.blocks]
        self.gen_to_internal = model.layout.gen_to_internal_list  # host data: no device read per step
        # every layer in one C call where it applies (bf16 on a CPU with AVX512-BF16; model/native)
        self.fused = native.FusedStep(model, self.caches, batch) if native.applies(model) else None
        per_step = () if model.config.output == "categorical" else (model.config.channels,)
        self.no_values = torch.zeros(batch, 0, *per_step, dtype=torch.long, device=p.device)  # step 0's input: the start vector

    def step(self, k: int, prev=None, ranges=None) -> torch.Tensor:
        m = self.model
        self.position.step, self.position.internal = k, self.gen_to_internal[k]
        values = self.no_values if k == 0 else prev[:, None]  # (B, 1) or (B, 1, C)
        ranges = None if ranges is None else ranges[:, None]  # (B, 1, 3)
        x = m.decoder_input(m.embed_inputs(values, k, ranges), self.cond, m.gen_to_internal[k : k + 1])  # (B, 1, d)
        if self.fused is not None:
            places = [cache.prepare() for cache, _ in self.caches]  # the same place in every layer
            x = self.fused(x, *places[0], self.position.internal)
        else:
            for block, cache in zip(m.blocks, self.caches):
                x = block(x, cache=cache)
        return m.head(m.final_norm(x))[:, 0]


def draw(out: torch.Tensor, config, temperature: float, gumbel=None, bounds=None) -> torch.Tensor:
    """One position's output -> its value(s): long (B,) (categorical) or (B, C) (DMOL).
    gumbel: float32 (B, 1, 256) (categorical) or (B, C, 256) (DMOL), the position's own standard
    Gumbel noise (noise.value_gumbel at its step); not needed at temperature 0. The value is a
    deterministic function of out and gumbel. bounds: optional (lo, hi) of the value(s)' shape:
    draw from the distribution restricted to [lo, hi] and renormalised (see dmol.restrict)."""
    if config.output == "dmol":
        return dmol.dmol_sample(out.float(), config.channels, config.num_mixtures, temperature, gumbel, bounds)
    log_p = out.float() if bounds is None else dmol.restrict(out.float(), *bounds)
    return dmol.sample_softmax(log_p, temperature, None if gumbel is None else gumbel[:, 0])


# Gumbel noise is made for this many values at a time (several steps at once: fewer kernel
# launches on a GPU), 4 MiB of float32
NOISE_CHUNK = 1 << 20

EMPTY_RANGE = ("no value is left to draw (an empty range): the values placed before it already break the "
               "restriction, e.g. a primed image that does not area-downsample to its input")


def generate(
    model, n, labels=None, source=None, temperature=1.0, generator=None, use_cache=True,
    prime=None, prime_mask=None, progress=None, constraint=None, seed: int | None = None, first_index: int = 0,
) -> torch.Tensor:
    """See ImageTransformer.sample.

    seed, first_index: image i is global image first_index + i, and every value drawn for it is
    a function of (seed, first_index + i, its generation step) and the model alone (model/noise.py),
    so a batch of images can be split into batches of any size with matching first_index offsets,
    and over processes, without changing any image. Without a seed, one is drawn from generator
    (torch's default generator when that is None too).

    constraint: optional object restricting the values drawn, with bounds(g) -> (lo, hi) for grid
    position g (long (n,) each for categorical, (n, C) for DMOL) read before drawing position g,
    and record(g, value) told every value placed (drawn or primed), in generation order. A range
    left empty by the values placed before it (lo > hi) raises ValueError once decoding is done:
    only primed values can do that (a drawn value is always inside its range, and a range is
    never empty while the values before it were in theirs), so without a prime nothing is read."""
    cfg = model.config
    dmol.check_temperature(temperature)
    if n < 1:
        raise ValueError(f"number of images must be >= 1, got {n}")
    if seed is None:
        seed = noise.seed_from(generator)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2^64), got {seed!r}")
    if isinstance(first_index, bool) or not isinstance(first_index, int) or first_index < 0:
        raise ValueError(f"first_index must be an integer >= 0, got {first_index!r}")
    model.check_inputs(None, labels, source, batch=n)
    if cfg.consistent and constraint is None:  # the model's own distribution is the restricted one
        constraint = consistency.AreaConsistency(source, cfg.image_size)
    # model.range_input: the model's own inputs follow the values placed, whatever the constraint
    cells = consistency.AreaConsistency(source, cfg.image_size) if cfg.range_input else None
    device = next(model.parameters()).device
    H, W = cfg.image_size
    C = cfg.channels
    x = torch.zeros(n, H, W, C, dtype=torch.long, device=device)
    if prime is not None:
        if prime_mask is None or tuple(prime.shape) != (n, H, W, C) or prime_mask.shape != prime.shape:
            raise ValueError(f"prime and prime_mask must both have shape ({n}, {H}, {W}, {C})")
        x = torch.where(prime_mask.to(device), prime.to(device).long(), x)
        keep = prime_mask.to(device).reshape(n, cfg.seq_len, -1)  # per position (and channel)
    images = first_index + torch.arange(n, device=device)  # (n,) global image indices
    per_step = 1 if cfg.output == "categorical" else C  # values drawn per generation step
    chunk = max(1, NOISE_CHUNK // (n * per_step * 256))  # steps whose noise is made together
    # a range left empty by primed values, read once at the end
    empty = torch.zeros((), dtype=torch.bool, device=device) if prime is not None and constraint is not None else None
    was_training = model.training
    model.eval()
    try:
        flat = x.view(n, cfg.seq_len, -1)  # (n, L, 1) categorical or (n, L, C) DMOL, grid order
        steps = model.layout.order_list  # generation step -> grid position
        decoder = IncrementalDecoder(model, n, labels, source) if use_cache else None
        prev = gumbel = None
        for k, g in enumerate(steps):
            if decoder is not None:
                out = decoder.step(k, prev, None if cells is None else cells.range_inputs(g))
            else:
                full = model(x, labels, source)  # recompute everything: the reference path
                out = full.reshape(n, cfg.seq_len, -1)[:, g]
            if temperature > 0 and k % chunk == 0:
                ahead = torch.arange(k, min(k + chunk, len(steps)), device=device)
                gumbel = noise.value_gumbel(seed, images, ahead, per_step)  # (n, S, 1 or C, 256)
            bounds = None if constraint is None else constraint.bounds(g)
            if empty is not None:
                empty = empty | (bounds[0] > bounds[1]).any()
            value = draw(out, cfg, temperature, None if gumbel is None else gumbel[:, k % chunk], bounds).view(n, -1)
            if prime is not None:
                value = torch.where(keep[:, g], flat[:, g], value)
            flat[:, g] = value
            if constraint is not None:
                constraint.record(g, value[:, 0] if cfg.output == "categorical" else value)
            prev = value[:, 0] if cfg.output == "categorical" else value
            if cells is not None:
                cells.record(g, prev)
            if progress is not None:
                progress(k + 1, len(steps))
    finally:
        model.train(was_training)
    if empty is not None and bool(empty):
        raise ValueError(EMPTY_RANGE)
    return x.to(torch.uint8)


@torch.inference_mode()
def teacher_forced_outputs(model, x, labels=None, source=None) -> torch.Tensor:
    """Outputs of the incremental decoder fed the true prefix of x: (B, L, out) in generation
    order. Equals model(x) read in generation order; the tests hold the cache to that."""
    cfg = model.config
    B = x.shape[0]
    decoder = IncrementalDecoder(model, B, labels, source)
    flat = x.reshape(B, cfg.seq_len, -1).long()
    ranges = model.cells.range_inputs(x, source).view(B, cfg.seq_len, 3) if cfg.range_input else None  # grid order
    outs, prev = [], None
    for k, g in enumerate(model.layout.order_list):
        outs.append(decoder.step(k, prev, None if ranges is None else ranges[:, g]))
        prev = flat[:, g, 0] if cfg.output == "categorical" else flat[:, g]
    return torch.stack(outs, dim=1)
