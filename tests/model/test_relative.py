"""model.relative: relative logits and rotary embeddings (ours, not in the paper).

The no-leak, cache and dense-reference properties over every geometry with each setting are in
test_properties.py (the strategy draws model.relative). Here:
- a relative-only attention's scores are invariant to shifting every position by one offset,
  on the attention logits computed from explicit coordinates (no image edge to intervene);
- the model's attention layers compute exactly those logits at their layout's coordinates;
- the settings relative cannot serve are ConfigErrors naming both; a checkpoint keeps its own;
- `imagetx train --set model.relative=rotary` runs.
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from imagetx import ImageTransformer, ModelConfig, train
from imagetx.cli import app
from imagetx.config import load_config
from imagetx.errors import ConfigError
from imagetx.model.relative import RelativeLogits, attention_logits, offsets
from imagetx.storage.checkpoint import latest_checkpoint
from imagetx.storage.weights import load_model
from support.configs import TINY_MODEL


def _coords(n: int, axes: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Random coordinates of n positions: rows and columns in [0, 12), channels in [0, 3)."""
    highs = [12, 12, 3][:axes]
    return [torch.randint(0, h, (n,), generator=gen) for h in highs]


@pytest.mark.parametrize("relative", ["logits", "rotary"])
@pytest.mark.parametrize("axes", [2, 3])
@pytest.mark.parametrize("seed", range(3))
def test_scores_are_invariant_to_shifting_every_position(relative, axes, seed):
    gen = torch.Generator().manual_seed(seed)
    B, h, lq, lk, hd = 2, 3, 7, 11, 16
    q = torch.randn(B, h, lq, hd, generator=gen, dtype=torch.float64)
    k = torch.randn(B, h, lk, hd, generator=gen, dtype=torch.float64)
    qc, kc = _coords(lq, axes, gen), _coords(lk, axes, gen)
    tables = lows = None
    if relative == "logits":  # tables over every offset between the two sets
        d = offsets(qc, kc)
        lows = [int(x.min()) for x in d]
        tables = RelativeLogits(h, hd, [int(x.max()) - lo + 1 for x, lo in zip(d, lows)]).double().tables
        for t in tables:  # random, not the small initialisation: every offset counts
            t.data = torch.randn(t.shape, generator=gen, dtype=torch.float64)
    scores = attention_logits(q, k, qc, kc, relative, tables, lows)
    for shift in ([5, -3, 1], [-40, 17, 2], [1000, 1000, -1]):
        moved = [c + s for c, s in zip(qc, shift)], [c + s for c, s in zip(kc, shift)]
        torch.testing.assert_close(attention_logits(q, k, *moved, relative, tables, lows), scores, rtol=1e-9, atol=1e-9)
    # ...and they do depend on the positions: key 0 moved to key 1's place changes its scores only
    assert any(int(c[0]) != int(c[1]) for c in kc)
    kc2 = [c.clone() for c in kc]
    for c in kc2:
        c[0] = c[1]
    other = attention_logits(q, k, qc, kc2, relative, tables, lows)
    assert not torch.allclose(other[..., 0], scores[..., 0])
    torch.testing.assert_close(other[..., 1:], scores[..., 1:])


def _tiny(attention: str, relative: str, **extra) -> ModelConfig:
    return ModelConfig(
        image_size=(5, 4), channels=3, attention=attention, relative=relative, n_layers=1, d_model=16,
        n_heads=2, d_ff=24, dropout=0.0, block_length=7, query_shape=(2, 5), memory_flange=(1, 3), **extra,
    )


