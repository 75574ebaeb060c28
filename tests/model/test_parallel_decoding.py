"""Parallel (Jacobi) decoding with fixed noise (decoding.generate, decode="parallel"): the images
are those of sequential decoding, bit for bit, for every drawn configuration, window size,
temperature and first guess; a pass computes every position as a one-position step does; and the
samples follow the model's own conditionals."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st

from imagetx import ImageTransformer
from imagetx.model import native
from imagetx.model.decoding import IncrementalDecoder, decode_problems, for_decoding, generate, resolve_decode
from support.properties import model_inputs
from support.calibration import CASES, IMAGES, calibrated_model, calibration_failures, pit_of_samples
from support.configs import model_configs

needs_native = pytest.mark.skipif(
    not (native.enabled() and native.library() is not None),
    reason="the fused step needs a CPU with AVX512-BF16 and a C compiler",
)


def both(model, n, labels, source, temperature, window, first_guess="above", seed=5, prime=None, mask=None):
    """(sequential, parallel) images of one model with one seed."""
    kw = dict(labels=labels, source=source, temperature=temperature, seed=seed, prime=prime, prime_mask=mask)
    with torch.inference_mode():
        seq = generate(model, n, decode="sequential", **kw)
        par = generate(model, n, decode="parallel", window=window, first_guess=first_guess, **kw)
    return seq, par


@settings(max_examples=40, deadline=None)
@given(model_configs(max_side=6), st.integers(1, 40), st.sampled_from([0.0, 0.6, 1.0, 3.0]),
       st.sampled_from([torch.float32, torch.bfloat16]), st.integers(1, 3))
def test_parallel_decoding_gives_the_sequential_images(config, window, temperature, dtype, n):
    # bf16 takes the fused C step where it applies (relative logits and CPUs without AVX512-BF16:
    # the torch path), fp32 the torch path; windows cross block boundaries and the image's end
    torch.manual_seed(0)
    model = for_decoding(ImageTransformer(config).eval(), dtype, n)
    note(f"fused: {native.applies(model)}")
    _, labels, source = model_inputs(config, batch=n, seed=3)
    seq, par = both(model, n, labels, source, temperature, window)
    assert torch.equal(seq, par)


@settings(max_examples=15, deadline=None)
@given(model_configs(max_side=5), st.integers(2, 30), st.sampled_from(["zeros", "random", "above"]))
def test_the_first_guesses_never_change_the_images(config, window, guess):
    torch.manual_seed(1)
    model = ImageTransformer(config).eval()
    _, labels, source = model_inputs(config, batch=2, seed=4)
    seq, par = both(model, 2, labels, source, 1.0, window, first_guess=guess)
    assert torch.equal(seq, par)


@settings(max_examples=10, deadline=None)
@given(model_configs(max_side=5), st.integers(2, 20))
def test_a_primed_completion_is_the_same_in_parallel(config, window):
    torch.manual_seed(2)
    model = ImageTransformer(config).eval()
    x, labels, source = model_inputs(config, batch=2, seed=5)
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[:, : max(1, config.image_size[0] // 2)] = True
    seq, par = both(model, 2, labels, source, 1.0, window, prime=x, mask=mask)  # x: consistent with any source
    assert torch.equal(seq, par)
    assert torch.equal(par[mask], x[mask].to(torch.uint8))


@settings(max_examples=15, deadline=None)
@given(model_configs(max_side=5), st.sampled_from(["sequential", "parallel"]), st.integers(2, 20), st.booleans())
def test_a_watcher_sees_each_image_grow_in_generation_order(config, decode, window, primed):
    torch.manual_seed(3)
    model = ImageTransformer(config).eval()
    x, labels, source = model_inputs(config, batch=2, seed=6)
    mask = torch.zeros_like(x, dtype=torch.bool)
    if primed:
        mask[:, : max(1, config.image_size[0] // 2)] = True
    frames = []
    kw = dict(labels=labels, source=source, seed=7, prime=x if primed else None, prime_mask=mask if primed else None)
    with torch.inference_mode():
        final = generate(model, 2, decode=decode, window=window, watch=lambda done, total, image: frames.append(
            (done, total, image.clone())), **kw)
        assert torch.equal(final, generate(model, 2, **kw))  # watching changes nothing
    order = torch.tensor(model.layout.order_list)
    dones = [done for done, _, _ in frames]
    assert dones == sorted(set(dones)) and dones[-1] == config.seq_len and {t for _, t, _ in frames} == {config.seq_len}
    if decode == "sequential":
        assert dones == list(range(1, config.seq_len + 1))
    for done, _, image in frames:  # decided positions hold their final values, the rest zeros (or the prime)
        flat, want = image.view(2, config.seq_len, -1), final.long().view(2, config.seq_len, -1)
        assert torch.equal(flat[:, order[:done]], want[:, order[:done]])
        later = order[done:]
        primed_later = mask.view(2, config.seq_len, -1)[:, later]
        assert torch.equal(flat[:, later], torch.where(primed_later, want[:, later], torch.zeros_like(want[:, later])))


# (d_model, n_heads): head dimensions 16 to 96, rows of one to five 32-wide chunks (the fused
# step's products and its value sums take 32 and 64 dimensions at a time)
WIDTHS = [(16, 1), (16, 2), (96, 2), (64, 1), (80, 1), (96, 1), (160, 2)]


@needs_native
@settings(max_examples=25, deadline=None)
@given(model_configs(max_side=7), st.integers(2, 64), st.integers(1, 3), st.sampled_from(WIDTHS))
def test_a_fused_pass_computes_every_position_as_a_fused_step_does(config, window, n, width):
    # the outputs themselves, not only the values drawn from them: a pass over teacher-forced
    # inputs equals one-position steps bit for bit, wherever the window starts
    d, heads = width
    config = dataclasses.replace(config, d_model=d, n_heads=heads, d_ff=d + 24)
    if config.relative == "logits":
        config = dataclasses.replace(config, relative="rotary")  # logits: the torch path
    torch.manual_seed(3)
    model = for_decoding(ImageTransformer(config).eval(), torch.bfloat16, n)
    assert native.applies(model)
    x, labels, source = model_inputs(config, batch=n, seed=6)
    cfg = model.config
    flat = x.reshape(n, cfg.seq_len, -1)[:, model.layout.order_list]  # generation order
    flat = flat[..., 0] if cfg.output == "categorical" else flat
    ranges = None
    if cfg.range_input:
        ranges = model.cells.range_inputs(x, source).view(n, cfg.seq_len, 3)[:, model.layout.order_list]
    with torch.inference_mode():
        one = IncrementalDecoder(model, n, labels, source)
        ref = torch.stack([one.step(k, None if k == 0 else flat[:, k - 1], None if ranges is None else ranges[:, k])
                           for k in range(cfg.seq_len)], 1)
        par = IncrementalDecoder(model, n, labels, source, window)
        assert par.fused is not None
        k, outs = 0, []
        while k < cfg.seq_len:
            W = min(window, cfg.seq_len - k)
            out = par.steps(k, flat[:, max(k - 1, 0) : k + W - 1], None if ranges is None else ranges[:, k : k + W])
            # keep part of the pass, as a wrong guess would, and go back
            keep = max(1, (W + 1) // 2)
            outs.append(out[:, :keep])
            k += keep
    assert torch.equal(ref, torch.cat(outs, 1))


@pytest.mark.parametrize("attention,output,tiling,geometry", CASES, ids=[f"{a}-{o}-{t}" for a, o, t, _ in CASES])
def test_parallel_samples_follow_the_models_conditionals(attention, output, tiling, geometry):
    model = calibrated_model(attention, output, geometry)
    images = model.sample(IMAGES, generator=torch.Generator().manual_seed(11), decode="parallel", window=7)
    assert calibration_failures(pit_of_samples(model, images, 1.0, seed=12)) == []


def test_bad_decoding_arguments_are_named():
    assert decode_problems("parallel", 4) == []
    assert len(decode_problems("fast", 0)) == 2
    assert decode_problems("auto", 2.5) and decode_problems("auto", True)
    model = ImageTransformer(calibrated_model("full", "categorical", CASES[0][3]).config)
    with pytest.raises(ValueError, match="--window"):
        model.sample(1, decode="parallel", window=0, seed=1)
    with pytest.raises(ValueError, match="cache"):
        model.sample(1, decode="parallel", use_cache=False, seed=1)


def test_auto_decodes_in_parallel_only_on_the_fused_step_at_batch_1():
    model = ImageTransformer(calibrated_model("full", "categorical", CASES[0][3]).config)
    assert resolve_decode(model, "auto", 1) == "sequential"  # fp32: the torch path
    bf16 = for_decoding(model, torch.bfloat16, 1)
    assert resolve_decode(bf16, "auto", 16) == "sequential"
    assert resolve_decode(bf16, "auto", 1) == ("parallel" if native.applies(bf16) else "sequential")
    assert resolve_decode(bf16, "sequential", 1) == "sequential"
