"""One layer of the Image Transformer, in the decoder and in the super-resolution encoder."""

from __future__ import annotations

import torch
from torch import nn

from imagetx.model.attention import Attention
from imagetx.model.config import ModelConfig
from imagetx.model.layers import Dropout, FeedForward, residual_dropout_layer_norm
from imagetx.model.layout import Layout
from imagetx.model.relative import RelativePositions


class Block(nn.Module):
    """One layer: (masked) self-attention, optional cross-attention to the encoder, then the FFN.

    Post-LN as published (sublayer -> dropout -> add -> LayerNorm) or pre-LN.
    """

    def __init__(self, config: ModelConfig, kind: str, layout: Layout | None = None, cross: bool = False,
                 positions: RelativePositions | None = None):
        super().__init__()
        d = config.d_model
        self.pre_norm = config.norm == "pre"
        self.attn = Attention(config, kind, layout, positions)
        self.cross = Attention(config, "cross") if cross else None
        self.ffn = FeedForward(d, config.d_ff)
        self.norm_attn = nn.LayerNorm(d)
        self.norm_cross = nn.LayerNorm(d) if cross else None
        self.norm_ffn = nn.LayerNorm(d)
        self.drop = Dropout(config.dropout)

    def residual(self, x, fn, norm):
        if self.pre_norm:
            return x + self.drop(fn(norm(x)))
        return residual_dropout_layer_norm(x, fn(x), norm, self.drop.p, self.training)

    def forward(self, x: torch.Tensor, memory=None, windows=None, cache=None) -> torch.Tensor:
        """x float (B, L, d) -> (B, L, d); memory, windows: see Attention.forward. cache: decoding
        one position, (self-attention cache, cross-attention MemoryCache or None), see
        Block.make_cache."""
        self_cache, cross_cache = cache if cache is not None else (None, None)
        x = self.residual(x, lambda t: self.attn(t, windows=windows, cache=self_cache), self.norm_attn)
        if self.cross is not None:
            x = self.residual(x, lambda t: self.cross(t, memory, cache=cross_cache), self.norm_cross)
        return self.residual(x, self.ffn, self.norm_ffn)

    def make_cache(self, batch: int, like, position, memory=None, visibility=None, window: int = 1) -> tuple:
        """The caches that decode `batch` images one position at a time through forward()
        (window: positions per pass of parallel decoding, see Attention.make_cache)."""
        cross = self.cross.memory_cache(memory) if self.cross is not None else None
        return self.attn.make_cache(batch, like, position, visibility, window), cross