@pytest.mark.parametrize("output", ["categorical", "dmol"])
@pytest.mark.parametrize("relative", ["logits", "rotary"])
@pytest.mark.parametrize("attention", ["local1d", "local2d", "full"])
def test_the_model_attends_with_the_logits_of_its_coordinates(attention, relative, output):
    """A decoder layer's fast path equals softmax(attention_logits at the layout's coordinates,
    masked by the pattern's dense definition) @ v."""
    config = _tiny(attention, relative, output=output)
    torch.manual_seed(0)
    model = ImageTransformer(config).eval()
    layer = model.blocks[0].attn
    x = torch.randn(2, model.layout.internal_len, config.d_model)
    with torch.no_grad():
        fast = layer(x, windows=model.attention_bias(torch.float32))
        q, k, v = (layer._heads(t) for t in layer.qkv(x).chunk(3, dim=-1))
        pos = model.relative
        tables = layer.rel.tables if relative == "logits" else None
        logits = attention_logits(q, k, pos.coords, pos.coords, relative, tables, pos.lows)
        logits = logits.masked_fill(~model.layout.dense_mask(config), float("-inf"))
        o = logits.softmax(-1) @ v  # (B, h, Lp, hd)
        expected = layer.out(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
    real = model.layout.valid
    torch.testing.assert_close(fast[:, real], expected[:, real], rtol=1e-5, atol=1e-5)


def test_relative_logits_tables_cover_only_the_offsets_the_window_holds():
    # local 1D, grayscale 4 x 8 (one row of 8 per block of 8): a query sees its own row and the row above
    config = ModelConfig(image_size=(4, 8), channels=1, relative="logits", n_layers=1, d_model=16, n_heads=2,
                         d_ff=16, block_length=8)
    pos = ImageTransformer(config).relative
    assert pos.lows == [-1, -7] and pos.sizes == [2, 15]
    full = ImageTransformer(ModelConfig(**{**config.to_dict(), "attention": "full"})).relative
    assert full.lows == [-3, -7] and full.sizes == [4, 15]
    rgb = ModelConfig(**{**config.to_dict(), "channels": 3, "block_length": 24})
    assert ImageTransformer(rgb).relative.lows == [-1, -7, -2]


def _problems(**settings) -> str:
    with pytest.raises(ConfigError) as info:
        ModelConfig(**settings)
    return str(info.value)


def test_settings_relative_cannot_serve_name_both():
    assert "model.relative must be one of none, logits, rotary" in _problems(relative="skew")
    text = _problems(positional="none")
    assert 'model.positional = "none"' in text and "model.relative" in text
    text = _problems(positional="none", relative="rotary", source_size=(8, 8), encoder_layers=1)
    assert 'model.positional = "none"' in text and "model.source_size" in text
    text = _problems(relative="rotary", d_model=16, n_heads=4)  # head dimension 4: three axes need 6
    assert 'model.relative = "rotary"' in text and "model.n_heads" in text and "model.attention_dim" in text
    ModelConfig(relative="rotary", d_model=16, n_heads=4, channels=1)  # two axes: 4 will do
    ModelConfig(relative="logits", positional="none")


TINY = [
    *TINY_MODEL, "train.batch_size=2", "train.log_every=1", "train.eval_every=0", "train.sample_every=0",
    "train.checkpoint_every=0", "train.max_steps=2",
]


def test_a_checkpoint_keeps_its_relative_setting(tmp_path):
    out = tmp_path / "run"
    train.run(load_config(sets=[*TINY, f"train.out={out}", "model.relative=logits"]))
    model = load_model(latest_checkpoint(out))
    assert model.config.relative == "logits" and model.blocks[0].attn.rel is not None
    with pytest.raises(ConfigError, match=r"model.relative = 'rotary' \(checkpoint: 'logits'\)"):
        train.run(load_config(sets=[*TINY, f"train.out={out}", "model.relative=rotary", "train.max_steps=3"]),
                  resume="auto")
    # no relative setting given: the checkpoint's
    summary = train.run(load_config(sets=[*TINY, f"train.out={out}", "train.max_steps=3"]), resume="auto")
    assert summary["step"] == 3 and load_model(latest_checkpoint(out)).config.relative == "logits"


def test_train_cli_with_rotary_and_no_absolute_positions(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--device", "cpu"]
    for s in (*TINY, "model.relative=rotary", "model.positional=none"):
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    config = load_model(latest_checkpoint(out)).config
    assert config.relative == "rotary" and config.positional == "none"
