"""Decoding with static shapes (model/static.py), the step CUDA graphs capture: its slot plan
holds every key each step sees and nothing else, by the pattern's own definition (the dense
mask), also under parallel passes that go back; it draws the images the eager cached decoder
draws for the same seed, one position a step and in parallel passes, in every pattern and
output, with classes, super-resolution, primes and every temperature; its samples follow the
model's conditionals; and torch.compile takes a step, or a pass, as one graph with no host value
that serves every step and every seed without compiling again. On what generate's `static` and
`compile` resolve to, and the CPU's default."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st

from imagetx import ImageTransformer
from imagetx.model import decoding, native
from imagetx.model.layout import make_layout, slot_plan
from imagetx.model.static import StaticDecoder, static_problem
from support.calibration import CASES, IMAGES, calibrated_model, calibration_failures, pit_of_samples
from support.configs import model_configs
from support.properties import model_inputs


def decodable(config):
    """The config, with what static decoding does not take drawn away: relative logits become
    rotary, and a consistent model's restriction (and range inputs) is turned off."""
    if config.relative == "logits":
        config = dataclasses.replace(config, relative="rotary")
    return dataclasses.replace(config, consistent=False, range_input=False)


@settings(max_examples=60, deadline=None)
@given(model_configs(max_side=9), st.integers(1, 20), st.randoms(use_true_random=False))
def test_the_slot_plan_holds_exactly_the_keys_each_step_sees(config, window, rng):
    # passes of `window` steps as parallel decoding runs them: every key of a pass written first
    # (steps past the end included), then each step of it reads; the next pass starts anywhere
    # after the first step of this one
    layout = make_layout(config)
    plan = slot_plan(layout, window)
    dense = layout.dense_mask(config)  # (Lp, Lp): the pattern's definition
    internal = layout.gen_to_internal_list
    L = config.seq_len
    held = [None] * plan.slots  # the generation step whose key each slot holds
    k = 0
    while k < L:
        for m in range(k, k + window):
            held[plan.slot_of[m]] = m
        for m in range(k, min(k + window, L)):
            g, n = plan.group_of[m], plan.count[m]
            seen = {held[s] for s in range(plan.slots) if plan.rank[g][s] < n}
            want = {j for j in range(m + 1) if dense[internal[m], internal[j]]}
            assert seen == want, f"step {m} of the pass from {k}"
        k += rng.randint(1, window)
    assert plan.slots <= L + window - 1


@settings(max_examples=40, deadline=None)
@given(model_configs(max_side=6), st.sampled_from([0.0, 0.6, 1.0]), st.integers(1, 3), st.integers(0, 2**64 - 1),
       st.booleans())
