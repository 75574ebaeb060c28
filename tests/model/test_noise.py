"""The counter-based sampling noise: exact bits, uniform, independent per coordinate."""

from __future__ import annotations

import math

import pytest
import torch

from imagetx.model import noise

N = 1 << 18  # uniforms per statistical check: a mean is then known to within 5 sigma = 0.0028


def reference_hash(seed: int, *counters: int) -> int:
    """hash64 in Python integers modulo 2^64: what the int64 tensor code must reproduce."""
    h = noise.mix_int(seed)
    for c in counters:
        h = noise.mix_int(h + 0x9E3779B97F4A7C15 * (c + 1))
    return h


def test_the_hash_is_splitmix64_bit_for_bit():
    # splitmix64's published first outputs for state 0 (seeding the generator with 0)
    golden, outputs = 0x9E3779B97F4A7C15, [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert [noise.mix_int(golden * (i + 1)) for i in range(3)] == outputs
    state = torch.arange(1, 4) * noise._signed(golden)  # wraps around, as the C code's uint64 does
    assert noise._mix(state).tolist() == [noise._signed(v) for v in outputs]
    # chained over counters, with large seeds and counters whose products overflow int64
    for seed in (0, 1, 2**63 - 1, 2**64 - 1):
        counters = [(0, 0), (7, 3071), (2**40 + 5, 2), (2**62, 2**62 + 1)]
        a = torch.tensor([c[0] for c in counters])
        b = torch.tensor([c[1] for c in counters])
        got = noise.hash64(seed, a, b).tolist()
        assert got == [noise._signed(reference_hash(seed, *c)) for c in counters]


def test_uniforms_lie_strictly_inside_the_unit_interval_and_gumbels_are_finite():
    extremes = noise.to_uniform(torch.tensor([0, -1, 2**63 - 1, -(2**63)]))  # all bits 0, all 1, ...
    assert extremes.min() == 2.0**-53 and extremes.max() == 1 - 2.0**-53
    g = extremes.log().neg().log().neg().float()
    assert torch.isfinite(g).all() and g.min() > -3.7 and g.max() < 37


def test_uniforms_have_the_moments_and_histogram_of_the_uniform_distribution():
    u = noise.uniform(11, torch.arange(N))
    assert u.dtype == torch.float64 and 0 < float(u.min()) and float(u.max()) < 1
    sigma = math.sqrt(1 / 12 / N)
    assert abs(float(u.mean()) - 0.5) < 5 * sigma
    assert abs(float(u.var()) - 1 / 12) < 5 * math.sqrt(1 / 180 / N)  # var of (u - 1/2)^2 is 1/180
    counts = torch.bincount((u * 64).long(), minlength=64).double()
    chi2 = float(((counts - N / 64) ** 2 / (N / 64)).sum())
    assert chi2 < 63 + 5 * math.sqrt(2 * 63)  # 63 degrees of freedom, mean 63, sd 11.2


def test_gumbel_noise_has_the_gumbel_moments():
    g = noise.gumbel(12, torch.arange(N)).double()
    euler = 0.5772156649015329
    assert abs(float(g.mean()) - euler) < 5 * math.sqrt(math.pi**2 / 6 / N)
    assert abs(float(g.var()) - math.pi**2 / 6) < 0.05


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("coordinate", ["seed", "image", "step", "channel", "value", "swapped"])
def test_noise_is_independent_across_each_coordinate(coordinate):
    """Uniforms whose (seed, image, step, channel, value) differ in one coordinate by one (or two
    coordinates swapped) are uncorrelated, and never equal."""
    images = torch.arange(64)[:, None, None, None]
    steps = torch.arange(64)[None, :, None, None]
    channels = torch.arange(3)[None, None, :, None]
    values = torch.arange(22)[None, None, None, :]  # 64 * 64 * 3 * 22 = 270,336 pairs
    base = noise.uniform(5, images, steps, channels, values)
    other = {
        "seed": lambda: noise.uniform(6, images, steps, channels, values),
        "image": lambda: noise.uniform(5, images + 1, steps, channels, values),
        "step": lambda: noise.uniform(5, images, steps + 1, channels, values),
        "channel": lambda: noise.uniform(5, images, steps, channels + 1, values),
        "value": lambda: noise.uniform(5, images, steps, channels, values + 1),
        "swapped": lambda: base.transpose(0, 1),  # [i, k] is image k at step i
    }[coordinate]()
    if coordinate == "swapped":  # the pairs with image != step
        off = (images != steps).expand(base.shape)
        base, other = base[off], other[off]
    assert abs(correlation(base, other)) < 5 / math.sqrt(base.numel())
    assert not bool((base == other).any())


def test_value_gumbel_entries_depend_only_on_their_own_coordinates():
    images, steps = torch.tensor([3, 9, 10, 400]), torch.tensor([0, 5, 6])
    table = noise.value_gumbel(7, images, steps, 3)
    assert table.shape == (4, 3, 3, 256) and table.dtype == torch.float32
    assert torch.equal(noise.value_gumbel(7, images[1:3], steps[2:], 3), table[1:3, 2:])
    assert torch.equal(table[2, 1, 2, 17], noise.gumbel(7, *map(torch.tensor, (10, 5, 2, 17))))


def test_a_seed_from_a_generator_takes_one_draw():
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    seed = noise.seed_from(a)
    assert 0 <= seed < 2**63 and seed == noise.seed_from(b)
    assert noise.seed_from(a) != seed  # the next draw


def test_the_noise_of_steps_held_on_the_device_is_value_gumbels():
    images = torch.tensor([0, 7, 2**40])
    for channels in (1, 3):
        for steps in ([0], [5], [3071], [4, 5, 6, 9]):
            want = noise.value_gumbel(11, images, torch.tensor(steps), channels)
            got = noise.step_gumbel(noise.image_keys(11, images), torch.tensor(steps), noise.value_counters(channels))
            assert torch.equal(got, want)
