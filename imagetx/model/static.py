"""Cached decoding with static shapes, for CUDA graphs: every step is the same sequence of kernels
on the same buffers, with the position held in a device tensor.

IncrementalDecoder's caches (model/cache.py) pick their slices and their branches (a new block,
a shift of the local 1D window, the local 2D ring's gather) with Python integers, so each step
is a different sequence of operations: on a GPU each is launched one by one, about 150 kernels
a step by a count of the code, milliseconds against a step whose weights are read in tens of
microseconds. StaticDecoder decodes the same positions with no Python branch and no host value
inside a step:

- one key/value buffer of S slots per layer, in every pattern. A slot plan (slot_plan), worked
  out once from the layout, gives each generation step's key the slot it is written to, reusing
  the slot of a key no later step reads: 2 blocks of slots for local 1D (its key window), 1.3
  to 2.5 times the key window for the shipped local 2D configs, the whole sequence for full
  attention;
- the keys a step sees are a prefix of its block's keys in visibility order (layout.visibility),
  so a table of each block's keys' places by slot (rank) and the step's count of visible keys
  make the step's mask over the S slots in one comparison, on the device;
- the step index lives in a device buffer (`at`), set by one fill before each step: the
  embedding, the position encodings, the rotary angles, the slot and the mask are read from
  tables at it, and the Gumbel noise of the draw is hashed from it (noise.step_gumbel), so the
  value drawn is computed inside the step too.

The layers are the model's own (Block.forward, Attention.forward with a SlotCache); the step is
the model's forward pass at one position, as IncrementalDecoder's, and the sample is the same
for the same seed (tests/model/test_static_decoding.py holds them to it in float64). On CUDA,
decoding.generate runs the step through torch.compile(mode="reduce-overhead"), which captures it
as a CUDA graph and replays it per position.

Not taken here (decoding.generate uses IncrementalDecoder for them): relative logits (their
bias is gathered per key), model.range_input and restricted draws (model.consistent, superres
--consistent: their bounds are worked out on the host), and parallel decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imagetx.model import noise
from imagetx.model.decoding import draw
from imagetx.model.dmol import to_unit


class StepPosition(nn.Module):
    """The position of a static decoding step, as device buffers the StaticDecoder updates in
    place at every step: the internal index (1,), the slot its key goes to (1,) and the slots it
    sees, bool (1, slots) (one query's row). Module state, as every tensor a step reads: a
    captured graph then takes them where they are instead of copying them in at each replay."""

    def __init__(self, slots: int, device: torch.device):
        super().__init__()
        self.register_buffer("internal", torch.zeros(1, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("slot", torch.zeros(1, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("visible", torch.zeros(1, slots, dtype=torch.bool, device=device), persistent=False)

    def rows(self) -> torch.Tensor:
        """See cache.Position.rows: here an index tensor, read on the device."""
        return self.internal


class SlotCache(nn.Module):
    """A layer's self-attention cache of S slots (slot_plan): the step's key and value go to
    its slot, and attention reads all S slots under the step's mask."""

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


def static_problem(model, constraint=None, cells=None) -> str | None:
    """Why StaticDecoder cannot decode for this model and these draws, or None when it can."""
    cfg = model.config
    if cfg.relative == "logits":
        return "relative logits"
    if cells is not None or cfg.range_input:
        return "model.range_input"
    if constraint is not None:
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
    """Decodes `batch` images one position per call with static shapes (see the module doc).

    forward() draws the value at step `at` (set it first: set_step) given `last`, the value
    placed at the step before (long (B,) categorical, (B, C) DMOL; ignored at step 0; a primed
    value is written there by the caller) -> the value at this step, of last's shape, which
    it also writes to last: drawn as decoding.draw draws it from the step's output with the
    Gumbel noise of (seed, images[i], step) (none at temperature 0). The model's parameters and
    the decoder's buffers are module state, and the call takes no input: a captured graph reads
    and writes them all in place."""

    def __init__(self, model, batch: int, labels=None, source=None, temperature: float = 1.0, seed: int = 0,
                 images: torch.Tensor | None = None):
        super().__init__()
        problem = static_problem(model)
        if problem is not None:
            raise ValueError(f"static decoding does not take {problem}")
        self.model = model
        cfg = model.config
        p = next(model.parameters())
        device = p.device
        plan = model.layout.slot_plan
        for name in ("slot_of", "group_of", "count", "rank"):
            self.register_buffer(name, _on(device, getattr(plan, name)), persistent=False)
        self.register_buffer("at", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        self.position = StepPosition(plan.slots, device)
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
        # the value placed at the step before (drawn, or primed: generate writes it back)
        self.register_buffer("last", torch.zeros(batch, *per, dtype=torch.long, device=device), persistent=False)
        self.temperature = temperature
        if cfg.output == "categorical":  # the embedding rows of step k's input at [k] (step 0's: unused)
            self.register_buffer("input_offset", torch.cat([model.input_offset.new_zeros(1), model.input_offset]),
                                 persistent=False)

    def set_step(self, k: int) -> None:
        """Decode generation step k at the next call: one fill of a device scalar, no sync."""
        self.at.fill_(k)

    def forward(self) -> torch.Tensor:
        m, at, pos = self.model, self.at.view(1), self.position  # (1,): indexing with it stays on the device
        pos.internal.copy_(m.gen_to_internal[at])
        pos.slot.copy_(self.slot_of[at])
        pos.visible.copy_(self.rank[self.group_of[at]] < self.count[at, None])
        if m.config.output == "categorical":  # as embed_inputs: the value before, at its channel's rows
            emb = m.embed(self.last + self.input_offset[at]) * m.scale
        else:
            emb = m.embed(to_unit(self.last).to(m.start.dtype))
        emb = torch.where(at == 0, m.start.to(emb.dtype), emb)[:, None]  # step 0: the start vector
        x = m.decoder_input(emb, self.cond, pos.internal)
        for block, cache, memory in zip(m.blocks, self.caches, self.memories):
            x = block(x, cache=(cache, memory if block.cross is not None else None))
        out = m.head(m.final_norm(x))[:, 0]
        counters = self.noise_channel, self.noise_value
        gumbel = noise.step_gumbel(self.keys, at, counters) if self.temperature > 0 else None
        value = draw(out, m.config, self.temperature, gumbel)
        self.last.copy_(value)
        return value
