"""Sampling noise as a pure function of where it is used: counter-based, no generator state.

Every random number the samplers use is a hash of (seed, image, generation step, channel, value):
image is the image's global index (image i of a batch that starts at first_index is image
first_index + i), so an image's samples do not depend on the batch it was drawn in, on how many
processes shared the work, or on what was drawn before it. A fixed noise per sub-pixel also makes
the sample a deterministic function of the noise and the earlier sub-pixels, which is what
parallel (Jacobi) decoding needs to reproduce sequential sampling exactly.

The hash is splitmix64's finalizer (Steele, Lea and Flood, OOPSLA 2014) chained over the
counters, in int64 tensor ops on the counters' own device: multiplications wrap around modulo
2^64 on every torch backend (two's complement), right shifts are made logical by masking off the
sign bits, so the bits are the same on CPU and GPU. No torch.Generator is involved: none needs to
exist on the device (fake CUDA tensors cannot have one), and none is advanced.

Uniforms take the top 52 bits, (2k + 1) / 2^53: exactly representable and strictly inside (0, 1).
Gumbel noise -log(-log(u)) is computed in float64 and rounded to float32, so the last-bit
differences of log between devices (or between torch's vectorized and scalar loops) almost never
survive the rounding.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: splitmix64's increment
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _signed(v: int) -> int:
    """An unsigned 64-bit value as the int64 with the same bits (what tensor ops take)."""
    v &= _MASK64
    return v - (1 << 64) if v >> 63 else v


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits: torch's >> is arithmetic, so mask the copied sign bits."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 tensors: a bijection of 64-bit values."""
    z = (z ^ _shr(z, 30)) * _signed(_M1)
    z = (z ^ _shr(z, 27)) * _signed(_M2)
    return z ^ _shr(z, 31)


def mix_int(v: int) -> int:
    """The same finalizer on a Python int (unsigned 64-bit in and out): the reference the tests
    hold the tensor version to, and the seed's own mixing."""
    v &= _MASK64
    v = ((v ^ (v >> 30)) * _M1) & _MASK64
    v = ((v ^ (v >> 27)) * _M2) & _MASK64
    return v ^ (v >> 31)


def hash64(seed: int, *counters: torch.Tensor) -> torch.Tensor:
    """seed: int in [0, 2^64); counters: long tensors (at least one, broadcast together) ->
    int64 of their broadcast shape, on their device: the bits of a hash of (seed, counters...),
    chained h <- mix(h + GOLDEN * (c + 1)), so every counter and its position matter."""
    return chain(_signed(mix_int(seed)), *counters)


def chain(h: int | torch.Tensor, *counters: torch.Tensor) -> torch.Tensor:
    """hash64 carried on from the hash h (the seed's, or a tensor of hashes of the counters
    before these): chain(chain(h, a), b) == chain(h, a, b). With h a tensor, nothing about the
    seed is a Python constant, so a captured decoding step serves every seed."""
    for c in counters:
        h = _mix((c.long() + 1) * _signed(_GOLDEN) + h)
    return h


def to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """int64 bits -> float64 (2k + 1) / 2^53 of their top 52 bits k: exact, in [2^-53, 1 - 2^-53]."""
    return (2 * _shr(bits, 12) + 1).double() * 2.0**-53


def uniform(seed: int, *counters: torch.Tensor) -> torch.Tensor:
    """-> float64 in (0, 1), both ends excluded, of the counters' broadcast shape (see hash64)."""
    return to_uniform(hash64(seed, *counters))


def gumbel(seed: int, *counters: torch.Tensor) -> torch.Tensor:
    """-> float32 standard Gumbel noise -log(-log(u)) of the counters' broadcast shape, in
    [-3.61, 36.74] (the ends of uniform's range): the tails beyond have probability < 1e-15."""
    return to_gumbel(hash64(seed, *counters))


def to_gumbel(bits: torch.Tensor) -> torch.Tensor:
    """int64 bits -> float32 -log(-log(u)) of their uniform u (to_uniform), computed in float64."""
    return to_uniform(bits).log().neg().log().neg().float()


def value_gumbel(seed: int, images: torch.Tensor, steps: torch.Tensor, channels: int, values: int = 256) -> torch.Tensor:
    """The Gumbel noise of every value of every channel at some generation steps of some images.

    images: long (B,) global image indices; steps: long (S,) generation steps -> float32
    (B, S, channels, values), on images' device; entry [b, s, c, v] is gumbel(seed, images[b],
    steps[s], c, v), whatever else is computed with it.
    """
    device = images.device
    channel = torch.arange(channels, device=device)
    value = torch.arange(values, device=device)
    return gumbel(seed, images[:, None, None, None], steps.to(device)[None, :, None, None],
                  channel[None, None, :, None], value[None, None, None, :])  # (B, S, C, V)


def image_keys(seed: int, images: torch.Tensor) -> torch.Tensor:
    """images: long (B,) global image indices -> int64 (B,), the hash of (seed, image) that
    step_gumbel carries on from: every value drawn for an image depends on the seed only
    through it."""
    return hash64(seed, images)


def value_counters(channels: int, values: int = 256, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The channel and value counters of one step's noise, long (channels, 1) and (1, values):
    made once and handed to step_gumbel, so that a compiled step makes no index range of its own
    (Inductor's CPU code for torch 2.14.1 gets a hash of an arange made in the graph wrong past
    its first 16 elements; one passed in is hashed right)."""
    return (torch.arange(channels, device=device)[:, None], torch.arange(values, device=device)[None, :])


def step_gumbel(keys: torch.Tensor, steps: torch.Tensor, counters: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """keys: image_keys (B,); steps: long (S,) generation steps; counters: value_counters(channels,
    values), all on one device -> float32 (B, S, channels, values), equal to value_gumbel(seed,
    images, steps, channels, values): the noise of some steps from device tensors only, no host
    value."""
    channel, value = counters
    return to_gumbel(chain(keys[:, None, None, None], steps[None, :, None, None], channel[None, None], value[None, None]))


def seed_from(generator: torch.Generator | None = None) -> int:
    """A seed in [0, 2^63) from one draw of `generator` (torch's default CPU generator when None):
    callers that hand a generator to the samplers get their reproducibility that way."""
    device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, 2**63 - 1, (), generator=generator, device=device))
