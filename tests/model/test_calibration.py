"""Samples follow the model's own conditionals: a statistical test of the samplers.

For images drawn by `model.sample`, the model's teacher-forced conditionals (one forward pass on
the finished images, the distributions that define its likelihood) give every sampled sub-pixel
v a randomized probability integral transform u = F(v - 1) + U * p(v), U uniform on [0, 1). If
each value was drawn from exactly that conditional, the u of all sub-pixels of all images are
independent and uniform on [0, 1) (Rosenblatt's transform), whatever the distributions are. A
Kolmogorov-Smirnov test checks that, for every attention pattern, both outputs, tilings that are
exact and padded, cached and reference sampling, and a temperature other than 1.

A sampler that reads a different context than the likelihood (the local 2D self-leak of exact
tilings did) or draws at the wrong temperature fails it: the last test shows the statistic
rejects samples judged against slightly wrong conditionals.
"""

from __future__ import annotations


import pytest
import torch

from support.calibration import (
    CASES, IMAGES, calibrated_model, calibration_failures, ks_critical, ks_statistic, pit_of_samples,
)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "reference"])
@pytest.mark.parametrize("attention,output,tiling,geometry", CASES, ids=[f"{a}-{o}-{t}" for a, o, t, _ in CASES])
def test_samples_follow_the_models_conditionals(attention, output, tiling, geometry, use_cache):
    model = calibrated_model(attention, output, geometry)
    images = model.sample(IMAGES, generator=torch.Generator().manual_seed(11), use_cache=use_cache)
    assert calibration_failures(pit_of_samples(model, images, 1.0, seed=12)) == []


@pytest.mark.parametrize("output", ["categorical", "dmol"])
def test_samples_at_a_temperature_follow_the_tempered_conditionals(output):
    model = calibrated_model("local2d", output, CASES[4 if output == "categorical" else 6][3])
    images = model.sample(IMAGES, temperature=0.7, generator=torch.Generator().manual_seed(13))
    assert calibration_failures(pit_of_samples(model, images, 0.7, seed=14)) == []


# dmol at 0.5 gives a statistic of 1.6 critical distances on average over seeds, too close to the
# 1.5 asked for to hold for any seed; at 0.4 it is 1.9 to 2.3
@pytest.mark.parametrize("output,wrong_temperature", [("categorical", 0.8), ("dmol", 0.4)])
def test_the_test_rejects_samples_from_other_conditionals(output, wrong_temperature):
    # the same samples judged against conditionals at another temperature than they were drawn at
    model = calibrated_model("local2d", output, CASES[4 if output == "categorical" else 6][3])
    images = model.sample(IMAGES, generator=torch.Generator().manual_seed(11))
    u = pit_of_samples(model, images, wrong_temperature, seed=12)
    assert ks_statistic(u.flatten()) > 1.5 * ks_critical(u.numel())
    assert calibration_failures(u)
