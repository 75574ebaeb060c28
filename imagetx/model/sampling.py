"""Drawing values from the model's conditionals, for both outputs: the temperature check, the
restriction of a distribution to a range of values (model.consistent, superres --consistent)
and the one temperature sampler (Gumbel-max), which the categorical logits and each DMOL
channel's conditional (dmol.dmol_sample) go through."""

from __future__ import annotations

import math

import torch


def check_temperature(temperature) -> None:
    """Raise ValueError unless temperature is a finite number >= 0 (0 = greedy)."""
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")


def restrict(log_p: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Log-probabilities float (N, 256) with every value outside [lo, hi] (long (N,) each) set to
    -inf: sampling from the result draws from the distribution conditioned on the value lying in
    the range (sample_softmax renormalises). A row with lo > hi has no value left: it is all
    -inf, and the caller that can know why says so (decoding.generate checks once per call;
    reading the flag back here would be a host sync in every training step of a model.consistent
    model)."""
    values = torch.arange(log_p.shape[-1], device=log_p.device)
    inside = (values >= lo[:, None]) & (values <= hi[:, None])
    return log_p.masked_fill(~inside, float("-inf"))


def sample_softmax(log_p: torch.Tensor, temperature: float, gumbel: torch.Tensor | None = None) -> torch.Tensor:
    """Unnormalized log-probabilities float (N, K) -> long (N,) drawn from softmax(log_p /
    temperature) by the Gumbel-max trick, argmax(log_p / temperature + gumbel) with gumbel float32
    (N, K) standard Gumbel noise (model/noise.py); argmax of log_p at temperature 0, where gumbel
    is not needed. -inf values are never drawn. The one temperature sampler: the categorical
    output's logits and each DMOL channel's conditional go through it.

    The sample is a deterministic function of log_p and the noise: with the noise fixed per
    sub-pixel, an image does not depend on what else is drawn with it."""
    if temperature == 0:
        return log_p.argmax(dim=-1)
    if gumbel is None or gumbel.shape != log_p.shape:
        raise ValueError(f"sampling at temperature {temperature} needs Gumbel noise of shape {tuple(log_p.shape)}, "
                         f"got {None if gumbel is None else tuple(gumbel.shape)}")
    # shifted so the largest is 0 before dividing: a tiny temperature then sends the others to
    # -inf (greedy in the limit) instead of overflowing every entry to inf
    shifted = log_p - log_p.max(dim=-1, keepdim=True).values
    return (shifted / temperature + gumbel).argmax(dim=-1)
