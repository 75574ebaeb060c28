"""Cached incremental decoding equals the full forward pass; sampling is reproducible."""

import pytest
import torch

from imagetx import ImageTransformer

from model_properties import check_cache_equals_full_pass, check_same_samples_with_and_without_cache, in_generation_order
from model_properties import model_inputs as inputs
from test_model import VARIANTS, tiny


# Hand-picked variants, kept as fixed examples beside the configurations test_properties.py draws.
@pytest.mark.parametrize("attention,output,extra", VARIANTS)
def test_cached_conditionals_equal_the_full_forward_pass(attention, output, extra):
    torch.manual_seed(2)
    cfg = tiny(attention, output, **extra)
    check_cache_equals_full_pass(ImageTransformer(cfg).eval(), *inputs(cfg, seed=5))


@pytest.mark.parametrize("attention,output,extra", VARIANTS[:8])
def test_same_seed_same_images_with_and_without_cache(attention, output, extra):
    torch.manual_seed(3)
    cfg = tiny(attention, output, **extra)
    model = ImageTransformer(cfg).eval()
    _, labels, source = inputs(cfg, batch=2)
    check_same_samples_with_and_without_cache(model, labels, source, seed=7)
    a = model.sample(2, labels, source, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, model.sample(2, labels, source, generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(a, model.sample(2, labels, source, generator=torch.Generator().manual_seed(8)))


@pytest.mark.parametrize("output", ["categorical", "dmol"])
def test_temperature_zero_is_greedy(output):
    torch.manual_seed(4)
    cfg = tiny("local1d", output, block_length=4)
    model = ImageTransformer(cfg).eval()
    s = model.sample(2, temperature=0.0)
    with torch.inference_mode():
        out = in_generation_order(model, model(s))
    if output == "categorical":
        greedy = out.argmax(-1)  # (B, L)
        assert torch.equal(greedy, s.reshape(2, -1)[:, model.order].long())
    else:
        from imagetx.model.dmol import dmol_log_probs

        pix = s.reshape(2, -1, cfg.channels)[:, model.order].long()
        lp = dmol_log_probs(out, pix, cfg.channels, cfg.num_mixtures)  # (B, L, C, 256)
        assert torch.equal(lp.argmax(-1), pix)


def test_negative_temperature_is_rejected():
    model = ImageTransformer(tiny("local1d", block_length=4))
    with pytest.raises(ValueError, match="temperature"):
        model.sample(1, temperature=-0.5)


@pytest.mark.parametrize("output", ["categorical", "dmol"])
@pytest.mark.parametrize("temperature", [float("inf"), float("nan"), "1.0"])
def test_non_finite_temperature_is_rejected_naming_the_range(output, temperature):
    model = ImageTransformer(tiny("local1d", output=output, block_length=4))
    with pytest.raises(ValueError, match="finite number >= 0"):
        model.sample(1, temperature=temperature)


def test_prime_keeps_the_given_rows():
    torch.manual_seed(5)
    cfg = tiny("local2d", query_shape=(2, 4), memory_flange=(1, 2))
    model = ImageTransformer(cfg).eval()
    prime = torch.randint(0, 256, (3, *cfg.image_size, 3), dtype=torch.uint8)
    mask = torch.zeros_like(prime, dtype=torch.bool)
    mask[:, :2] = True  # keep the top two rows
    out = model.sample(3, prime=prime, prime_mask=mask, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :2], prime[:, :2])
    assert not torch.equal(out[:, 2:], prime[:, 2:])


@pytest.mark.parametrize("output", ["categorical", "dmol"])
def test_a_tiny_temperature_is_greedy_not_nan(output):
    torch.manual_seed(6)
    cfg = tiny("local1d", output, block_length=4)
    model = ImageTransformer(cfg).eval()
    assert torch.equal(model.sample(2, temperature=1e-30), model.sample(2, temperature=0.0))
