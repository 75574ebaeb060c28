"""The Image Transformer: the layer, the super-resolution encoder, the model and its likelihood."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from imagetx.model import consistency, dmol, kernels
from imagetx.model.attention import Attention, window_bias
from imagetx.model.config import ModelConfig
from imagetx.model.layers import Dropout, FeedForward, residual_dropout_layer_norm
from imagetx.model.layout import Layout, make_layout
from imagetx.model.position import PositionEncoding2D
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

    def forward(self, x: torch.Tensor, memory=None, bias=None, cache=None) -> torch.Tensor:
        """x float (B, L, d) -> (B, L, d); memory, bias: see Attention.forward. cache: decoding
        one position, (self-attention cache, cross-attention MemoryCache or None), see
        Block.make_cache."""
        self_cache, cross_cache = cache if cache is not None else (None, None)
        x = self.residual(x, lambda t: self.attn(t, bias=bias, cache=self_cache), self.norm_attn)
        if self.cross is not None:
            x = self.residual(x, lambda t: self.cross(t, memory, cache=cross_cache), self.norm_cross)
        return self.residual(x, self.ffn, self.norm_ffn)

    def make_cache(self, batch: int, like, position, memory=None, visibility=None, window: int = 1) -> tuple:
        """The caches that decode `batch` images one position at a time through forward()
        (window: positions per pass of parallel decoding, see Attention.make_cache)."""
        cross = self.cross.memory_cache(memory) if self.cross is not None else None
        return self.attn.make_cache(batch, like, position, visibility, window), cross


def _readable(t: torch.Tensor) -> bool:
    """Whether check_inputs reads t's values: non-empty, on the CPU, and not while compiling
    (a read there is a graph break; on a GPU a host sync)."""
    return t.numel() > 0 and t.device.type == "cpu" and not torch.compiler.is_compiling()


def _embedding(rows: int, d: int) -> nn.Embedding:
    emb = nn.Embedding(rows, d)
    nn.init.normal_(emb.weight, std=d**-0.5)
    return emb


class SourceEncoder(nn.Module):
    """Encoder of the super-resolution model: the low-res image's sub-pixels, embedded like the
    decoder's ("cat": one table row per (channel, value)), 2D position encodings, full
    bidirectional self-attention."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        h, w = config.source_size
        C, d = config.channels, config.d_model
        self.scale = math.sqrt(d)
        self.embed = _embedding(256 * C, d)
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


