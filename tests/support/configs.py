"""The tiny models the tests share, and the Hypothesis strategy over model geometries.

TINY_MODEL is a list of `--set` strings (what load_config(sets=...) and the CLI take), the
smallest model a run can train in milliseconds: local 1D attention on 8x8 grayscale images, one
layer of width 16, unconditional (the quickstart defaults are full attention and
class-conditional). Each test adds the train.* settings it needs (support.runs.TINY is one set).

tiny(...) is the ModelConfig the model tests build on: two layers of width 32 on a small RGB grid
that divides no block; PATTERNS and VARIANTS list the geometries every model property runs on.
model_configs draws geometries, examples(n) sizes a property test to the Hypothesis profile.
"""

from __future__ import annotations

from hypothesis import event, note, settings
from hypothesis import strategies as st

from imagetx.model.config import ModelConfig

TINY_MODEL = [
    "model.attention=local1d", "model.num_classes=0",
    "model.image_size=[8, 8]", "model.channels=1", "model.n_layers=1", "model.d_model=16",
    "model.n_heads=2", "model.d_ff=32", "model.block_length=16",
]


TINY_DIMS = dict(n_layers=2, d_model=32, n_heads=2, d_ff=48, dropout=0.0)


# (attention, extra config): sizes chosen so the grid does not divide the blocks
PATTERNS = [
    ("local1d", dict(block_length=7)),
    ("local2d", dict(query_shape=(2, 4), memory_flange=(1, 3))),
    ("local2d", dict(query_shape=(3, 2), memory_flange=(4, 5))),  # flange larger than the block
    ("full", {}),
]


def tiny(attention="local1d", output="categorical", image_size=(5, 3), channels=3, **kw):
    cfg = dict(TINY_DIMS, attention=attention, output=output, image_size=image_size, channels=channels)
    cfg.update(kw)
    return ModelConfig(**cfg)


VARIANTS = [
    (att, out, extra)
    for att, extra in PATTERNS
    for out in ("categorical", "dmol")
] + [
    ("local1d", "categorical", dict(block_length=5, num_classes=4)),
    ("local2d", "dmol", dict(query_shape=(2, 2), memory_flange=(1, 1), num_classes=3)),
    ("local1d", "categorical", dict(block_length=6, source_size=(2, 1), encoder_layers=1)),
    ("local2d", "categorical", dict(query_shape=(2, 4), memory_flange=(2, 2), source_size=(3, 2), encoder_layers=2,
                                    source_skip=True)),
    ("full", "dmol", dict(source_size=(2, 2), encoder_layers=1, num_classes=2, source_skip=True)),
    ("local1d", "categorical", dict(block_length=4, norm="pre", positional="learned", channels=1, image_size=(4, 5))),
]


_BUDGET = settings().max_examples / 100  # 1 in the default profile, 10 when thorough


def examples(n: int) -> settings:
    return settings(max_examples=max(1, int(n * _BUDGET)))


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def extent(n: int, smallest: int = 1) -> st.SearchStrategy[int]:
    """A block or flange extent along an axis of length n: one that divides n (an exact tiling),
    any one (often a padded edge), n itself (one block spans the axis), or more than n."""
    return st.one_of(
        st.sampled_from([d for d in divisors(n) if d >= smallest] or [n]),
        st.integers(smallest, n),
        st.just(n),
        st.integers(n + 1, n + 3),
    )


@st.composite
def model_configs(draw, attention=None, max_side: int = 9) -> ModelConfig:
    attention = attention or draw(st.sampled_from(["local1d", "local2d", "full"]))
    output = draw(st.sampled_from(["categorical", "dmol"]))
    channels = draw(st.sampled_from([1, 3]))
    H, W = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    rows, cols = H, W * (channels if output == "categorical" else 1)
    cfg = dict(
        image_size=(H, W), channels=channels, attention=attention, output=output,
        n_layers=draw(st.integers(1, 2)), d_model=16, n_heads=draw(st.sampled_from([1, 2])), d_ff=24,
        dropout=0.0, num_mixtures=draw(st.integers(1, 3)),
        norm=draw(st.sampled_from(["post", "pre"])), positional=draw(st.sampled_from(["sinusoidal", "learned"])),
    )
    if attention == "local1d":
        cfg["block_length"] = draw(extent(rows * cols))
    if attention == "local2d":
        cfg["query_shape"] = (draw(extent(rows)), draw(extent(cols)))
        cfg["memory_flange"] = (draw(extent(rows, 0)), draw(extent(cols, 0)))
    kind = draw(st.sampled_from(["unconditional", "classes", "superres"]))
    if kind == "classes":
        cfg["num_classes"] = draw(st.integers(1, 3))
    if kind == "superres":
        cfg["source_size"] = (draw(st.integers(1, H)), draw(st.integers(1, W)))
        if output == "categorical" and draw(st.booleans()):  # restricted to images consistent with the source
            cfg["source_size"] = (draw(st.sampled_from(divisors(H))), draw(st.sampled_from(divisors(W))))
            cfg["consistent"] = True
        cfg["encoder_layers"] = 1
        cfg["source_skip"] = draw(st.booleans())
        if draw(st.booleans()):
            cfg["num_classes"] = 2
    # drawn last, so that the geometries drawn before model.relative existed are drawn still
    cfg["relative"] = draw(st.sampled_from(["none", "logits", "rotary"]))
    if cfg["relative"] != "none" and kind != "superres" and draw(st.booleans()):
        cfg["positional"] = "none"  # relative positions only (the encoder needs absolute ones)
    if cfg.get("consistent"):  # drawn after model.relative, for the same reason
        cfg["range_input"] = draw(st.booleans())
    config = ModelConfig(**cfg)
    note(f"config: {config}")
    event(f"relative {config.relative}, positional {config.positional}")
    event(f"{attention}, {output}, {kind}{', consistent' if config.consistent else ''}"
          f"{', range_input' if config.range_input else ''}")
    event(f"sequence length {'<= 16' if rows * cols <= 16 else '17-64' if rows * cols <= 64 else '> 64'}")
    if attention == "local2d":
        (qh, qw), (fh, fw) = cfg["query_shape"], cfg["memory_flange"]
        exact = rows % min(qh, rows) == 0 and cols % min(qw, cols) == 0
        event(f"local2d: {'exact tiling' if exact else 'padded edge'}, "
              f"{'2+ blocks per row' if qw < cols else 'one block per row'}"
              f"{', flange wider than the block' if fw > qw or fh > qh else ''}")
    if attention == "local1d":
        event(f"local1d: block {'divides' if (rows * cols) % min(cfg['block_length'], rows * cols) == 0 else 'does not divide'} the sequence")
    return config
