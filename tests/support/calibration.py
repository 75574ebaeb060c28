"""Models trained until their conditionals are calibrated, and the probability integral
transform of their samples (tests/model/test_calibration.py, tests/model/test_parallel_decoding.py)."""

from __future__ import annotations

import math

import torch

from imagetx import ImageTransformer, ModelConfig
from support.properties import conditional_log_probs


IMAGES = 500  # per case: 24,000 sub-pixels of 4x4 RGB images, 500 per generation step


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


# The samples are drawn with fixed seeds, so each case passes or fails the same way every run.
SIGNIFICANCE = 0.001


def ks_critical(n: int, tests: int = 1) -> float:
    """Kolmogorov-Smirnov critical distance for n values at SIGNIFICANCE / tests (Bonferroni)."""
    return math.sqrt(-math.log(SIGNIFICANCE / tests / 2) / 2) / math.sqrt(n)


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
