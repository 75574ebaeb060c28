"""Discretized mixture of logistics (DMOL; PixelCNN++, Salimans et al. 2017): an output likelihood.

Per pixel the model emits P = M * (1 + 2*C + K) numbers, K = C*(C-1)//2, laid out along the last
dim as

    [M mixture logits | C*M means | C*M log-scales | K*M coupling coefficients]

each group channel-major, viewed as (C or K, M). Log-scales are clamped at >= -7, coefficients
pass through tanh. All channels of a pixel share the mixture component,

    p(x) = sum_m pi_m prod_c p_m(x_c | x_<c),

and the mean of channel c is shifted by the actual values of the channels before it, scaled to
[-1, 1] (v / 127.5 - 1): mu_c = mean_c + sum_{c' < c} coeff_{c(c-1)/2 + c'} * x_c', which for RGB is
mu_g += c0 * x_r, mu_b += c1 * x_r + c2 * x_g.

Value v in [0, 255] is the bin [v - 1/2, v + 1/2] / 127.5 - 1 of the logistic (centre v/127.5 - 1,
half-width 1/255), except that the end bins are open: v = 0 takes all the mass below, v = 255 all
the mass above.

Everything is computed in float32 whatever the dtype of the parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imagetx.model.sampling import check_temperature, restrict, sample_softmax

MIN_LOG_SCALE = -7.0
_MIN_WIDTH = 1e-30  # floor of the bin width in logistic units; only huge scales (log-scale > 64) hit it


def dmol_num_params(channels: int, num_mixtures: int) -> int:
    """Numbers per pixel: per mixture a logit, C means, C log-scales and C*(C-1)/2 coefficients."""
    if channels < 1 or num_mixtures < 1:
        raise ValueError(f"channels and num_mixtures must be >= 1, got {channels} and {num_mixtures}")
    return num_mixtures * (1 + 2 * channels + channels * (channels - 1) // 2)


def _unpack(
    params: torch.Tensor, channels: int, num_mixtures: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """params (..., P) -> float32 log mixture weights (..., M), means and log-scales (..., C, M),
    tanh coefficients (..., K, M)."""
    expected = dmol_num_params(channels, num_mixtures)
    if params.shape[-1] != expected:
        raise ValueError(
            f"expected {expected} DMOL parameters per pixel (channels={channels}, "
            f"num_mixtures={num_mixtures}), got a last dim of {params.shape[-1]}"
        )
    c, m = channels, num_mixtures
    k = c * (c - 1) // 2
    logits, means, log_scales, coeffs = params.float().split([m, c * m, c * m, k * m], dim=-1)
    log_weights = torch.log_softmax(logits, dim=-1)
    means = means.unflatten(-1, (c, m))  # (..., C, M)
    log_scales = log_scales.unflatten(-1, (c, m)).clamp(min=MIN_LOG_SCALE)  # (..., C, M)
    coeffs = torch.tanh(coeffs.unflatten(-1, (k, m)))  # (..., K, M)
    return log_weights, means, log_scales, coeffs


def _check_x(x: torch.Tensor, params: torch.Tensor, channels: int) -> None:
    if x.shape != params.shape[:-1] + (channels,):
        raise ValueError(
            f"x must have shape {tuple(params.shape[:-1]) + (channels,)} to match params "
            f"{tuple(params.shape)}, got {tuple(x.shape)}"
        )
    if x.dtype.is_floating_point or x.dtype.is_complex:
        raise ValueError(f"x must hold integer values in [0, 255], got dtype {x.dtype}")


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Values in [0, 255] (any dtype) -> float32 in [-1, 1]; the one place this mapping is
    written (the likelihood, the sampler and the model's DMOL inputs use it)."""
    return x.float() / 127.5 - 1.0


def _coupled_mean(means: torch.Tensor, coeffs: torch.Tensor, x_scaled: torch.Tensor, c: int) -> torch.Tensor:
    """Mean of channel c given the scaled values x_scaled (..., C) of the channels before it -> (..., M)."""
    mean = means[..., c, :]
    first = c * (c - 1) // 2  # coefficients of channel c are stored after those of channels < c
    for prev in range(c):
        mean = mean + coeffs[..., first + prev, :] * x_scaled[..., prev, None]
    return mean


