"""The model's defining properties: no information from the future, fast paths equal the dense
masked reference, normalized likelihoods, clear errors for bad inputs."""

import contextlib
import math

import pytest
import torch
from hypothesis import given, settings

from imagetx import ConfigError, ImageTransformer, ModelConfig
from imagetx.model import reference_mode
from imagetx.model.layout import make_layout
from support.properties import check_dependencies, check_fast_equals_dense, windows_as_dense
from support.properties import model_inputs as inputs
from support.configs import model_configs
from support.configs import PATTERNS, VARIANTS, tiny


# Hand-picked variants, kept as fixed examples beside the configurations test_properties.py draws.
@pytest.mark.parametrize("attention,output,extra", VARIANTS)
def test_no_information_from_the_future(attention, output, extra):
    torch.manual_seed(0)
    cfg = tiny(attention, output, **extra)
    check_dependencies(ImageTransformer(cfg).eval(), *inputs(cfg, batch=1))


@pytest.mark.parametrize("attention,output,extra", VARIANTS)
def test_fast_attention_equals_dense_reference(attention, output, extra):
    torch.manual_seed(1)
    cfg = tiny(attention, output, **extra)
    check_fast_equals_dense(ImageTransformer(cfg), *inputs(cfg, seed=3))


@pytest.mark.parametrize("attention,extra", PATTERNS)
def test_training_after_a_forward_pass_in_inference_mode(attention, extra):
    # constant tensors cached by the first forward (the attention mask) must not be inference
    # tensors, or a model evaluated before its first training step cannot be trained
    torch.manual_seed(1)
    cfg = tiny(attention, **extra)
    model = ImageTransformer(cfg)
    x, _, _ = inputs(cfg)
    with torch.inference_mode():
        model(x)
    model.nll(x).sum().backward()
    assert all(p.grad is not None for p in model.blocks.parameters())


def test_dense_masks_follow_the_published_geometry():
    # local 1D, lq 256 over 32x32x3: every query sees at most 512 keys, block 0 only itself
    cfg = ModelConfig(image_size=(32, 32), channels=3, attention="local1d", block_length=256)
    mask = make_layout(cfg).dense_mask(cfg)
    counts = mask.sum(1)
    assert counts.max() == 512 and counts[255] == 256 and counts[256] == 257 and counts[511] == 512
    # local 2D, query (8, 16), flange (8, 16): the last query of an interior block sees 640 keys
    cfg = ModelConfig(image_size=(32, 32), channels=3, attention="local2d", query_shape=(8, 16), memory_flange=(8, 16))
    lay = make_layout(cfg)
    mask = lay.dense_mask(cfg)
    nbw = lay.padded_grid[1] // 16
    interior_block = 1 * nbw + 2
    last_query = interior_block * 128 + 127
    assert int(mask[last_query].sum()) == 8 * 48 + 8 * 16 + 128
    # the fast path's windows describe exactly the same pattern, key for key
    assert torch.equal(windows_as_dense(lay), mask)


@pytest.mark.parametrize("extra", [p[1] for p in PATTERNS if p[0] == "local2d"])
def test_local2d_windows_equal_the_dense_definition(extra):
    cfg = tiny("local2d", image_size=(7, 5), **extra)
    lay = make_layout(cfg)
    assert torch.equal(windows_as_dense(lay), lay.dense_mask(cfg))


def test_generation_order_is_block_raster_for_local2d():
    cfg = tiny("local2d", image_size=(4, 2), channels=1, query_shape=(2, 1), memory_flange=(0, 0))
    # grid 4x2, blocks of 2 rows x 1 column: (0,0),(1,0) | (0,1),(1,1) | (2,0),(3,0) | (2,1),(3,1)
    assert make_layout(cfg).order.tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_uniform_logits_give_exactly_8_bits_per_dim():
    cfg = tiny("local1d", block_length=4)
    model = ImageTransformer(cfg)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
    x, _, _ = inputs(cfg, batch=3)
    bpd = model.nll(x).double() / (cfg.num_dims * math.log(2))
    torch.testing.assert_close(bpd, torch.full((3,), 8.0, dtype=torch.float64), rtol=0, atol=1e-6)


