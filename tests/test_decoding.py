"""Cached incremental decoding equals the full forward pass; sampling is reproducible."""

import pytest
import torch

from imagetx import ImageTransformer
from imagetx.model.decoding import teacher_forced_outputs

from test_model import VARIANTS, in_generation_order, inputs, tiny


@pytest.mark.parametrize("attention,output,extra", VARIANTS)
def test_cached_conditionals_equal_the_full_forward_pass(attention, output, extra):
    torch.manual_seed(2)
    cfg = tiny(attention, output, **extra)
    model = ImageTransformer(cfg).eval()
    x, labels, source = inputs(cfg, seed=5)
    with torch.inference_mode():
        full = in_generation_order(model, model(x, labels, source))
    cached = teacher_forced_outputs(model, x, labels, source)
    torch.testing.assert_close(cached, full.reshape(cached.shape), rtol=1e-4, atol=1e-4)
    if output == "categorical":  # the distributions themselves, at every step
        torch.testing.assert_close(cached.softmax(-1), full.reshape(cached.shape).softmax(-1), rtol=0, atol=1e-4)


@pytest.mark.parametrize("attention,output,extra", VARIANTS[:8])
def test_same_seed_same_images_with_and_without_cache(attention, output, extra):
    torch.manual_seed(3)
    cfg = tiny(attention, output, **extra)
    model = ImageTransformer(cfg).eval()
    _, labels, source = inputs(cfg, B=2)
    a = model.sample(2, labels, source, generator=torch.Generator().manual_seed(7))
    b = model.sample(2, labels, source, generator=torch.Generator().manual_seed(7), use_cache=False)
    c = model.sample(2, labels, source, generator=torch.Generator().manual_seed(7))
    assert a.dtype == torch.uint8 and a.shape == (2, *cfg.image_size, cfg.channels)
    assert torch.equal(a, b) and torch.equal(a, c)
    d = model.sample(2, labels, source, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(a, d)


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