def _edges(v: torch.Tensor) -> torch.Tensor:
    """Lower edge of the bin of value v (long), float32: (v - 1/2) / 127.5 - 1.

    The upper edge of v is _edges(v + 1); v + 0.5 and (v + 1) - 0.5 are exact, so every path that
    computes an edge gets the same float, adjacent bins share it and the 256 bins telescope to 1.
    """
    return to_unit(v.float() - 0.5)


def _bin_log_prob(t_lo: torch.Tensor, t_hi: torch.Tensor, open_lo: torch.Tensor, open_hi: torch.Tensor) -> torch.Tensor:
    """Log-probability of a logistic bin from its edges in standard units, t = (edge - mean) / scale.

    open_lo / open_hi mark the end bins 0 / 255, which extend to -inf / +inf. All tensors broadcast.
    """
    # sigmoid(a) - sigmoid(b) = sigmoid(a) * sigmoid(-b) * (1 - exp(b - a)): each factor keeps full
    # relative precision in log space, so unlike log(cdf_plus - cdf_min) with PixelCNN++'s
    # pdf-at-the-centre fallback this is exact in the tails and for sharp components too (that
    # fallback misjudges sub-1e-5 bins by up to ~8x at log-scale -7, which breaks sum-to-one).
    log_below_hi = F.logsigmoid(t_hi)  # log P(X < upper edge)
    log_above_lo = F.logsigmoid(-t_lo)  # log P(X > lower edge)
    # log(1 - exp(-d)), d = bin width in logistic units. For large d it rounds to 0 with an absolute
    # error < 6e-8, which a sum of log-probabilities absorbs; the floor keeps huge scales finite.
    log_width = torch.log(-torch.expm1(-(t_hi - t_lo).clamp(min=_MIN_WIDTH)))
    middle = log_below_hi + log_above_lo + log_width
    return torch.where(open_lo, log_below_hi, torch.where(open_hi, log_above_lo, middle))


