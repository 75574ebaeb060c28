"""The architecture of an Image Transformer, as one validated dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from imagetx.errors import ConfigError

ATTENTIONS = ("local1d", "local2d", "full")
OUTPUTS = ("categorical", "dmol")
POSITIONALS = ("sinusoidal", "learned", "none")
RELATIVES = ("none", "logits", "rotary")
NORMS = ("post", "pre")


@dataclass
class ModelConfig:
    """Architecture of an Image Transformer. Defaults are the published CIFAR-10 "cat" setup.

    Block sizes are in units of the sequence grid (rows x sub-pixel columns): for the categorical
    output a row holds W*C sub-pixels, for DMOL a row holds W pixels. Any block_length and
    query_shape >= 1 and memory_flange >= 0 is valid: one larger than the grid acts as the whole
    axis (a single block; a flange reaching the image's edge). tests/model/test_properties.py proves
    the no-leak, cache and dense-reference properties over that whole range.
    """

    image_size: tuple[int, int] = (32, 32)  # (H, W) of the generated image
    channels: int = 3  # 1 (grayscale) or 3 (RGB)
    attention: str = "local1d"  # "local1d", "local2d" or "full" (dense causal)
    n_layers: int = 12
    d_model: int = 512
    n_heads: int = 4
    d_ff: int = 2048
    attention_dim: int = 0  # total q/k/v width over all heads; 0 means d_model
    dropout: float = 0.3  # residual dropout after attention and after the FFN
    attention_dropout: float = 0.0  # dropout on attention weights
    block_length: int = 256  # local1d query block; its memory is the previous block
    query_shape: tuple[int, int] = (8, 16)  # local2d query block (rows, columns)
    memory_flange: tuple[int, int] = (8, 16)  # local2d flange (rows above, columns either side)
    positional: str = "sinusoidal"  # "sinusoidal", "learned" or "none" (ours: relative positions only) absolute 2D encodings
    # ours, not in the paper: relative positions in the decoder's self-attention (imagetx.model.relative):
    # "none" (as published), "logits" (learned 2D relative logits, Shaw et al.) or "rotary" (axial 2D rotary)
    relative: str = "none"
    output: str = "categorical"  # "categorical" (256-way per sub-pixel) or "dmol"
    num_mixtures: int = 10  # DMOL mixture components
    num_classes: int = 0  # 0 = unconditional; else a learned class embedding at every position
    norm: str = "post"  # "post" (as published) or "pre" LayerNorm
    source_size: tuple[int, int] | None = None  # (h, w) low-res input: makes an encoder-decoder
    encoder_layers: int = 0  # full-attention encoder layers (super-resolution only)
    # super-resolution only: also add, at every decoder position, an embedding of the low-res
    # value that covers it (a local path beside the cross-attention; not in the paper)
    source_skip: bool = False
    # super-resolution only (ours, not in the paper): every conditional is restricted to the
    # values that keep the image's area downsampling equal to the source, and renormalised
    # (imagetx.model.consistency): the model puts all its mass on images consistent with its input
    consistent: bool = False
    # model.consistent only (ours, not in the paper): add to each decoder input embeddings of the
    # range its value is restricted to and of the mean the rest of its cell needs, so the network
    # knows how much of its cell's sum is left rather than only being cut off at the cell's end
    range_input: bool = False

    def __post_init__(self):
        for name in ("image_size", "query_shape", "memory_flange", "source_size"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))
        self.validate()

    # ---- derived values -------------------------------------------------------------------
    @property
    def tokens_per_pixel(self) -> int:
        """Sequence positions per pixel: one per sub-pixel (categorical) or per pixel (DMOL)."""
        return self.channels if self.output == "categorical" else 1

    @property
    def grid(self) -> tuple[int, int]:
        """The sequence laid out as (rows, columns): (H, W * tokens_per_pixel)."""
        return self.image_size[0], self.image_size[1] * self.tokens_per_pixel

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_dims(self) -> int:
        """Number of sub-pixels of one image, the denominator of bits/dim."""
        return self.image_size[0] * self.image_size[1] * self.channels

    @property
    def attn_dim(self) -> int:
        return self.attention_dim or self.d_model

    @property
    def head_dim(self) -> int:
        return self.attn_dim // self.n_heads

    @property
    def dmol_params(self) -> int:
        """Numbers per pixel of a DMOL output: per mixture a logit, C means, C log-scales and
        C*(C-1)/2 channel coupling coefficients."""
        c = self.channels
        return self.num_mixtures * (1 + 2 * c + c * (c - 1) // 2)

    # ---- validation -----------------------------------------------------------------------
    def problems(self) -> list[str]:
        p: list[str] = []

        def pair(name, minimum):
            v = getattr(self, name)
            ints = isinstance(v, tuple) and len(v) == 2 and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
            if not ints or min(v) < minimum:
                p.append(f"model.{name} must be two integers >= {minimum} (rows, columns), got {v!r}")
                return False
            return True

        def positive(name):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                p.append(f"model.{name} must be a positive integer, got {v!r}")
                return False
            return True

        def choice(name, allowed):
            v = getattr(self, name)
            if v not in allowed:
                p.append(f"model.{name} must be one of {', '.join(allowed)}; got {v!r}")

        pair("image_size", 1)
        if self.channels not in (1, 3):
            p.append(f"model.channels must be 1 or 3, got {self.channels!r}")
        choice("attention", ATTENTIONS)
        choice("output", OUTPUTS)
        choice("positional", POSITIONALS)
        choice("norm", NORMS)
        choice("relative", RELATIVES)
        heads_ok = positive("n_heads")
        for name in ("n_layers", "d_model", "d_ff", "block_length", "num_mixtures"):
            positive(name)
        if not isinstance(self.attention_dim, int) or self.attention_dim < 0:
            p.append(f"model.attention_dim must be >= 0 (0 = d_model), got {self.attention_dim!r}")
        elif heads_ok and isinstance(self.d_model, int) and self.attn_dim % self.n_heads:
            p.append(
                f"model.attention_dim ({self.attn_dim}) must be divisible by "
                f"model.n_heads ({self.n_heads})"
            )
        if isinstance(self.d_model, int) and self.d_model % 2:
            p.append(f"model.d_model must be even (half encodes rows, half columns), got {self.d_model}")
        for name in ("dropout", "attention_dropout"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                p.append(f"model.{name} must be in [0, 1), got {v!r}")
        pair("query_shape", 1)
        pair("memory_flange", 0)
        p.extend(self._relative_problems())
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            p.append(f"model.num_classes must be >= 0 (0 = unconditional), got {self.num_classes!r}")
        if self.source_size is not None:
            if pair("source_size", 1) and isinstance(self.image_size, tuple):
                if any(s > t for s, t in zip(self.source_size, self.image_size)):
                    p.append(
                        f"model.source_size {self.source_size} must not exceed "
                        f"model.image_size {self.image_size}"
                    )
            if not isinstance(self.encoder_layers, int) or self.encoder_layers < 1:
                p.append(
                    "model.encoder_layers must be >= 1 for a super-resolution model "
                    f"(source_size set), got {self.encoder_layers!r}"
                )
        elif self.encoder_layers:
            p.append("model.encoder_layers is set but model.source_size is not; set both or neither")
        if not isinstance(self.source_skip, bool):
            p.append(f"model.source_skip must be true or false, got {self.source_skip!r}")
        elif self.source_skip and self.source_size is None:
            p.append("model.source_skip needs model.source_size (a super-resolution model)")
        if not isinstance(self.consistent, bool):
            p.append(f"model.consistent must be true or false, got {self.consistent!r}")
        elif self.consistent:
            if self.source_size is None:
                p.append("model.consistent needs model.source_size (a super-resolution model)")
            elif (isinstance(self.image_size, tuple) and isinstance(self.source_size, tuple)
                  and any(t % s for t, s in zip(self.image_size, self.source_size) if isinstance(s, int) and s > 0)):
                p.append(f"model.consistent needs model.image_size {self.image_size} to be a multiple of "
                         f"model.source_size {self.source_size}")
            if self.output != "categorical":
                p.append('model.consistent needs output = "categorical" (the restricted DMOL likelihood is not '
                         'implemented; `imagetx superres --consistent` samples DMOL models consistently)')
        if not isinstance(self.range_input, bool):
            p.append(f"model.range_input must be true or false, got {self.range_input!r}")
        elif self.range_input and (self.consistent is not True or self.output != "categorical"):
            p.append('model.range_input needs model.consistent = true and output = "categorical": its inputs are '
                     "the ranges the consistent model restricts each sub-pixel to")
        return p

    def _relative_problems(self) -> list[str]:
        """model.relative and model.positional against the settings they cannot serve."""
        p: list[str] = []
        if self.positional == "none" and self.relative == "none":
            p.append('model.positional = "none" needs model.relative = "logits" or "rotary": '
                     "with model.relative = \"none\" the model would know no positions")
        if self.positional == "none" and self.source_size is not None:
            p.append('model.positional = "none" cannot serve model.source_size (a super-resolution model): '
                     "the encoder knows positions only from the absolute encodings")
        if self.relative == "rotary" and isinstance(self.n_heads, int) and self.n_heads > 0 \
                and isinstance(self.attn_dim, int) and self.attn_dim % self.n_heads == 0:
            axes = 3 if self.channels == 3 and self.output == "categorical" else 2
            if self.head_dim < 2 * axes:
                p.append(f'model.relative = "rotary" needs a head dimension of at least {2 * axes} (one rotated pair '
                         f"per axis: rows, columns{', channels' if axes == 3 else ''}); model.attention_dim "
                         f"{self.attn_dim} over model.n_heads {self.n_heads} gives {self.head_dim}")
        return p

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    # ---- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError([f"unknown key model.{k}" for k in unknown])
        return cls(**d)

    def non_embedding_params(self) -> int:
        """Parameters in the attention and FFN weights (for FLOP estimates)."""
        a, d, f = self.attn_dim, self.d_model, self.d_ff
        per_layer = 4 * a * d + 2 * d * f
        n = self.n_layers * per_layer
        if self.source_size is not None:
            n += self.n_layers * 4 * a * d + self.encoder_layers * per_layer
        return n
