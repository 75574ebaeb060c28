"""Autoregressive decoding: the cached incremental decoder and the full-recompute reference.

Each layer's self-attention keeps a cache holding only what its pattern can see:
- local1d: a window of two blocks, [previous block | current block] (constant memory per image);
- local2d: a ring of the last fh + qh grid rows (the top flange and the current block row) and
  the current block's key window, rebuilt from the ring when a new block starts;
- full: the whole prefix.
Cross-attention keys and values of the encoder are computed once per image. One decoding step
then costs the same whatever the image size (local patterns).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from imagetx.model import dmol
from imagetx.model.layout import Layout


def _heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    B, L, _ = t.shape
    return t.view(B, L, n_heads, -1).transpose(1, 2)  # (B, h, L, hd)


class FullCache:
    def __init__(self, B, h, hd, layout: Layout, like: torch.Tensor):
        self.k = like.new_zeros(B, h, layout.seq_len, hd)
        self.v = like.new_zeros(B, h, layout.seq_len, hd)

    def attend(self, q, k, v, step: int, internal: int):
        self.k[:, :, step] = k[:, :, 0]
        self.v[:, :, step] = v[:, :, 0]
        return F.scaled_dot_product_attention(q, self.k[:, :, : step + 1], self.v[:, :, : step + 1])


class Local1DCache:
    """Keys and values of [previous block | current block]; the mask is the training pattern's."""

    def __init__(self, B, h, hd, layout: Layout, like: torch.Tensor, window_mask: torch.Tensor):
        self.lq = layout.block
        self.k = like.new_zeros(B, h, 2 * self.lq, hd)
        self.v = like.new_zeros(B, h, 2 * self.lq, hd)
        self.mask = window_mask  # (nb, lq, 2lq)

    def attend(self, q, k, v, step: int, internal: int):
        b, i = divmod(step, self.lq)
        if i == 0 and b > 0:  # a new block: the current block becomes the memory
            self.k[:, :, : self.lq] = self.k[:, :, self.lq :]
            self.v[:, :, : self.lq] = self.v[:, :, self.lq :]
        self.k[:, :, self.lq + i] = k[:, :, 0]
        self.v[:, :, self.lq + i] = v[:, :, 0]
        return F.scaled_dot_product_attention(q, self.k, self.v, attn_mask=self.mask[b, i][None])


class Local2DCache:
    """A ring of the last fh + qh rows of keys/values (padded by fw columns either side) and the
    key window of the current query block."""

    def __init__(self, B, h, hd, layout: Layout, like: torch.Tensor, window_mask: torch.Tensor):
        (self.qh, self.qw), (self.fh, self.fw) = layout.query_shape, layout.flange
        Hp, Wp = layout.padded_grid
        self.nbw = Wp // self.qw
        self.kh, self.kw = self.fh + self.qh, self.qw + 2 * self.fw
        self.R = self.kh
        self.lq = layout.block
        self.ring_k = like.new_zeros(B, h, self.R, Wp + 2 * self.fw, hd)
        self.ring_v = like.new_zeros(B, h, self.R, Wp + 2 * self.fw, hd)
        self.win_k = like.new_zeros(B, h, self.kh * self.kw, hd)
        self.win_v = like.new_zeros(B, h, self.kh * self.kw, hd)
        self.mask = window_mask  # (nb, lq, kh*kw)
        self.block = -1

    def attend(self, q, k, v, step: int, internal: int):
        blk, i = divmod(internal, self.lq)
        bi, bj = divmod(blk, self.nbw)
        qr, qc = divmod(i, self.qw)
        if blk != self.block:  # gather the new block's window from the ring
            self.block = blk
            slots = [(bi * self.qh + r) % self.R for r in range(self.kh)]  # padded rows -> ring rows
            c0 = bj * self.qw
            B, h, _, _, hd = self.ring_k.shape
            for win, ring in ((self.win_k, self.ring_k), (self.win_v, self.ring_v)):
                w = ring[:, :, slots, c0 : c0 + self.kw]  # (B, h, kh, kw, hd)
                win.copy_(w.reshape(B, h, self.kh * self.kw, hd))
        slot = (self.fh + qr) * self.kw + (self.fw + qc)
        ring_row = (bi * self.qh + qr + self.fh) % self.R
        ring_col = bj * self.qw + qc + self.fw
        self.win_k[:, :, slot] = k[:, :, 0]
        self.win_v[:, :, slot] = v[:, :, 0]
        self.ring_k[:, :, ring_row, ring_col] = k[:, :, 0]
        self.ring_v[:, :, ring_row, ring_col] = v[:, :, 0]
        return F.scaled_dot_product_attention(q, self.win_k, self.win_v, attn_mask=self.mask[blk, i][None])