def test_static_decoding_draws_the_eager_decoders_images(config, temperature, n, seed, primed):
    # float64: the two attend over the same keys with sums in another order, and in float64
    # no draw lies near enough a tie for that to flip it
    config = decodable(config)
    torch.manual_seed(0)
    model = ImageTransformer(config).double().eval()
    x, labels, source = model_inputs(config, batch=n, seed=3)
    mask = None
    if primed:
        mask = torch.zeros_like(x, dtype=torch.bool)
        mask[:, : max(1, config.image_size[0] // 2)] = True
    kw = dict(labels=labels, source=source, temperature=temperature, seed=seed, prime=x if primed else None,
              prime_mask=mask, first_index=5)
    with torch.inference_mode():
        eager = decoding.generate(model, n, static=False, **kw)
        fixed = decoding.generate(model, n, static=True, **kw)
    assert torch.equal(eager, fixed)


@settings(max_examples=30, deadline=None)
@given(model_configs(max_side=6), st.integers(1, 40), st.sampled_from([0.0, 1.0]), st.integers(1, 2),
       st.sampled_from(["above", "zeros", "random"]))
def test_static_parallel_passes_draw_the_sequential_images(config, window, temperature, n, guess):
    # float64, where a W-row pass rounds no draw across a tie; passes cross block boundaries and
    # the image's end, and go back to any position of the last pass
    config = decodable(config)
    torch.manual_seed(2)
    model = ImageTransformer(config).double().eval()
    _, labels, source = model_inputs(config, batch=n, seed=5)
    kw = dict(labels=labels, source=source, temperature=temperature, seed=8)
    with torch.inference_mode():
        sequential = decoding.generate(model, n, static=False, **kw)
        parallel = decoding.generate(model, n, static=True, decode="parallel", window=window, first_guess=guess, **kw)
    assert torch.equal(sequential, parallel)


@settings(max_examples=6, deadline=None)
@given(model_configs(max_side=5), st.sampled_from([0.0, 1.0]))
def test_the_compiled_step_is_one_graph_for_every_step_and_seed(config, temperature):
    config = decodable(config)
    torch.manual_seed(1)
    model = ImageTransformer(config).eval()
    _, labels, source = model_inputs(config, batch=2, seed=4)
    torch._dynamo.reset()
    try:
        with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):
            for seed in (3, 2**63 + 7):  # a new seed is new buffer contents, not a new graph
                eager = StaticDecoder(model, 2, labels, source, temperature, seed)
                compiled_from = StaticDecoder(model, 2, labels, source, temperature, seed)
                run = torch.compile(compiled_from, fullgraph=True, backend="aot_eager")
                for k in range(config.seq_len):
                    eager.set_step(k)
                    compiled_from.set_step(k)
                    assert torch.equal(eager(), run()), f"step {k}"
            torch._dynamo.reset()  # a parallel pass: another graph, one for every pass
            window = 3
            eager = StaticDecoder(model, 2, labels, source, window=window, draws=False)
            compiled_from = StaticDecoder(model, 2, labels, source, window=window, draws=False)
            run = torch.compile(compiled_from, fullgraph=True, backend="aot_eager")
            for k in range(0, config.seq_len, 2):
                values = torch.randint(0, 256, eager.inputs.shape)
                for dec in (eager, compiled_from):
                    dec.inputs.copy_(values)
                    dec.set_step(k)
                # (compiled, rotary takes relative.rotate, eager the in-place kernel: the last bits)
                torch.testing.assert_close(run(), eager(), msg=lambda m: f"the pass from step {k}: {m}")
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("attention,output,tiling,geometry", CASES, ids=[f"{a}-{o}-{t}" for a, o, t, _ in CASES])
def test_static_samples_follow_the_models_conditionals(attention, output, tiling, geometry):
    model = calibrated_model(attention, output, geometry)
    images = model.sample(IMAGES, generator=torch.Generator().manual_seed(13), static=True)
    assert calibration_failures(pit_of_samples(model, images, 1.0, seed=14)) == []


def test_what_static_decoding_does_not_take_is_named():
    geometry = CASES[0][3]
    base = calibrated_model("full", "categorical", geometry).config
    logits = ImageTransformer(dataclasses.replace(base, relative="logits"))
    assert static_problem(logits) == "relative logits"
    with pytest.raises(ValueError, match="relative logits"):
        logits.sample(1, seed=1, static=True)
    with pytest.raises(ValueError, match="static decoding"):
        StaticDecoder(logits, 1)
    assert static_problem(ImageTransformer(base), restricted=True).startswith("restricted draws")


def test_static_and_compile_resolve_as_documented():
    model = ImageTransformer(calibrated_model("full", "categorical", CASES[0][3]).config)
    assert decoding.static_decoding(model) == (False, False)  # CPU: the eager decoder
    assert decoding.static_decoding(model, static=True) == (True, False)
    assert decoding.static_decoding(model, compile=True) == (True, True)  # compile asks for the static step
    assert decoding.static_decoding(model, compile=False) == (False, False)
    assert decoding.static_decoding(model, device="cuda") == (True, False)  # no GPU here: no graph
    assert decoding.static_decoding(model, device="cuda", compile=False) == (True, False)
    with pytest.raises(ValueError, match="needs static"):
        decoding.static_decoding(model, static=False, compile=True)
    logits = ImageTransformer(dataclasses.replace(model.config, relative="logits"))
    assert decoding.static_decoding(logits, device="cuda") == (False, False)
    with pytest.raises(ValueError, match="compiled decoding does not take relative logits"):
        decoding.static_decoding(logits, compile=True)


def test_on_the_cpu_sampling_takes_the_eager_decoder_unless_asked(monkeypatch):
    model = ImageTransformer(calibrated_model("full", "categorical", CASES[0][3]).config).double()
    built = []
    original = StaticDecoder.__init__

    def record(self, *args, **kwargs):
        built.append(kwargs.get("draws", True))
        original(self, *args, **kwargs)

    monkeypatch.setattr(StaticDecoder, "__init__", record)
    a = model.sample(2, seed=4)
    assert not built
    b = model.sample(2, seed=4, static=True)
    assert built == [True] and torch.equal(a, b)
    # "auto" is parallel only on the fused C step (exact there): with the static step, sequential
    bf16 = decoding.for_decoding(model, torch.bfloat16, 1)
    assert decoding.resolve_decode(bf16, "auto", 1) == ("parallel" if native.applies(bf16) else "sequential")
    bf16.sample(1, seed=4, static=True, decode="auto")
    bf16.sample(1, seed=4, static=True, decode="parallel", window=3)
    assert built == [True, True, False]