def _value_table(mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of all 256 values under logistics with mean, log_scale (...) -> (..., 256)."""
    values = torch.arange(257, device=mean.device)
    t = (_edges(values) - mean.unsqueeze(-1)) * torch.exp(-log_scale).unsqueeze(-1)  # (..., 257)
    return _bin_log_prob(t[..., :-1], t[..., 1:], values[:-1] == 0, values[:-1] == 255)


def _value_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Log-probability of value x (long, in [0, 255]) under logistics with mean, log_scale; broadcasts."""
    inv_scale = torch.exp(-log_scale)
    t_lo = (_edges(x) - mean) * inv_scale
    t_hi = (_edges(x + 1) - mean) * inv_scale
    return _bin_log_prob(t_lo, t_hi, x == 0, x == 255)


def _conditional(log_w: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Mixture of per-component value log-probs table (..., M, 256) with unnormalized log weights
    log_w (..., M) -> normalized log-probs (..., 256)."""
    # Normalize the weights before mixing: the log-likelihoods of earlier channels can reach -1e4,
    # where float32 cannot resolve the 1e-6 differences that sum-to-one needs.
    log_w = torch.log_softmax(log_w, dim=-1)
    return torch.logsumexp(log_w.unsqueeze(-1) + table, dim=-2)  # (..., 256)


def dmol_nll(params: torch.Tensor, x: torch.Tensor, channels: int, num_mixtures: int) -> torch.Tensor:
    """Negative log-likelihood in nats of each pixel, summed over its channels.

    params: float (..., P); x: long (..., C) in [0, 255] (not range-checked: this is the training
    hot path) -> float32 (...). Differentiable with respect to params.
    """
    _check_x(x, params, channels)
    x = x.long()
    log_weights, means, log_scales, coeffs = _unpack(params, channels, num_mixtures)
    x_scaled = to_unit(x)
    mu = torch.stack([_coupled_mean(means, coeffs, x_scaled, c) for c in range(channels)], dim=-2)  # (..., C, M)
    log_p = _value_log_prob(x.unsqueeze(-1), mu, log_scales)  # (..., C, M)
    return -torch.logsumexp(log_weights + log_p.sum(dim=-2), dim=-1)


def dmol_log_probs(params: torch.Tensor, x: torch.Tensor, channels: int, num_mixtures: int) -> torch.Tensor:
    """Exact conditional log-probabilities of every value of every channel given the earlier ones.

    params: float (..., P); x: long (..., C) in [0, 255] -> float32 (..., C, 256), where
    out[..., c, v] = log p(x_c = v | x_<c) with x_<c taken from x (x_c and later are ignored).
    Because the mixture component is shared by all channels of a pixel, component m weighs in on
    channel c with pi_m * prod_{c' < c} p_m(x_c' | x_<c'), not with pi_m alone.
    """
    _check_x(x, params, channels)
    x = x.long()
    log_weights, means, log_scales, coeffs = _unpack(params, channels, num_mixtures)
    x_scaled = to_unit(x)
    mu = torch.stack([_coupled_mean(means, coeffs, x_scaled, c) for c in range(channels)], dim=-2)  # (..., C, M)
    table = _value_table(mu, log_scales)  # (..., C, M, 256)
    index = x[..., None, None].expand(*mu.shape, 1)  # (..., C, M, 1)
    at_x = table.gather(-1, index).squeeze(-1)  # (..., C, M)
    # Exclusive cumulative sum over channels: each component's log-likelihood of x_<c.
    prefix = torch.cat([torch.zeros_like(at_x[..., :1, :]), at_x[..., :-1, :].cumsum(dim=-2)], dim=-2)
    return _conditional(log_weights.unsqueeze(-2) + prefix, table)  # (..., C, 256)


@torch.no_grad()
def dmol_sample(
    params: torch.Tensor,
    channels: int,
    num_mixtures: int,
    temperature: float = 1.0,
    gumbel: torch.Tensor | None = None,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Draw one pixel per parameter vector, channel by channel from the exact conditionals.

    params: float (..., P) -> long (..., C) in [0, 255]. Channel c is drawn from
    dmol_log_probs(params, x)[..., c, :] / temperature evaluated on the channels drawn before it,
    by sample_softmax with its own noise gumbel[..., c, :]: gumbel float32 (..., C, 256) standard
    Gumbel noise (model/noise.py), not needed at temperature 0, which takes the argmax of each
    conditional. A deterministic function of params and gumbel.
    bounds: optional (lo, hi), long (..., C) each: channel c is drawn from its conditional
    restricted to [lo[..., c], hi[..., c]] (see restrict).
    """
    check_temperature(temperature)
    lead = params.shape[:-1]
    log_weights, means, log_scales, coeffs = _unpack(params.reshape(-1, params.shape[-1]), channels, num_mixtures)
    n, m = log_weights.shape
    x = torch.zeros(n, channels, dtype=torch.long, device=params.device)
    x_scaled = torch.zeros(n, channels, device=params.device)
    prefix = torch.zeros_like(log_weights)  # (N, M) log-likelihood of the drawn channels per component
    if bounds is not None:
        lo, hi = (b.reshape(n, channels) for b in bounds)
    if gumbel is not None:
        gumbel = gumbel.reshape(n, channels, -1)  # (N, C, 256)
    for c in range(channels):
        mu = _coupled_mean(means, coeffs, x_scaled, c)  # (N, M)
        table = _value_table(mu, log_scales[:, c])  # (N, M, 256)
        log_p = _conditional(log_weights + prefix, table)  # (N, 256)
        if bounds is not None:
            log_p = restrict(log_p, lo[:, c], hi[:, c])
        v = sample_softmax(log_p, temperature, None if gumbel is None else gumbel[:, c])  # (N,)
        x[:, c] = v
        x_scaled[:, c] = to_unit(v)
        prefix = prefix + table.gather(-1, v[:, None, None].expand(n, m, 1)).squeeze(-1)
    return x.reshape(*lead, channels)