class IncrementalDecoder:
    """Runs the decoder one position at a time, in generation order, for a batch of B images.

    step(k, prev) takes the value of generation position k-1 (long (B,) for categorical, (B, C)
    for DMOL; ignored at k = 0) and returns the output at position k: logits (B, 256) or DMOL
    parameters (B, P), equal to model(x)[position k] for any x with that prefix.
    """

    def __init__(self, model, batch: int, labels=None, source=None):
        self.model = model
        cfg = model.config
        self.cfg = cfg
        self.layout = model.layout
        p = next(model.parameters())
        like = torch.empty(0, device=p.device, dtype=p.dtype)
        self.cond, memory = model.condition(labels, source)  # (B, 1 or Lp, d) or None
        self.caches, self.cross_kv = [], []
        h, hd = cfg.n_heads, cfg.head_dim
        for block in model.blocks:
            attn = block.attn
            if cfg.attention == "full":
                cache = FullCache(batch, h, hd, self.layout, like)
            elif cfg.attention == "local1d":
                cache = Local1DCache(batch, h, hd, self.layout, like, model.window_mask)
            else:
                cache = Local2DCache(batch, h, hd, self.layout, like, model.window_mask)
            self.caches.append(cache)
            if block.cross is not None:
                k, v = block.cross.kv(memory).chunk(2, dim=-1)
                self.cross_kv.append((_heads(k, h), _heads(v, h)))
            else:
                self.cross_kv.append(None)
        self.gen_to_internal = model.gen_to_internal.tolist()
        self.batch = batch

    def _input(self, k: int, internal: int, prev) -> torch.Tensor:
        m = self.model
        B, d = self.batch, self.cfg.d_model
        if k == 0:
            x = m.start.expand(B, d)
        elif self.cfg.output == "categorical":
            x = m.embed(prev.long() + m.input_offset[k - 1]) * m.scale
        else:
            x = m.embed(prev.float() / 127.5 - 1.0)
        x = x + m.pos(m.gen_to_internal[k : k + 1])
        if self.cond is not None:
            x = x + self.cond[:, internal if self.cond.shape[1] > 1 else 0]
        return x[:, None, :]  # (B, 1, d)

    def step(self, k: int, prev=None) -> torch.Tensor:
        m, h = self.model, self.cfg.n_heads
        internal = self.gen_to_internal[k]
        x = self._input(k, internal, prev)
        for block, cache, cross_kv in zip(m.blocks, self.caches, self.cross_kv):
            attn = block.attn

            def self_attention(t, attn=attn, cache=cache):
                q, kk, vv = (_heads(u, h) for u in attn.qkv(t).chunk(3, dim=-1))
                o = cache.attend(q, kk, vv, k, internal)  # every cache: (step, internal position)
                return attn.out(o.transpose(1, 2).reshape(self.batch, 1, -1))

            x = block.residual(x, self_attention, block.norm_attn)
            if cross_kv is not None:

                def cross_attention(t, cross=block.cross, kv=cross_kv):
                    q = _heads(cross.q(t), h)
                    o = F.scaled_dot_product_attention(q, kv[0], kv[1])
                    return cross.out(o.transpose(1, 2).reshape(self.batch, 1, -1))

                x = block.residual(x, cross_attention, block.norm_cross)
            x = block.residual(x, block.ffn, block.norm_ffn)
        return m.head(m.final_norm(x))[:, 0]


def draw(out: torch.Tensor, config, temperature: float, generator=None) -> torch.Tensor:
    """One position's output -> its value(s): long (B,) (categorical) or (B, C) (DMOL)."""
    if config.output == "dmol":
        return dmol.dmol_sample(out.float(), config.channels, config.num_mixtures, temperature, generator)
    logits = out.float()
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def generate(
    model, n, labels=None, source=None, temperature=1.0, generator=None, use_cache=True,
    prime=None, prime_mask=None, progress=None,
) -> torch.Tensor:
    """See ImageTransformer.sample."""
    cfg = model.config
    if not isinstance(temperature, (int, float)) or math.isnan(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if n < 1:
        raise ValueError(f"number of images must be >= 1, got {n}")
    model.check_inputs(None, labels, source, batch=n)
    device = next(model.parameters()).device
    H, W = cfg.image_size
    C = cfg.channels
    x = torch.zeros(n, H, W, C, dtype=torch.long, device=device)
    if prime is not None:
        if prime_mask is None or tuple(prime.shape) != (n, H, W, C) or prime_mask.shape != prime.shape:
            raise ValueError(f"prime and prime_mask must both have shape ({n}, {H}, {W}, {C})")
        x = torch.where(prime_mask.to(device), prime.to(device).long(), x)
        keep = prime_mask.to(device).reshape(n, cfg.seq_len, -1)  # per position (and channel)
    was_training = model.training
    model.eval()
    try:
        flat = x.view(n, cfg.seq_len, -1)  # (n, L, 1) categorical or (n, L, C) DMOL, grid order
        steps = model.order.tolist()  # generation step -> grid position
        decoder = IncrementalDecoder(model, n, labels, source) if use_cache else None
        prev = None
        for k, g in enumerate(steps):
            if decoder is not None:
                out = decoder.step(k, prev)
            else:
                full = model(x, labels, source)  # recompute everything: the reference path
                out = full.reshape(n, cfg.seq_len, -1)[:, g]
            value = draw(out, cfg, temperature, generator).view(n, -1)
            if prime is not None:
                value = torch.where(keep[:, g], flat[:, g], value)
            flat[:, g] = value
            prev = value[:, 0] if cfg.output == "categorical" else value
            if progress is not None:
                progress(k + 1, len(steps))
    finally:
        model.train(was_training)
    return x.to(torch.uint8)


@torch.inference_mode()
def teacher_forced_outputs(model, x, labels=None, source=None) -> torch.Tensor:
    """Outputs of the incremental decoder fed the true prefix of x: (B, L, out) in generation
    order. Equals model(x) read in generation order; the tests hold the cache to that."""
    cfg = model.config
    B = x.shape[0]
    decoder = IncrementalDecoder(model, B, labels, source)
    flat = x.reshape(B, cfg.seq_len, -1).long()
    outs, prev = [], None
    for k, g in enumerate(model.order.tolist()):
        outs.append(decoder.step(k, prev))
        prev = flat[:, g, 0] if cfg.output == "categorical" else flat[:, g]
    return torch.stack(outs, dim=1)
