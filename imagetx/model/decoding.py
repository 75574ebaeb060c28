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

from imagetx.model import consistency, kernels, native, noise, sampling
from imagetx.model.drawing import draw
from imagetx.model.static import StaticDecoder, static_problem
from imagetx.model.cache import Position


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

    window > 1: steps(k, values) also runs positions k .. k + W - 1 (W <= window) in one pass, for
    parallel decoding (see generate); a later call may start anywhere after the last pass's first
    position, and positions it computes again overwrite their keys in the caches.
    """

    def __init__(self, model, batch: int, labels=None, source=None, window: int = 1):
        self.model = model
        self.window = window
        p = next(model.parameters())
        like = torch.empty(0, device=p.device, dtype=p.dtype)
        self.cond, memory = model.condition(labels, source)  # (B, 1 or Lp, d) or None
        self.position = Position()
        visibility = getattr(model, "visibility", None)  # local 2D: a buffer on the model's device
        self.caches = [block.make_cache(batch, like, self.position, memory, visibility, window) for block in model.blocks]
        self.gen_to_internal = model.layout.gen_to_internal_list  # host data: no device read per step
        # every layer in one C call where it applies (bf16 on a CPU with AVX512-BF16; model/native)
        self.fused = native.FusedStep(model, self.caches, batch, window) if native.applies(model) else None
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

    def steps(self, k: int, values: torch.Tensor, ranges=None) -> torch.Tensor:
        """Positions k .. k + W - 1 in one pass (1 <= W <= window): values, the values at steps
        k - 1 .. k + W - 2 (from step 0 when k = 0: W - 1 of them), long (B, W or W - 1) or
        (B, ., C) for DMOL; ranges: model.range_input only, long (B, W, 3) of the W positions ->
        their outputs (B, W, 256 or P), each equal to step()'s at its position given those inputs.

        The fused step computes the W rows in one call, each exactly as a one-position call does
        (decode.c), reading every weight once per pass. The torch path runs the W positions one
        at a time through step(): torch's products do not round a row the same way for every
        number of rows (fp32 on the CPU: a one-row product takes another kernel than a W-row
        one), and a parallel pass must give the bits a sequential step gives."""
        W = values.shape[1] + (1 if k == 0 else 0)
        if not 1 <= W <= self.window or k + W > len(self.gen_to_internal):
            raise ValueError(f"a pass takes 1 to {self.window} positions inside the image, got {W} from step {k}")
        for cache, _ in self.caches:
            cache.reserve(k, k + W - 1)
        if self.fused is None:
            outs = []
            for j in range(W):
                prev = None if k + j == 0 else values[:, j - 1 if k == 0 else j]
                outs.append(self.step(k + j, prev, None if ranges is None else ranges[:, j]))
            return torch.stack(outs, dim=1)
        m = self.model
        internals = self.gen_to_internal[k : k + W]
        x = m.decoder_input(m.embed_inputs(values, k, ranges), self.cond, m.gen_to_internal[k : k + W])  # (B, W, d)
        cache = self.caches[0][0]
        if cache.second_buffers() is not None and self.fused.ring_rows is None:  # window 1: the one-position step
            return self.step(k, None if k == 0 else values[:, 0], None if ranges is None else ranges[:, 0])[:, None]
        if self.fused.ring_rows is not None:  # local 2D: keys read straight from the ring
            slots, los, his, at = self.fused.ring_places(internals)
            x = self.fused.run(x, slots, los, his, None, internals, at)
        else:
            places = [cache.place(k + j) for j in range(W)]
            slots, los, his, off2 = (list(c) for c in zip(*places))
            x = self.fused.run(x, slots, los, his, off2, internals)
        self.position.step, self.position.internal = k + W - 1, internals[-1]
        return m.head(m.final_norm(x))


# Gumbel noise is made for this many values at a time (several steps at once: fewer kernel
# launches on a GPU), 4 MiB of float32
NOISE_CHUNK = 1 << 20

EMPTY_RANGE = ("no value is left to draw (an empty range): the values placed before it already break the "
               "restriction, e.g. a primed image that does not area-downsample to its input")


DECODE_MODES = ("sequential", "parallel", "auto")
GUESSES = ("above", "zeros", "random")
# positions per pass of parallel decoding, chosen on the trained packaged models at batch 1
# (benchmarks/sampling.py --decode, docs/benchmarks.md): 8 was within 3% of the fastest window on
# both fashion-mnist (4) and shapes (16)
DEFAULT_WINDOW = 8


def decode_problems(decode, window) -> list[str]:
    """What is wrong with a decoding mode and window size, one line each (none: [])."""
    p = []
    if decode not in DECODE_MODES:
        p.append(f"--decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        p.append(f"--window must be a positive integer, got {window!r}")
    return p


def compile_problems(compile, use_cache: bool = True) -> list[str]:
    """What is wrong with --compile / --no-compile (None, True or False), one line each."""
    if compile is not None and not isinstance(compile, bool):
        return [f"--compile must be on, off or left out, got {compile!r}"]
    if compile and not use_cache:
        return ["--compile decodes with the cache: leave out --no-cache"]
    return []


def decoder_name(model, use_cache: bool = True, compile: bool | None = None, restricted: bool = False) -> str:
    """Which decoder sampling from `model` (the decoding copy) takes, for a summary: "fused" (the
    C step), "compiled" (the static step through torch.compile: CUDA graphs on a GPU), "static"
    or "torch". Raises ConfigError, named for the command line, where --compile asks for what
    the model (or a restricted draw) does not take."""
    from imagetx.errors import ConfigError

    if not use_cache:
        return "torch"
    problem = static_problem(model, restricted or model.config.consistent)
    if compile and problem is not None:
        raise ConfigError([f"--compile: sampling with {problem} takes the eager decoder; leave --compile out"])
    take, compiled = static_decoding(model, None, compile) if problem is None else (False, False)
    return "compiled" if compiled else "static" if take else "fused" if native.applies(model) else "torch"


def resolve_decode(model, decode: str, n: int, use_cache: bool = True) -> str:
    """"auto" -> "parallel" where it is exact and measured faster: the fused C step (model/native)
    at batch 1 (benchmarks/sampling.py --decode); "sequential" elsewhere. Other modes as given."""
    if decode != "auto":
        return decode
    return "parallel" if use_cache and n == 1 and native.applies(model) else "sequential"


def generate(
    model, n, labels=None, source=None, temperature=1.0, generator=None, use_cache=True,
    prime=None, prime_mask=None, progress=None, constraint=None, seed: int | None = None, first_index: int = 0,
    decode: str = "sequential", window: int = DEFAULT_WINDOW, first_guess: str = "above", watch=None,
    static: bool | None = None, compile: bool | None = None,
) -> torch.Tensor:
    """See ImageTransformer.sample.

    decode: "sequential" (one position per step), "parallel" (Jacobi iteration with the same fixed
    noise: passes of `window` positions, each guessed first from the sub-pixel above, first_guess
    "above", or "zeros" or "random" values, then from the last pass; each pass keeps every position
    whose inputs were already right; see _parallel) or "auto" (resolve_decode). The images are
    the same in every mode: bit for bit where a pass computes every position as a one-position
    step does (the fused C step; the torch path runs a pass one position at a time), up to the
    rounding of a W-row pass on a GPU (see static).

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
    never empty while the values before it were in theirs), so without a prime nothing is read.

    watch: optional callable(done, total, image) told the image so far after every step
    (sequential) or pass (parallel): image, long (n, H, W, C), holds the values of the first
    `done` generation steps (and primed values) and zeros elsewhere; it is the decoder's own
    buffer, so a watcher that keeps it copies it. A parallel pass decides done - (the last done)
    positions at once.

    static: cached decoding through model/static.py's StaticDecoder, every step (or parallel
    pass) the same kernels on the same buffers, captured as a CUDA graph on a GPU (torch.compile,
    mode="reduce-overhead"). Sequential decoding draws the same images as IncrementalDecoder. A
    parallel pass computes its W positions together, as one W-row product: where that rounds a
    row otherwise than a one-row step (CUDA, the CPU's fp32 and bf16), the images are those of
    sequential decoding up to that rounding of the conditionals, not bit for bit (IncrementalDecoder's
    passes keep the bits: one position at a time through torch, W rows as one in the fused C step).
    None: on CUDA, where it applies (static.static_problem), else IncrementalDecoder.
    compile: run the static step through torch.compile(mode="reduce-overhead"), which on CUDA
    captures it as a CUDA graph; on CPU Inductor's code, with no graph. None: on CUDA. The first
    call waits for the compiler (torch keeps the code in its cache for later runs), so a short
    job may end sooner without. True asks for the static decoder too. static_decoding says what
    these resolve to."""
    cfg = model.config
    sampling.check_temperature(temperature)
    problems = decode_problems(decode, window) + ([] if first_guess in GUESSES else [f"first_guess must be one of {GUESSES}"])
    if problems:
        raise ValueError("; ".join(problems))
    auto = decode == "auto"
    decode = resolve_decode(model, decode, n, use_cache)
    if decode == "parallel" and not use_cache:
        raise ValueError("parallel decoding needs the cache (use_cache=True)")
    if decode == "parallel" and constraint is not None and not hasattr(constraint, "snapshot"):
        raise ValueError("parallel decoding needs a constraint with snapshot() and restore()")
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
    take, compiled = static_decoding(model, static, compile, device, constraint, cells) if use_cache else (False, False)
    if take and auto:  # "auto" decodes in parallel where that is exact and faster: the fused C step's
        decode = "sequential"
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
    if decode == "parallel":
        try:
            flat = x.view(n, cfg.seq_len, -1)
            seen = None if watch is None else (lambda done: watch(done, cfg.seq_len, x))
            if take:
                passes = StaticDecoder(model, n, labels, source, window=window, draws=False).compiled(compiled)
            else:
                passes = IncrementalDecoder(model, n, labels, source, window)
            empty = _parallel(model, passes, flat, temperature, seed, images, per_step, window, constraint, cells,
                              keep if prime is not None else None, empty, progress, first_guess, seen)
        finally:
            model.train(was_training)
        if empty is not None and bool(empty):
            raise ValueError(EMPTY_RANGE)
        return x.to(torch.uint8)
    try:
        flat = x.view(n, cfg.seq_len, -1)  # (n, L, 1) categorical or (n, L, C) DMOL, grid order
        steps = model.layout.order_list  # generation step -> grid position
        fixed = None
        if take:
            fixed = StaticDecoder(model, n, labels, source, temperature, seed, images).compiled(compiled)
        decoder = IncrementalDecoder(model, n, labels, source) if use_cache and fixed is None else None
        prev = gumbel = None
        for k, g in enumerate(steps):
            if fixed is not None:  # the whole step on the device, the draw included
                value = fixed.step(k).view(n, -1)
            else:
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
                if fixed is not None:  # the next step's input is the value placed
                    fixed.inputs.copy_(value.view_as(fixed.inputs))
            flat[:, g] = value
            if constraint is not None:
                constraint.record(g, value[:, 0] if cfg.output == "categorical" else value)
            prev = value[:, 0] if cfg.output == "categorical" else value
            if cells is not None:
                cells.record(g, prev)
            if progress is not None:
                progress(k + 1, len(steps))
            if watch is not None:
                watch(k + 1, len(steps), x)
    finally:
        model.train(was_training)
    if empty is not None and bool(empty):
        raise ValueError(EMPTY_RANGE)
    return x.to(torch.uint8)


def static_decoding(model, static: bool | None = None, compile: bool | None = None, device=None, constraint=None,
                    cells=None) -> tuple[bool, bool]:
    """What generate's `static` and `compile` come to for this model on `device` (its own when
    None) -> (static decoder, compiled). Raises ValueError for static or compile True where the
    static decoder does not apply (static.static_problem), and for compile without it."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if compile and static is False:
        raise ValueError("compiled decoding is the static decoder's: compile=True needs static=None or True")
    problem = static_problem(model, constraint is not None, cells is not None)
    if problem is not None and (static or compile):
        raise ValueError(f"{'compiled' if compile else 'static'} decoding does not take {problem}")
    gpu = device.type == "cuda" and torch.cuda.is_available()  # (not under a fake CUDA mode)
    take = problem is None and (static if static is not None else bool(compile) or device.type == "cuda")
    return take, take and (compile if compile is not None else gpu)


