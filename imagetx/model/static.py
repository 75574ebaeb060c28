"""Cached decoding with static shapes, for CUDA graphs: every step is the same sequence of kernels
on the same buffers, with the position held in a device tensor.

IncrementalDecoder's caches (model/cache.py) pick their slices and their branches (a new block,
a shift of the local 1D window, the local 2D ring's gather) with Python integers, so each step
is a different sequence of operations: on a GPU each is launched one by one, about 150 kernels
a step by a count of the code, milliseconds against a step whose weights are read in tens of
microseconds. StaticDecoder decodes the same positions with no Python branch and no host value
inside a step:

- one key/value buffer of S slots per layer, in every pattern. A slot plan (layout.slot_plan),
  worked out once from the layout, gives each generation step's key the slot it is written to,
  reusing the slot of a key no later step reads: 2 blocks of slots for local 1D (its key
  window), 1.3 to 2.5 times the key window for the shipped local 2D configs, the whole sequence
  for full attention;
- the keys a step sees are a prefix of its block's keys in visibility order (layout.visibility),
  so a table of each block's keys' places by slot (rank) and the step's count of visible keys
  make the step's mask over the S slots in one comparison, on the device;
- the step index lives in a device buffer (`at`), set by one fill before each step: the
  embedding, the position encodings, the rotary angles, the slot and the mask are read from
  tables at it, and the Gumbel noise of the draw is hashed from it (noise.step_gumbel), so the
  value drawn is computed inside the step too.

Parallel decoding's passes take the same form for W positions at once (window W): the slot
plan then keeps every key W - 1 steps longer, so that a pass may go back to any of its
positions, and W - 1 steps past the image's end get slots of their own, so that every pass has
W rows. The pass returns the W outputs; decoding._parallel draws them and decides what to keep.

The layers are the model's own (Block.forward, Attention.forward with a SlotCache); the step is
the model's forward pass at its positions, as IncrementalDecoder's, and the images are the same
for the same seed (tests/model/test_static_decoding.py holds them to it in float64, one position
a step and in passes). On CUDA, decoding.generate runs a step or a pass through
torch.compile(mode="reduce-overhead"), which captures it as a CUDA graph and replays it.

Not taken here (decoding.generate uses IncrementalDecoder for them): relative logits (their
bias is gathered per key), model.range_input and restricted draws (model.consistent, superres
--consistent: their bounds are worked out on the host).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imagetx.model import noise
from imagetx.model.drawing import draw
from imagetx.model.dmol import to_unit
from imagetx.model.layout import slot_plan


class StepPosition(nn.Module):
    """The positions of a static decoding step (W of them: 1, or a parallel pass's), as device
    buffers the StaticDecoder updates in place at every step: their internal indices (W,), the
    slots their keys go to (W,) and the slots each sees, bool (W, slots). Module state, as every
    tensor a step reads: a captured graph then takes them where they are instead of copying them
    in at each replay."""

    def __init__(self, rows: int, slots: int, device: torch.device):
        super().__init__()
        self.register_buffer("internal", torch.zeros(rows, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("slot", torch.zeros(rows, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("visible", torch.zeros(rows, slots, dtype=torch.bool, device=device), persistent=False)

    def rows(self) -> torch.Tensor:
        """See cache.Position.rows: here an index tensor, read on the device."""
        return self.internal


class SlotCache(nn.Module):
    """A layer's self-attention cache of S slots (layout.slot_plan): the step's keys and values
    go to their slots, all before any of its positions attends, and attention reads all S slots
    under each position's mask."""

    def __init__(self, B, h, hd, slots: int, like: torch.Tensor, position: StepPosition):
        super().__init__()
        self.register_buffer("k", like.new_zeros(B, h, slots, hd), persistent=False)
        self.register_buffer("v", like.new_zeros(B, h, slots, hd), persistent=False)
        object.__setattr__(self, "position", position)  # the decoder's, not a part of each cache

    def attend(self, q, k, v, relative=None):
        if relative is not None:
            raise ValueError("static decoding does not take relative logits")
        self.k.index_copy_(2, self.position.slot, k)
        self.v.index_copy_(2, self.position.slot, v)
        return F.scaled_dot_product_attention(q, self.k, self.v, attn_mask=self.position.visible)


class Memory(nn.Module):
    """Cross-attention's keys and values of the encoder output (cache.MemoryCache), as buffers."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        super().__init__()
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)


def static_problem(model, restricted: bool = False, range_inputs: bool = False) -> str | None:
    """Why StaticDecoder cannot decode for this model, with restricted draws (a constraint:
    model.consistent, superres --consistent) or range inputs, or None when it can."""
    cfg = model.config
    if cfg.relative == "logits":
        return "relative logits"
    if range_inputs or cfg.range_input:
        return "model.range_input"
    if restricted:
        return "restricted draws (model.consistent or superres --consistent)"
    return None


def _on(device: torch.device, data: list) -> torch.Tensor:
    """Host data -> a long tensor on device, through an allocation there (under a fake CUDA
    mode inside inference mode, torch.tensor(data).to(device) would look for a real GPU)."""
    t = torch.tensor(data, dtype=torch.long)
    return torch.empty(t.shape, dtype=torch.long, device=device).copy_(t)


def _kv(cache) -> tuple[torch.Tensor, torch.Tensor]:
    return cache.k, cache.v


class StaticDecoder(nn.Module):
    """Decodes `batch` images with static shapes (see the module doc), `window` positions a call.

    draws (window 1, sequential decoding): forward() draws the value at step `at` (set_step)
    given the value placed at the step before in `inputs` (long (B, 1) categorical, (B, 1, C)
    DMOL; ignored at step 0; a primed value is written there by the caller) -> the value at this
    step, (B,) or (B, C), which it also writes to `inputs` for the next step: drawn as
    drawing.draw draws it from the step's output with the Gumbel noise of (seed, images[i],
    step) (none at temperature 0). step(k) sets the step and calls it.

    not draws (parallel decoding's passes of W = window): forward() runs steps at .. at + W - 1
    on the values in `inputs` (those at steps at - 1 .. at + W - 2) -> their outputs (B, W, 256
    or P), drawn by the caller; steps(k, values) does it as IncrementalDecoder.steps does. Steps
    past the image's end are computed on slots of their own (layout.slot_plan) and dropped.

    The model's parameters and the decoder's buffers are module state and the call takes no
    input: a captured graph reads and writes them all in place."""

    def __init__(self, model, batch: int, labels=None, source=None, temperature: float = 1.0, seed: int = 0,
                 images: torch.Tensor | None = None, window: int = 1, draws: bool = True):
        super().__init__()
        problem = static_problem(model)
        if problem is not None:
            raise ValueError(f"static decoding does not take {problem}")
        self.model = model
        cfg = model.config
        p = next(model.parameters())
        device = p.device
        plan = slot_plan(model.layout, window)
        for name in ("slot_of", "group_of", "count", "rank"):
            self.register_buffer(name, _on(device, getattr(plan, name)), persistent=False)
        internal = model.layout.gen_to_internal_list
        self.register_buffer("internal_of", _on(device, internal + internal[-1:] * (window - 1)), persistent=False)
        if cfg.output == "categorical":  # the embedding rows of step k's input at [k] (step 0's and past the end: 0)
            self.register_buffer("input_offset", F.pad(model.input_offset, (1, window - 1)), persistent=False)
        self.register_buffer("at", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        self.register_buffer("rows", torch.arange(window, device=device), persistent=False)
        self.position = StepPosition(window, plan.slots, device)
        like = torch.empty(0, device=device, dtype=p.dtype)
        cond, memory = model.condition(labels, source)
        self.register_buffer("cond", cond, persistent=False)  # None: nothing added
        self.caches = nn.ModuleList(SlotCache(batch, b.attn.n_heads, b.attn.head_dim, plan.slots, like, self.position)
                                    for b in model.blocks)
        self.memories = nn.ModuleList(Memory(*_kv(b.cross.memory_cache(memory))) if b.cross is not None
                                      else nn.Identity() for b in model.blocks)
        images = torch.arange(batch, device=device) if images is None else images.to(device)
        self.register_buffer("keys", noise.image_keys(seed, images), persistent=False)
        per = () if cfg.output == "categorical" else (cfg.channels,)  # values drawn per step
        for name, t in zip(("noise_channel", "noise_value"), noise.value_counters(max(per, default=1), device=device)):
            self.register_buffer(name, t, persistent=False)
        # the input of each position: the value placed at the step before it
        self.register_buffer("inputs", torch.zeros(batch, window, *per, dtype=torch.long, device=device),
                             persistent=False)
        self.temperature = temperature
        self.window = window
        if draws and window != 1:
            raise ValueError("a static decoder draws one position a call (window 1)")
        self.draws = draws
        self.__dict__["run"] = self  # what steps() calls: this module, or a compiled form of it

    def set_step(self, k: int) -> None:
        """Decode from generation step k at the next call: one fill of a device scalar, no sync."""
        self.at.fill_(k)

    def forward(self) -> torch.Tensor:
        m, pos = self.model, self.position
        steps = self.at + self.rows  # (W,): indexing with it stays on the device
        pos.internal.copy_(self.internal_of[steps])
        pos.slot.copy_(self.slot_of[steps])
        pos.visible.copy_(self.rank[self.group_of[steps]] < self.count[steps, None])
        if m.config.output == "categorical":  # as embed_inputs: the value before, at its channel's rows
            emb = m.embed(self.inputs + self.input_offset[steps]) * m.scale
        else:
            emb = m.embed(to_unit(self.inputs).to(m.start.dtype))
        emb = torch.where((steps == 0)[:, None], m.start.to(emb.dtype), emb)  # step 0: the start vector
        x = m.decoder_input(emb, self.cond, pos.internal)
        for block, cache, memory in zip(m.blocks, self.caches, self.memories):
            x = block(x, cache=(cache, memory if block.cross is not None else None))
        out = m.head(m.final_norm(x))  # (B, W, out)
        if not self.draws:
            return out
        counters = self.noise_channel, self.noise_value
        gumbel = noise.step_gumbel(self.keys, steps, counters)[:, 0] if self.temperature > 0 else None
        value = draw(out[:, 0], m.config, self.temperature, gumbel)
        self.inputs.copy_(value.view_as(self.inputs))
        return value

    def compiled(self, compile: bool = True) -> "StaticDecoder":
        """With compile, step() and steps() run through torch.compile(mode="reduce-overhead") (a
        CUDA graph per call on a GPU) where this machine can build the code; returns self."""
        from imagetx.system.compiling import compile_or_eager

        if compile:
            self.__dict__["run"] = compile_or_eager(self, self.at.device, mode="reduce-overhead")
        return self

    def step(self, k: int) -> torch.Tensor:
        """draws: the value drawn at step k (see forward)."""
        self.set_step(k)
        return self.__dict__["run"]()

    def steps(self, k: int, values: torch.Tensor, ranges=None) -> torch.Tensor:
        """As IncrementalDecoder.steps: positions k .. k + W' - 1 (W' <= window) given values,
        those at steps k - 1 .. k + W' - 2 (from step 0 when k = 0) -> their outputs (B, W', out)."""
        if ranges is not None:
            raise ValueError("static decoding does not take range inputs")
        W = values.shape[1] + (1 if k == 0 else 0)
        if not 1 <= W <= self.window or k + W > self.model.config.seq_len:
            raise ValueError(f"a pass takes 1 to {self.window} positions inside the image, got {W} from step {k}")
        into = self.inputs[:, 1:W] if k == 0 else self.inputs[:, :W]
        into.copy_(values)
        self.set_step(k)
        return self.__dict__["run"]()[:, :W]