class ImageTransformer(nn.Module):
    """The Image Transformer (Parmar et al., 2018).

    Categorical output: one position per sub-pixel, row-major with channels interleaved, a
    256-way softmax each. DMOL output: one position per pixel, a discretized mixture of logistics
    over its channels. Generation order is raster order (local1d, full) or block-raster order
    (local2d); the input at each position is the previous position *in generation order*.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.layout = layout = make_layout(config)
        d, C = config.d_model, config.channels
        self.scale = math.sqrt(d)
        order = layout.order
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("grid_to_internal", layout.grid_to_internal, persistent=False)
        self.register_buffer("gen_to_internal", layout.gen_to_internal, persistent=False)
        if config.output == "categorical":
            # the input at generation step k is sub-pixel order[k-1]: embed it with its channel's rows
            offset = (order % C) * 256
            self.register_buffer("input_offset", offset[:-1], persistent=False)
            self.embed = _embedding(256 * C, d)
            self.head = nn.Linear(d, 256)
        else:
            self.embed = nn.Linear(C, d, bias=False)  # = a 1x3 stride-3 convolution over the pixel
            self.head = nn.Linear(d, config.dmol_params)
        self.start = nn.Parameter(torch.zeros(d))
        self.pos = None if config.positional == "none" else PositionEncoding2D(config.positional, d, layout.row_of, layout.col_of)
        # model.relative: the static part, shared by the decoder layers' self-attention
        self.relative = RelativePositions(config, layout) if config.relative != "none" else None
        self.class_embed = _embedding(config.num_classes, d) if config.num_classes else None
        self.encoder = SourceEncoder(config) if config.source_size is not None else None
        self.source_embed = None
        if config.source_skip:
            self._init_source_skip(config)
        self.cells = None
        if config.consistent:  # where each sub-pixel comes in its low-res cell (model.consistent)
            self.cells = consistency.CellOrder(config.image_size, config.source_size, C, order)
        self.range_embed = None
        if config.range_input:  # one block of 256 rows each for lo, hi and the mean still needed
            self.range_embed = _embedding(3 * 256, d)
            self.register_buffer("range_offset", torch.arange(3) * 256, persistent=False)
        cross = self.encoder is not None
        self.drop = Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(config, config.attention, layout, cross=cross, positions=self.relative) for _ in range(config.n_layers)
        )
        self.final_norm = nn.LayerNorm(d) if config.norm == "pre" else nn.Identity()
        self.activation_checkpointing = False
        if layout.window_mask is not None:  # the local patterns' additive mask, built once, moved with the model
            bias = window_bias(layout.window_mask, config.n_heads)
            self.register_buffer("window_bias", bias, persistent=False)
            # and in bf16, autocast's dtype: a cast per forward pass costs more than the copy
            self.register_buffer("window_bias_bf16", bias.to(torch.bfloat16), persistent=False)
        if layout.kind == "local2d":  # where the decoding caches gather each block's keys from
            self.register_buffer("visibility", torch.tensor(layout.visibility), persistent=False)

    def _init_source_skip(self, config: ModelConfig) -> None:
        """The low-res value covering each internal position: its source sub-pixel (categorical,
        embedded like the inputs) or source pixel (DMOL, a linear map of its channels)."""
        (H, W), (h, w), C = config.image_size, config.source_size, config.channels
        per = config.tokens_per_pixel
        row = self.layout.row_of.clamp(max=H - 1)  # padded 2D positions: any valid index will do
        col = (self.layout.col_of // per).clamp(max=W - 1)
        pixel = (row * h // H) * w + col * w // W  # (Lp,) source pixel
        if config.output == "categorical":
            channel = self.layout.col_of % C
            self.register_buffer("source_index", pixel * C + channel, persistent=False)
            self.register_buffer("source_offset", channel * 256, persistent=False)
            self.source_embed = _embedding(256 * C, config.d_model)
        else:
            self.register_buffer("source_index", pixel, persistent=False)
            self.source_embed = nn.Linear(C, config.d_model, bias=False)

    # ---- helpers ----------------------------------------------------------------------------
    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each layer's activations in the backward pass (less memory, ~30% more time)."""
        self.activation_checkpointing = bool(enabled)

    def check_inputs(self, x=None, labels=None, source=None, batch: int | None = None) -> None:
        """Raise ValueError naming the problem for inputs the model cannot take.

        Shapes and dtypes always; values only of tensors on the CPU, where reading them back is
        no device sync (and never while compiling): a training or evaluation step on a GPU reads
        nothing back. Batches reach the GPU from CPU data (the data sets' uint8 images and
        labels), so what would be read there was checked before it moved."""
        cfg = self.config
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

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The local patterns' additive mask in dtype, shared by all layers: a buffer built once
        (float32 and bfloat16), a cast of one in any other dtype (nothing is kept between calls,
        so a compiled step sees the same module state at every step)."""
        if self.layout.window_mask is None:
            return None
        for bias in (self.window_bias, self.window_bias_bf16):
            if bias.dtype == dtype:
                return bias
        return self.window_bias.to(dtype)

    def condition(self, labels=None, source=None):
        """-> (cond, memory): cond is added to the decoder input at every position: the class
        embedding (B, 1, d), plus with source_skip the covering low-res value's embedding, making
        it (B, Lp, d) in internal layout; None for neither. memory: encoder output (B, S, d) or None.
        """
        cond = None
        if self.class_embed is not None:  # scaled like the token embeddings: on par with them from the start
            cond = self.class_embed(labels.long())[:, None, :] * self.scale
        memory = self.encoder(source) if self.encoder is not None else None
        if self.source_embed is not None:
            B = source.shape[0]
            if self.config.output == "categorical":
                tokens = source.reshape(B, -1).long()[:, self.source_index] + self.source_offset
                skip = self.source_embed(tokens) * self.scale
            else:
                pixels = source.reshape(B, -1, self.config.channels)[:, self.source_index]
                skip = self.source_embed(dmol.to_unit(pixels).to(self.start.dtype))  # the weights' dtype
            cond = skip if cond is None else cond + skip
        return cond, memory

    def embed_inputs(self, values: torch.Tensor, first_step: int = 0, ranges: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings of the decoder inputs from generation step first_step on: the input at
        step k is the value generated at step k - 1; at step 0 the learned start vector.

        values: the values at steps first_step - 1, first_step, ... (from step 0 when first_step
        is 0): long (B, n) in [0, 255] (categorical) or (B, n, C) (DMOL), in generation order.
        -> float (B, n, d), or (B, n + 1, d) with the start vector first when first_step is 0.
        ranges: model.range_input only, and then required: long (B, n or n + 1, 3) in [0, 255],
        the range inputs of the positions embedded (consistency.CellOrder.range_inputs), the value
        each position predicts, not its input: they depend only on earlier values and the source.
        """
        if (ranges is None) != (self.range_embed is None):
            raise ValueError("pass the range inputs of the positions exactly when the model has model.range_input")
        k = max(first_step - 1, 0)  # generation step of values[:, 0]
        if self.config.output == "categorical":
            emb = self.embed(values.long() + self.input_offset[k : k + values.shape[1]]) * self.scale
        else:
            emb = self.embed(dmol.to_unit(values).to(self.start.dtype))  # the weights' dtype
        if first_step == 0:
            start = self.start.to(emb.dtype).expand(values.shape[0], 1, -1)
            emb = torch.cat([start, emb], dim=1)
        if ranges is not None:  # (B, n, 3, d) summed over lo, hi and mean
            emb = emb + self.range_embed(ranges + self.range_offset).sum(-2) * self.scale
        return emb

    def decoder_input(self, emb: torch.Tensor, cond=None, index: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, Lp, d) in internal layout, or (B, n, d) at internal positions
        index long (n,) -> plus their position encodings and cond (see condition)."""
        # the residual stream in the weights' dtype, as a position table would make it (a DMOL
        # input embedding is a Linear: bf16 under autocast)
        h = emb.to(self.start.dtype) if self.pos is None else emb + self.pos(index)
        if cond is None:
            return h
        return h + (cond if index is None or cond.shape[1] == 1 else cond[:, index])

    def to_internal(self, h_gen: torch.Tensor) -> torch.Tensor:
        """(B, L, d) in generation order -> (B, Lp, d) in internal layout (zeros at padding)."""
        if self.layout.generation_is_internal:
            return h_gen
        B, _, d = h_gen.shape
        h = h_gen.new_zeros(B, self.layout.internal_len, d)
        return h.index_copy(1, self.gen_to_internal, h_gen)

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, labels=None, source=None) -> torch.Tensor:
        """x: uint8 or long (B, H, W, C) in [0, 255].

        -> categorical: logits float (B, H, W, C, 256), in image layout whatever the generation
        order; DMOL: mixture parameters float (B, H, W, P) (layout in model/dmol.py).
        The output at a position depends only on positions before it in generation order.
        """
        self.check_inputs(x, labels, source)
        cond, memory = self.condition(labels, source)
        values = x.reshape(x.shape[0], self.config.seq_len, -1)[:, self.order[:-1]]  # (B, L - 1, 1 or C) generation order
        if self.config.output == "categorical":
            values = values[..., 0]  # (B, L - 1)
        ranges = None
        if self.range_embed is not None:  # (B, L, 3) generation order
            ranges = self.cells.range_inputs(x, source).view(x.shape[0], self.config.seq_len, 3)[:, self.order]
        h = self.drop(self.decoder_input(self.to_internal(self.embed_inputs(values, ranges=ranges)), cond))
        bias = self.attention_bias(kernels.autocast_dtype(h.device.type) or h.dtype)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                h = checkpoint(block, h, memory, bias, use_reentrant=False)
            else:
                h = block(h, memory, bias)
        h = self.final_norm(h)
        if not self.layout.grid_is_internal:
            h = h[:, self.grid_to_internal]  # (B, L, d) grid order
        out = self.head(h)
        B, (H, W) = x.shape[0], self.config.image_size
        return out.view(B, H, W, -1, 256) if self.config.output == "categorical" else out.view(B, H, W, -1)

    def nll(self, x: torch.Tensor, labels=None, source=None) -> torch.Tensor:
        """Negative log-likelihood of each image in nats: float32 (B,). Exact for 8-bit data
        (no dequantization): bits/dim = nll / (H*W*C * ln 2)."""
        out = self(x, labels, source).float()
        return self.nll_from_output(out, x, source)

    def log_probs(self, out: torch.Tensor, x: torch.Tensor, source=None) -> torch.Tensor:
        """Categorical outputs (B, H, W, C, 256) of x -> the model's conditional log-probabilities
        of every value: log_softmax of the logits, restricted (model.consistent) to the values
        that keep each image consistent with its source given the prefix of x, renormalised."""
        if self.config.consistent:
            lo, hi = self.cells.bounds(x, source)  # (B, H, W, C)
            out = dmol.restrict(out.reshape(-1, 256), lo.reshape(-1), hi.reshape(-1)).view(out.shape)
        return torch.log_softmax(out.float(), dim=-1)

    def nll_from_output(self, out: torch.Tensor, x: torch.Tensor, source=None) -> torch.Tensor:
        B = x.shape[0]
        if self.config.output == "categorical":
            if self.config.consistent:
                log_p = self.log_probs(out, x, source)
                return -log_p.gather(-1, x.long()[..., None]).view(B, -1).sum(1)
            ce = F.cross_entropy(out.reshape(-1, 256), x.reshape(-1).long(), reduction="none")
            return ce.view(B, -1).sum(1)
        cfg = self.config
        per_pixel = dmol.dmol_nll(out, x.long(), cfg.channels, cfg.num_mixtures)  # (B, H, W)
        return per_pixel.reshape(B, -1).sum(1)

    # ---- sampling ---------------------------------------------------------------------------
    @torch.inference_mode()
    def sample(
        self,
        n: int,
        labels=None,
        source=None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        prime: torch.Tensor | None = None,
        prime_mask: torch.Tensor | None = None,
        progress=None,
        constraint=None,
        seed: int | None = None,
        first_index: int = 0,
        decode: str = "sequential",
        window: int | None = None,
    ) -> torch.Tensor:
        """Draw n images: uint8 (n, H, W, C), in the model's generation order.

        temperature: >= 0 (0 = greedy). seed: int in [0, 2^64); image i is global image
        first_index + i and all its randomness is a function of (seed, first_index + i) alone
        (see imagetx.model.noise), so the same images come out whatever the batch size, as long
        as each batch gives its first image's global index; without a seed, one is drawn from
        generator (torch's default generator when None). prime / prime_mask: uint8 (n, H, W, C)
        and bool of the same shape: where the mask is True the value is kept instead of sampled
        (image completion). use_cache=False recomputes the whole model at every step (the
        reference path); progress: an optional callable(steps_done, steps_total). constraint:
        restricts the values drawn (see imagetx.model.decoding.generate); a model.consistent
        model always samples with consistency.AreaConsistency, its own distribution.
        decode: "sequential", "parallel" (Jacobi passes of `window` positions, default
        decoding.DEFAULT_WINDOW) or "auto": the same images in every mode (see decoding.generate).
        """
        from imagetx.model.decoding import DEFAULT_WINDOW, generate

        return generate(
            self, n, labels=labels, source=source, temperature=temperature, generator=generator,
            use_cache=use_cache, prime=prime, prime_mask=prime_mask, progress=progress, constraint=constraint,
            seed=seed, first_index=first_index, decode=decode, window=DEFAULT_WINDOW if window is None else window,
        )
