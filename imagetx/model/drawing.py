"""From one position's output to its value, for both outputs: the categorical logits through the
one Gumbel-max sampler, the DMOL parameters channel by channel (dmol.dmol_sample). Both cached
decoders draw through it (decoding.IncrementalDecoder's loop in decoding.generate, and
static.StaticDecoder inside its step)."""

from __future__ import annotations

import torch

from imagetx.model import dmol, sampling


def draw(out: torch.Tensor, config, temperature: float, gumbel=None, bounds=None) -> torch.Tensor:
    """One position's output -> its value(s): long (B,) (categorical) or (B, C) (DMOL).
    gumbel: float32 (B, 1, 256) (categorical) or (B, C, 256) (DMOL), the position's own standard
    Gumbel noise (noise.value_gumbel at its step); not needed at temperature 0. The value is a
    deterministic function of out and gumbel. bounds: optional (lo, hi) of the value(s)' shape:
    draw from the distribution restricted to [lo, hi] and renormalised (see sampling.restrict)."""
    if config.output == "dmol":
        return dmol.dmol_sample(out.float(), config.channels, config.num_mixtures, temperature, gumbel, bounds)
    log_p = out.float() if bounds is None else sampling.restrict(out.float(), *bounds)
    return sampling.sample_softmax(log_p, temperature, None if gumbel is None else gumbel[:, 0])
