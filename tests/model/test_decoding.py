"""Cached incremental decoding equals the full forward pass; sampling is reproducible."""

import pytest
import torch

from imagetx import ImageTransformer
from imagetx.data.transforms import area_downsample
from imagetx.model import noise

from support.properties import (
    check_cache_equals_full_pass, check_same_samples_with_and_without_cache, in_generation_order,
)
from support.properties import model_inputs as inputs
from support.configs import VARIANTS, tiny


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


@pytest.mark.parametrize("output", ["categorical", "dmol"])
def test_the_seed_alone_fixes_the_images_and_the_generator_gives_a_seed(output):
    torch.manual_seed(7)
    model = ImageTransformer(tiny("local1d", output, block_length=4)).eval()
    a = model.sample(4, seed=5)
    assert torch.equal(a, model.sample(4, seed=5))
    others = [model.sample(4, seed=s) for s in (6, 2**63 + 5)]  # seeds up to 2^64 - 1
    assert all(not torch.equal(a[i], b[i]) for b in others for i in range(4))  # every image changes
    assert not any(torch.equal(a[i], a[j]) for i in range(4) for j in range(i))  # images differ from each other
    # a generator (or torch's default one) stands for one seed drawn from it
    seed = noise.seed_from(torch.Generator().manual_seed(9))
    assert torch.equal(model.sample(4, generator=torch.Generator().manual_seed(9)), model.sample(4, seed=seed))
    torch.manual_seed(10)
    seed = noise.seed_from()
    torch.manual_seed(10)
    assert torch.equal(model.sample(4), model.sample(4, seed=seed))
    for bad in (-1, 2**64, 1.5):
        with pytest.raises(ValueError, match="seed must be"):
            model.sample(1, seed=bad)
    with pytest.raises(ValueError, match="first_index"):
        model.sample(1, seed=0, first_index=-1)


def test_an_inconsistent_prime_is_named_once_decoding_is_done():
    # a model.consistent model: every image must area-downsample to its source; a primed top row
    # of 255s over a source of 0s leaves its cells no value to draw
    torch.manual_seed(8)
    cfg = tiny("local1d", block_length=6, image_size=(4, 4), source_size=(2, 2), encoder_layers=1, consistent=True)
    model = ImageTransformer(cfg).eval()
    source = torch.zeros(1, 2, 2, 3, dtype=torch.uint8)
    prime = torch.full((1, 4, 4, 3), 255, dtype=torch.uint8)
    mask = torch.zeros_like(prime, dtype=torch.bool)
    mask[:, 0] = True
    steps = []
    with pytest.raises(ValueError, match="no value is left to draw"):
        model.sample(1, source=source, seed=0, prime=prime, prime_mask=mask, progress=lambda k, n: steps.append(k))
    assert steps[-1] == cfg.seq_len  # decoding ran to the end: the check reads the device once, after it
    fine = model.sample(1, source=source, seed=0, prime=torch.zeros_like(prime), prime_mask=mask)
    assert torch.equal(area_downsample(fine, (2, 2)), source)  # a consistent prime is completed
