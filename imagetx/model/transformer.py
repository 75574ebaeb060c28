"""The Image Transformer: embeddings, the layers (model/block.py), the output head and its
likelihood; what it is conditioned on is in model/conditioning.py, decoding in model/decoding.py."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from imagetx.model import consistency, dmol, kernels, sampling
from imagetx.model.attention import CausalGroups, window_bias
from imagetx.model.block import Block
from imagetx.model.conditioning import SourceEncoder, check_inputs, source_skip_tables
from imagetx.model.config import ModelConfig
from imagetx.model.layers import Dropout, embedding
from imagetx.model.layout import make_layout
from imagetx.model.position import PositionEncoding2D
from imagetx.model.relative import RelativePositions


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
            self.embed = embedding(256 * C, d)
            self.head = nn.Linear(d, 256)
        else:
            self.embed = nn.Linear(C, d, bias=False)  # = a 1x3 stride-3 convolution over the pixel
            self.head = nn.Linear(d, config.dmol_params)
        self.start = nn.Parameter(torch.zeros(d))
        self.pos = None if config.positional == "none" else PositionEncoding2D(config.positional, d, layout.row_of, layout.col_of)
        # model.relative: the static part, shared by the decoder layers' self-attention
        self.relative = RelativePositions(config, layout) if config.relative != "none" else None
        self.class_embed = embedding(config.num_classes, d) if config.num_classes else None
        self.encoder = SourceEncoder(config) if config.source_size is not None else None
        self.source_embed = None
        if config.source_skip:  # the low-res value covering each internal position, embedded like the inputs
            index, offset = source_skip_tables(config, layout)
            self.register_buffer("source_index", index, persistent=False)
            if offset is not None:
                self.register_buffer("source_offset", offset, persistent=False)
            self.source_embed = embedding(256 * C, d) if config.output == "categorical" else nn.Linear(C, d, bias=False)
        self.cells = None
        if config.consistent:  # where each sub-pixel comes in its low-res cell (model.consistent)
            self.cells = consistency.CellOrder(config.image_size, config.source_size, C, order)
        self.range_embed = None
        if config.range_input:  # one block of 256 rows each for lo, hi and the mean still needed
            self.range_embed = embedding(3 * 256, d)
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
        if layout.causal_groups is not None:  # the same pattern for flash-class kernels (attention_windows)
            self.causal_before = [before for before, _, _ in layout.causal_groups]
            for g, (before, queries, keys) in enumerate(layout.causal_groups):
                self.register_buffer(f"causal_queries_{g}", queries, persistent=False)
                self.register_buffer(f"causal_keys_{g}", keys, persistent=False)
                n = queries.shape[1]  # query t sees keys 0 .. before + t
                mask = torch.arange(before + n)[None, :] <= before + torch.arange(n)[:, None]
                self.register_buffer(f"causal_mask_{g}", mask if before else None, persistent=False)
        if layout.kind == "local2d":  # where the decoding caches gather each block's keys from
            self.register_buffer("visibility", torch.tensor(layout.visibility), persistent=False)

    # ---- helpers ----------------------------------------------------------------------------
    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each layer's activations in the backward pass (less memory, ~30% more time)."""
        self.activation_checkpointing = bool(enabled)

    def check_inputs(self, x=None, labels=None, source=None, batch: int | None = None) -> None:
        """Raise ValueError naming the problem for inputs the model cannot take (see
        conditioning.check_inputs)."""
        check_inputs(self.config, x, labels, source, batch)

    def attention_windows(self, h: torch.Tensor) -> torch.Tensor | CausalGroups | None:
        """How the local patterns' attention finds its keys in a forward pass over h (shared by
        all layers; None for full attention): CausalGroups (flash-class kernels) off the CPU, and
        on it for local 2D (1.1-2.3x faster there than the windows and their mask, forward and
        backward: docs/benchmarks.md) or inside kernels.grouped_local_attention; not with
        relative logits, which need a mask. Else the additive window mask in the dtype attention
        computes in (local 1D on CPU mostly takes model/local1d.py, faster still)."""
        if self.layout.window_mask is None:
            return None
        if self.config.relative != "logits" and kernels.enabled() and (
                h.device.type != "cpu" or self.layout.kind == "local2d" or kernels.causal_groups_on_cpu()):
            groups = range(len(self.causal_before))
            return CausalGroups(self.causal_before, *([getattr(self, f"causal_{part}_{g}") for g in groups]
                                                      for part in ("queries", "keys", "mask")))
        return self.attention_bias(kernels.autocast_dtype(h.device.type) or h.dtype)

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
        windows = self.attention_windows(h)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                h = checkpoint(block, h, memory, windows, use_reentrant=False)
            else:
                h = block(h, memory, windows)
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
            out = sampling.restrict(out.reshape(-1, 256), lo.reshape(-1), hi.reshape(-1)).view(out.shape)
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
        watch=None,
        static: bool | None = None,
        compile: bool | None = None,
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
        watch: an optional callable(steps_done, steps_total, image so far) (see decoding.generate).
        static: decode through the static-shape step (model/static.py), captured as a CUDA graph
        on a GPU; None: on CUDA where it applies. compile: that step through torch.compile; None:
        on CUDA (see decoding.generate).
        """
        from imagetx.model.decoding import DEFAULT_WINDOW, generate

        return generate(
            self, n, labels=labels, source=source, temperature=temperature, generator=generator,
            use_cache=use_cache, prime=prime, prime_mask=prime_mask, progress=progress, constraint=constraint,
            seed=seed, first_index=first_index, decode=decode, window=DEFAULT_WINDOW if window is None else window,
            watch=watch, static=static, compile=compile,
        )