def test_output_shapes_and_dtypes():
    cfg = tiny("local2d", query_shape=(2, 2), memory_flange=(1, 1))
    model = ImageTransformer(cfg)
    x, _, _ = inputs(cfg)
    assert model(x.to(torch.uint8)).shape == (2, 5, 3, 3, 256)
    cfg = tiny("local1d", output="dmol", num_mixtures=4)
    model = ImageTransformer(cfg)
    out = model(x.to(torch.uint8))
    assert out.shape == (2, 5, 3, 4 * 10) and out.dtype == torch.float32
    assert model.nll(x).shape == (2,)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    cfg = tiny("local1d", block_length=5, dropout=0.3)  # the recomputation must redraw the same masks
    model = ImageTransformer(cfg).train()
    x, _, _ = inputs(cfg)
    grads = []
    for flag in (False, True):
        model.set_activation_checkpointing(flag)
        model.zero_grad()
        torch.manual_seed(5)
        model.nll(x).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_config_lists_every_problem():
    with pytest.raises(ConfigError) as err:
        ModelConfig(channels=2, attention="local3d", n_heads=3, d_model=512, dropout=1.5)
    problems = err.value.problems
    text = " | ".join(problems)
    assert len(problems) >= 4
    for needle in ("channels", "attention", "n_heads", "dropout"):
        assert needle in text
    with pytest.raises(ConfigError, match="encoder_layers"):
        ModelConfig(source_size=(8, 8))
    with pytest.raises(ConfigError, match="unknown key model.depth"):
        ModelConfig.from_dict({"depth": 3})


def test_bad_inputs_name_the_problem():
    cfg = tiny("local1d", num_classes=3)
    model = ImageTransformer(cfg)
    x, labels, _ = inputs(cfg)
    with pytest.raises(ValueError, match=r"\(B, 5, 3, 3\)"):
        model(torch.zeros(2, 4, 3, 3, dtype=torch.long), labels)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        model(x, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="class-conditional"):
        model(x)
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        model(x + 300, labels)
    with pytest.raises(ValueError, match="integer"):
        model(x.float(), labels)
    with pytest.raises(ValueError, match="source"):
        model(x, labels, source=x)


@pytest.mark.parametrize("field,value,allowed", [
    ("query_shape", (0, 2), ">= 1"), ("query_shape", (2, True), ">= 1"), ("query_shape", (2,), ">= 1"),
    ("memory_flange", (-1, 0), ">= 0"), ("memory_flange", (1.5, 2), ">= 0"),
    ("block_length", 0, "positive"), ("block_length", True, "positive"),
])
def test_block_shapes_no_model_can_use_name_the_field_and_range(field, value, allowed):
    with pytest.raises(ConfigError) as err:
        ModelConfig(attention="local2d", **{field: value})
    assert len(err.value.problems) == 1
    assert f"model.{field}" in err.value.problems[0] and allowed in err.value.problems[0]


