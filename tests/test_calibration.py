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

import math

import pytest
import torch

from imagetx import ImageTransformer, ModelConfig
from model_properties import conditional_log_probs

IMAGES = 500  # per case: 24,000 sub-pixels of 4x4 RGB images, 500 per generation step

# The samples are drawn with fixed seeds, so each case passes or fails the same way every run.
SIGNIFICANCE = 0.001


def ks_critical(n: int, tests: int = 1) -> float:
    """Kolmogorov-Smirnov critical distance for n values at SIGNIFICANCE / tests (Bonferroni)."""
    return math.sqrt(-math.log(SIGNIFICANCE / tests / 2) / 2) / math.sqrt(n)

# (attention, output, tiling, geometry): 4x4 RGB images; "exact" tilings divide the grid into two
# or more blocks per row, "padded" ones leave a partial block at an edge
CASES = [
    ("local1d", "categorical", "exact", dict(image_size=(4, 4), block_length=12)),
    ("local1d", "categorical", "padded", dict(image_size=(4, 4), block_length=10)),
    ("local1d", "dmol", "exact", dict(image_size=(4, 4), block_length=4)),
    ("local1d", "dmol", "padded", dict(image_size=(4, 4), block_length=5)),
    ("local2d", "categorical", "exact", dict(image_size=(4, 4), query_shape=(2, 6), memory_flange=(1, 3))),
    ("local2d", "categorical", "padded", dict(image_size=(5, 4), query_shape=(2, 5), memory_flange=(1, 3))),
    ("local2d", "dmol", "exact", dict(image_size=(4, 4), query_shape=(2, 2), memory_flange=(1, 1))),
    ("local2d", "dmol", "padded", dict(image_size=(5, 5), query_shape=(2, 3), memory_flange=(1, 2))),
    ("full", "categorical", "whole", dict(image_size=(4, 4))),
    ("full", "dmol", "whole", dict(image_size=(4, 4))),
]


def calibrated_model(attention, output, geometry, seed=0):
    """A small random model with sharp conditionals (its head scaled up), so that reading the wrong
    context or the wrong temperature moves the distributions far from what was sampled."""
    torch.manual_seed(seed)
    config = ModelConfig(attention=attention, output=output, channels=3, n_layers=2, d_model=32, n_heads=2,
                         d_ff=64, dropout=0.0, num_mixtures=3, **geometry)
    model = ImageTransformer(config).eval()
    with torch.no_grad():
        model.head.weight.mul_(8.0)
        model.head.bias.mul_(8.0)
    return model


def randomized_pit(log_p: torch.Tensor, values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """log_p float (..., 256) conditional log-probabilities, values long (...) -> float64 (N,)."""
    p = log_p.double().exp().reshape(-1, 256)
    p = p / p.sum(-1, keepdim=True)  # float32 log-probabilities sum to 1 within ~1e-6
    v = values.reshape(-1, 1)
    below = p.cumsum(-1).gather(1, v) - p.gather(1, v)
    u = below + torch.rand(v.shape, generator=generator, dtype=torch.float64) * p.gather(1, v)
    return u.flatten().clamp(0.0, 1.0)


def ks_statistic(u: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance between the empirical distribution of u and U(0, 1)."""
    u, _ = u.sort()
    n = u.numel()
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - u, u - (i - 1) / n).max())


def pit_of_samples(model, images, temperature, seed) -> torch.Tensor:
    """The randomized PIT of every sub-pixel of `images` under the model's own conditionals at
    `temperature` (teacher-forced: one forward pass on the images): float64 (N, H*W*C)."""
    with torch.inference_mode():
        log_p = conditional_log_probs(model, model(images), images)  # (N, H, W, C, 256)
    tempered = torch.log_softmax(log_p.double() / temperature, dim=-1)
    u = randomized_pit(tempered, images.long(), torch.Generator().manual_seed(seed))
    return u.view(images.shape[0], -1)


def calibration_failures(u: torch.Tensor) -> list[str]:
    """u (N, D): what is not uniform, over all sub-pixels together and (Bonferroni-corrected)
    per sub-pixel position, where an error confined to a few positions stands out."""
    failures = []
    d, critical = ks_statistic(u.flatten()), ks_critical(u.numel())
    if d >= critical:
        failures.append(f"all {u.numel()} sub-pixels: KS {d:.4f} >= {critical:.4f}")
    critical = ks_critical(u.shape[0], tests=u.shape[1])
    for j in range(u.shape[1]):
        d = ks_statistic(u[:, j])
        if d >= critical:
            failures.append(f"sub-pixel {j}: KS {d:.4f} >= {critical:.4f}")
    return failures


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
