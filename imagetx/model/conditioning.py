"""What a model is conditioned on besides its own earlier values, and the check of every input:
class labels (an embedding added at every position), the low-resolution source image of a
super-resolution model (the encoder that cross-attention reads, and model.source_skip's covering
value at each position), and the shapes, dtypes and values of images, labels and sources."""

from __future__ import annotations

import math

import torch
from torch import nn

from imagetx.model.block import Block
from imagetx.model.config import ModelConfig
from imagetx.model.layers import Dropout, embedding
from imagetx.model.layout import Layout
from imagetx.model.position import PositionEncoding2D


class SourceEncoder(nn.Module):
    """Encoder of the super-resolution model: the low-res image's sub-pixels, embedded like the
    decoder's ("cat": one table row per (channel, value)), 2D position encodings, full
    bidirectional self-attention."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        h, w = config.source_size
        C, d = config.channels, config.d_model
        self.scale = math.sqrt(d)
        self.embed = embedding(256 * C, d)
        cols = w * C
        idx = torch.arange(h * cols)
        self.pos = PositionEncoding2D(config.positional, d, idx // cols, idx % cols)
        self.register_buffer("channel_offset", (idx % C) * 256, persistent=False)
        self.drop = Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, "bidirectional") for _ in range(config.encoder_layers))
        self.final_norm = nn.LayerNorm(d) if config.norm == "pre" else nn.Identity()

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        """source uint8/long (B, h, w, C) -> float (B, h*w*C, d)."""
        tokens = source.reshape(source.shape[0], -1).long() + self.channel_offset
        x = self.drop(self.embed(tokens) * self.scale + self.pos())
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)


def source_skip_tables(config: ModelConfig, layout: Layout) -> tuple[torch.Tensor, torch.Tensor | None]:
    """model.source_skip: the low-res value covering each internal position (Lp,) -> (index into
    the flattened source, long (Lp,); the embedding row offset of its channel (categorical: index
    is a sub-pixel, embedded like the inputs) or None (DMOL: index is a pixel, a linear map of
    its channels))."""
    (H, W), (h, w), C = config.image_size, config.source_size, config.channels
    per = config.tokens_per_pixel
    row = layout.row_of.clamp(max=H - 1)  # padded 2D positions: any valid index will do
    col = (layout.col_of // per).clamp(max=W - 1)
    pixel = (row * h // H) * w + col * w // W  # (Lp,) source pixel
    if config.output == "categorical":
        channel = layout.col_of % C
        return pixel * C + channel, channel * 256
    return pixel, None


def _readable(t: torch.Tensor) -> bool:
    """Whether check_inputs reads t's values: non-empty, on the CPU, and not while compiling
    (a read there is a graph break; on a GPU a host sync)."""
    return t.numel() > 0 and t.device.type == "cpu" and not torch.compiler.is_compiling()


def check_inputs(cfg: ModelConfig, x=None, labels=None, source=None, batch: int | None = None) -> None:
    """Raise ValueError naming the problem for inputs a model of cfg cannot take: images x, class
    labels, source images; batch: the batch size when x is not given.

    Shapes and dtypes always; values only of tensors on the CPU, where reading them back is
    no device sync (and never while compiling): a training or evaluation step on a GPU reads
    nothing back. Batches reach the GPU from CPU data (the data sets' uint8 images and
    labels), so what would be read there was checked before it moved."""
    H, W = cfg.image_size
    if x is not None:
        if x.dim() != 4 or tuple(x.shape[1:]) != (H, W, cfg.channels):
            raise ValueError(
                f"expected images of shape (B, {H}, {W}, {cfg.channels}) (B, H, W, C), "
                f"got {tuple(x.shape)}"
            )
        if x.dtype.is_floating_point or x.dtype == torch.bool:
            raise ValueError(f"images must be an integer tensor in [0, 255], got dtype {x.dtype}")
        if _readable(x) and (int(x.min()) < 0 or int(x.max()) > 255):
            raise ValueError(
                f"image values must be in [0, 255], got [{int(x.min())}, {int(x.max())}]"
            )
        batch = x.shape[0]
    if cfg.num_classes:
        if labels is None:
            raise ValueError(f"this model is class-conditional: pass labels in [0, {cfg.num_classes - 1}]")
        if labels.dim() != 1 or (batch is not None and labels.shape[0] != batch):
            raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
        if _readable(labels) and (int(labels.min()) < 0 or int(labels.max()) >= cfg.num_classes):
            raise ValueError(
                f"labels must be in [0, {cfg.num_classes - 1}], "
                f"got [{int(labels.min())}, {int(labels.max())}]"
            )
    elif labels is not None:
        raise ValueError("this model is unconditional (num_classes = 0): do not pass labels")
    if cfg.source_size is not None:
        h, w = cfg.source_size
        if source is None:
            raise ValueError(f"this is a super-resolution model: pass a source image (B, {h}, {w}, {cfg.channels})")
        if source.dim() != 4 or tuple(source.shape[1:]) != (h, w, cfg.channels):
            raise ValueError(
                f"expected source images of shape (B, {h}, {w}, {cfg.channels}), got {tuple(source.shape)}"
            )
        if batch is not None and source.shape[0] != batch:
            raise ValueError(f"source batch size {source.shape[0]} does not match {batch}")
        if source.dtype.is_floating_point or (
            _readable(source) and (int(source.min()) < 0 or int(source.max()) > 255)
        ):
            raise ValueError("source images must be integers in [0, 255]")
    elif source is not None:
        raise ValueError("this model has no encoder (source_size unset): do not pass a source")