def test_config_round_trips_through_a_dict():
    cfg = tiny("local2d", query_shape=(2, 4), memory_flange=(1, 3), source_size=(2, 1), encoder_layers=1)
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize("output", ["categorical", "dmol"])
def test_source_skip_reads_the_low_res_value_covering_each_position(output):
    # 6x4 image from a 3x2 source: every source pixel covers a 2x2 block of the image
    cfg = tiny("local2d", output, query_shape=(2, 2), memory_flange=(1, 1), image_size=(6, 4),
               source_size=(3, 2), encoder_layers=1, source_skip=True)
    model = ImageTransformer(cfg)
    per = cfg.tokens_per_pixel
    valid = model.layout.valid
    rows, cols = model.layout.row_of[valid], model.layout.col_of[valid]
    index = model.source_index[valid]
    if output == "categorical":
        channel = cols % cfg.channels
        assert torch.equal(index % cfg.channels, channel)
        index = index // cfg.channels
        assert torch.equal(model.source_offset[valid], channel * 256)
    assert torch.equal(index, (rows // 2) * 2 + (cols // per) // 2)
    with pytest.raises(ConfigError, match="source_skip needs model.source_size"):
        ModelConfig(source_skip=True)


@pytest.mark.parametrize("batch,image_size,block", [
    (1, (4, 5), 64),  # one block in all: no previous block anywhere
    (3, (4, 5), 64),  # one block per image, several images
    (1, (4, 5), 12),  # 60 sub-pixels: 5 full blocks
    (3, (5, 5), 16),  # 75 sub-pixels: the last block padded
])
def test_local1d_attention_layer_equals_dense_reference(batch, image_size, block):
    from imagetx.model.attention import Attention

    torch.manual_seed(2)
    cfg = tiny("local1d", image_size=image_size, block_length=block)
    layer = Attention(cfg, "local1d", make_layout(cfg))
    x = torch.randn(batch, cfg.seq_len, cfg.d_model, requires_grad=True)
    gy = torch.randn(batch, cfg.seq_len, cfg.d_model)
    results = []
    for mode in (contextlib.nullcontext, reference_mode):
        with mode():
            y = layer(x)
        results.append((y, *torch.autograd.grad(y, (x, layer.qkv.weight), gy)))
    for fast, ref in zip(*results):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("missing", ["flash_forward", "flash_backward"])
def test_local1d_without_the_private_flash_operators_takes_the_windowed_path(monkeypatch, missing):
    """A torch without the private CPU flash operators: local 1D falls back to the windows-and-mask
    path, which still equals the reference."""
    from imagetx.model import local1d

    torch.manual_seed(3)
    cfg = tiny("local1d", image_size=(5, 5), block_length=16, dropout=0.0)
    model = ImageTransformer(cfg)
    x, _, _ = inputs(cfg)
    monkeypatch.setattr(local1d, missing, None)
    monkeypatch.setattr(local1d, "attend", None)  # raises if the model still tried it
    assert not local1d.applies(torch.zeros(1, 1, 3 * cfg.attn_dim), 0.0)
    check_fast_equals_dense(model, x)


def train_bf16_then_fp32(model, batch):
    """One bf16-autocast and one fp32 Adam step on batch = (x, labels, source); returns batch."""
    x, labels, source = batch
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for dtype in (torch.bfloat16, torch.float32):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype == torch.bfloat16):
            model.nll(x, labels, source).mean().backward()
        opt.step()
        opt.zero_grad()
    return batch


@pytest.mark.parametrize("extra", [
    dict(attention="local1d", block_length=16, relative="logits"),
    dict(attention="local2d", query_shape=(2, 6), memory_flange=(1, 6), relative="rotary", num_classes=2),
    dict(attention="local1d", block_length=8, source_size=(2, 5), encoder_layers=1, source_skip=True,
         consistent=True, range_input=True),
], ids=["local1d-logits", "local2d-rotary-classes", "superres-consistent"])
def test_buffers_are_constants_that_training_never_changes(extra):
    """Every buffer is a table built at construction: training steps (bf16 autocast and fp32),
    evaluation and sampling leave each one bit for bit as it was. DDP relies on it
    (broadcast_buffers=False: nothing to send from rank 0 before each forward pass)."""
    torch.manual_seed(4)
    cfg = tiny(image_size=(4, 5), **extra)
    model = ImageTransformer(cfg)
    before = {name: b.clone() for name, b in model.named_buffers()}
    assert before, "the model registers its tables as buffers"
    x, labels, source = train_bf16_then_fp32(model, inputs(cfg))
    model.eval()
    with torch.inference_mode():
        model.nll(x, labels, source)
        model.sample(2, labels, source, seed=0)
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name]), f"buffer {name} changed"


@settings(max_examples=10, deadline=None)
@given(model_configs())
def test_buffers_of_drawn_models_stay_constant_through_training(config):
    """The same property over drawn configurations (every pattern, output and conditioning): one
    bf16 and one fp32 training step change no buffer."""
    torch.manual_seed(5)
    model = ImageTransformer(config)
    before = {name: b.clone() for name, b in model.named_buffers()}
    x, labels, source = train_bf16_then_fp32(model, inputs(config))
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name]), f"buffer {name} changed"