def _above(layout) -> list[int]:
    """Per generation step, the step of the sub-pixel above it (same column, the row before;
    always generated earlier in every order here), or the step itself in the first row (its
    own value, as it stands, is its guess): host data."""
    step_of = {g: k for k, g in enumerate(layout.order_list)}
    return [step_of[g - layout.cols] if g >= layout.cols else k for k, g in enumerate(layout.order_list)]


def _parallel(model, passes, flat, temperature, seed, images, per_step, window, constraint, cells, keep,
              empty, progress, first_guess, seen=None):
    """Parallel (Jacobi) decoding into flat (n, L, 1 or C) (grid order, primed values in place,
    keep: where they are, or None) by the passes of `passes` (an IncrementalDecoder or a
    StaticDecoder for `window` positions: its steps()); returns the `empty` flag as generate
    keeps it. seen: None, or called with the number of positions decided after every pass, once
    flat holds them.

    Every position's noise is fixed (noise.value_gumbel at its step), so its value is a function
    of the values before it. A pass runs positions k .. k + W - 1 on guesses of their inputs, draws
    every one of them, and keeps the longest run from k whose inputs were right: position k always
    (its inputs are final), position k + j when the values drawn at k .. k + j - 1 equal the guesses
    the pass took; the batch moves on by its smallest run (one read back per pass). The values drawn
    past the run are the next pass's guesses. The bounds and range inputs of model.consistent and
    model.range_input follow the guesses inside a pass and are rolled back to the values kept."""
    cfg = model.config
    n, L = flat.shape[0], cfg.seq_len
    device = flat.device
    steps = model.layout.order_list  # generation step -> grid position
    order = torch.tensor(steps, device=device)
    vals = flat[:, order]  # (n, L, per) generation order: primed values, zeros elsewhere
    kept = None if keep is None else keep[:, order]  # (n, L, per) bool
    if first_guess == "random":  # a fixed pattern of its own: the guesses must not change the result
        at = torch.arange(L, device=device)[:, None], torch.arange(per_step, device=device)
        random = noise.hash64(seed ^ 1, images[:, None, None], *at) & 255  # (n, L, per)
        vals = random if kept is None else torch.where(kept, vals, random)
    above = _above(model.layout)
    above_t = torch.tensor(above, device=device)
    # whether each step's sub-pixel above comes before it by more than `window` steps: then, as
    # a window enters new steps, every one above is older than all of them (one gather)
    far = [k - a > window or a == k for k, a in enumerate(above)]
    follow = [c for c in (constraint, cells) if c is not None]  # told the values placed
    chunk = max(window, NOISE_CHUNK // (n * per_step * 256))
    noise_from, gumbel = 0, None
    k = frontier = 0
    while k < L:
        W = min(window, L - k)
        if first_guess == "above" and frontier < k + W:  # new positions: the sub-pixel above, as it stands now
            # one gather when every one above is older; in a window longer than a row one new
            # position is above another, so they go one at a time, in order
            runs = [(frontier, k + W)] if all(far[frontier : k + W]) else [(p, p + 1) for p in range(frontier, k + W)]
            for a, b in runs:
                guess = vals[:, above_t[a:b]]
                vals[:, a:b] = guess if kept is None else torch.where(kept[:, a:b], vals[:, a:b], guess)
        frontier = max(frontier, k + W)
        guesses = vals[:, k : k + W]  # (n, W, per)
        inputs = vals[:, max(k - 1, 0) : k + W - 1]
        inputs = inputs[..., 0] if cfg.output == "categorical" else inputs
        bounds = ranges = None
        if follow:  # follow the guesses, then roll back
            saved = [c.snapshot() for c in follow]
            los, his, rows = [], [], []
            for j in range(W):
                g, v = steps[k + j], guesses[:, j, 0] if cfg.output == "categorical" else guesses[:, j]
                if constraint is not None:
                    lo, hi = constraint.bounds(g)
                    los.append(lo)
                    his.append(hi)
                if cells is not None:
                    rows.append(cells.range_inputs(g))
                for c in follow:
                    c.record(g, v)
            for c, state in zip(follow, saved):
                c.restore(state)
            if constraint is not None:
                # (n * W,) categorical, (n * W, C) DMOL: one row per drawn position
                bounds = tuple(torch.stack(b, 1).flatten(0, 1) for b in (los, his))
            if cells is not None:
                ranges = torch.stack(rows, 1)  # (n, W, 3)
        out = passes.steps(k, inputs, ranges)  # (n, W, out)
        gumbel_now = None
        if temperature > 0:
            if gumbel is None or k + W > noise_from + gumbel.shape[1]:
                noise_from = k
                ahead = torch.arange(k, min(k + max(chunk, W), L), device=device)
                gumbel = noise.value_gumbel(seed, images, ahead, per_step)  # (n, S, per, 256)
            gumbel_now = gumbel[:, k - noise_from : k - noise_from + W].reshape(n * W, per_step, -1)
        drawn = draw(out.reshape(n * W, -1), cfg, temperature, gumbel_now, bounds).view(n, W, -1)
        if kept is not None:
            drawn = torch.where(kept[:, k : k + W], guesses, drawn)
        # the batch keeps positions k .. up to the first that any image drew unlike its guess
        wrong = (drawn != guesses).any(dim=(0, 2)).tolist()  # (W,): the one read back per pass
        vals[:, k : k + W] = drawn
        accepted = wrong.index(True) + 1 if True in wrong else W
        if empty is not None:  # a range left empty by primed values, among the positions kept
            lo, hi = (b.view(n, W, -1)[:, :accepted] for b in bounds)
            empty = empty | (lo > hi).any()
        for j in range(accepted if follow else 0):
            v = drawn[:, j, 0] if cfg.output == "categorical" else drawn[:, j]
            for c in follow:
                c.record(steps[k + j], v)
        for j in range(accepted if progress is not None else 0):  # once per position, as sequential decoding
            progress(k + j + 1, L)
        if seen is not None:  # only for a watcher: the positions decided, into the image
            flat[:, order[k : k + accepted]] = vals[:, k : k + accepted]
            seen(k + accepted)
        k += accepted
    flat[:, order] = vals
    return empty


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
