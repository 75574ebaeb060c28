"""The discretized mixture of logistics likelihood: normalization, exactness, coupling, sampling."""

import math

import pytest
import torch

from imagetx.model.dmol import dmol_log_probs, dmol_nll, dmol_num_params, dmol_sample
from imagetx.model.noise import value_gumbel

SIZES = [(1, 1), (1, 10), (3, 1), (3, 10)]  # (channels, num_mixtures)


def pack(logits, means, log_scales, coeffs):
    """Per-group tensors (..., M), (..., C, M), (..., C, M), (..., K, M) -> params (..., P)."""
    return torch.cat([logits, means.flatten(-2), log_scales.flatten(-2), coeffs.flatten(-2)], dim=-1)


def noise_for(n, channels, seed):
    """Sampling noise of n pixels: float32 (n, channels, 256), pixel i as image i at step 0."""
    return value_gumbel(seed, torch.arange(n), torch.zeros(1, dtype=torch.long), channels)[:, 0]


def random_params(n, channels, mixtures, generator, extreme=False):
    k = channels * (channels - 1) // 2
    g = generator
    if not extreme:
        return pack(
            torch.randn(n, mixtures, generator=g),
            0.6 * torch.randn(n, channels, mixtures, generator=g),
            -4.0 + 3.5 * torch.rand(n, channels, mixtures, generator=g),  # log-scales in [-4, -0.5]
            torch.randn(n, k, mixtures, generator=g),
        )
    # Sharp components (log-scales at or below the -7 clamp), means far outside [-1, 1] or on
    # bin edges, saturated coefficients, very unequal weights, and a few huge scales.
    log_scales = -9.0 + 3.0 * torch.rand(n, channels, mixtures, generator=g)
    log_scales[: n // 8] = 10.0 + 90.0 * torch.rand(n // 8, channels, mixtures, generator=g)
    means = 30.0 * torch.randn(n, channels, mixtures, generator=g)
    edges = (torch.randint(0, 257, (n, channels, mixtures), generator=g) - 0.5) / 127.5 - 1.0
    means = torch.where(torch.rand(n, channels, mixtures, generator=g) < 0.5, edges, means)
    return pack(
        40.0 * torch.randn(n, mixtures, generator=g),
        means,
        log_scales,
        20.0 * torch.randn(n, k, mixtures, generator=g),
    )


# --- the slow, obviously-correct float64 reference --------------------------------------------


def reference_component_probs(mean, log_scale):
    """One logistic per pixel, mean and log_scale float64 (N,) -> probabilities of the 256 values (N, 256).

    Explicit differences of sigmoids; on the side of the mean where both CDF values are close to 1
    it subtracts survival functions instead, so float64 keeps its precision in the tails.
    """
    scale = torch.exp(log_scale.clamp(min=-7.0))[:, None]
    v = torch.arange(256, dtype=torch.float64)
    lo = (v - 0.5) / 127.5 - 1.0
    hi = (v + 0.5) / 127.5 - 1.0
    cdf = lambda e: torch.sigmoid((e - mean[:, None]) / scale)  # noqa: E731
    survival = lambda e: torch.sigmoid(-(e - mean[:, None]) / scale)  # noqa: E731
    cdf_hi = torch.where(v == 255, 1.0, cdf(hi))
    cdf_lo = torch.where(v == 0, 0.0, cdf(lo))
    surv_hi = torch.where(v == 255, 0.0, survival(hi))
    surv_lo = torch.where(v == 0, 1.0, survival(lo))
    above_mean = lo > mean[:, None]
    return torch.where(above_mean, surv_lo - surv_hi, cdf_hi - cdf_lo)


def reference_conditionals(params, x, channels, mixtures):
    """float64 loops over mixtures and channels -> p(x_c = v | x_<c) as probabilities (N, C, 256)."""
    params = params.double()
    k = channels * (channels - 1) // 2
    n = params.shape[0]
    logits = params[:, :mixtures]
    means = params[:, mixtures : mixtures * (1 + channels)].reshape(n, channels, mixtures)
    log_scales = params[:, mixtures * (1 + channels) : mixtures * (1 + 2 * channels)].reshape(n, channels, mixtures)
    coeffs = torch.tanh(params[:, mixtures * (1 + 2 * channels) :].reshape(n, k, mixtures))
    weights = torch.softmax(logits, dim=-1)
    scaled = x.double() / 127.5 - 1.0
    out = torch.zeros(n, channels, 256, dtype=torch.float64)
    for c in range(channels):
        total = torch.zeros(n, dtype=torch.float64)
        for m in range(mixtures):
            # weight of component m for channel c: pi_m times its probability of the earlier channels
            w = weights[:, m].clone()
            for prev in range(channels):
                mu = means[:, prev, m].clone()
                if prev == 1:
                    mu += coeffs[:, 0, m] * scaled[:, 0]
                if prev == 2:
                    mu += coeffs[:, 1, m] * scaled[:, 0] + coeffs[:, 2, m] * scaled[:, 1]
                probs = reference_component_probs(mu, log_scales[:, prev, m])
                if prev < c:
                    w = w * probs[torch.arange(n), x[:, prev]]
                elif prev == c:
                    out[:, c] += w[:, None] * probs
                    total += w
        out[:, c] /= total[:, None]
    return out


def reference_nll(params, x, channels, mixtures):
    probs = reference_conditionals(params, x, channels, mixtures)
    return -torch.log(probs.gather(-1, x[:, :, None]).squeeze(-1)).sum(-1)


# --- tests ------------------------------------------------------------------------------------


def test_num_params():
    assert dmol_num_params(3, 10) == 100  # 10 * (1 + 3 + 3 + 3)
    assert dmol_num_params(1, 10) == 30
    with pytest.raises(ValueError):
        dmol_num_params(0, 10)
    with pytest.raises(ValueError, match="expected 100"):
        dmol_nll(torch.zeros(4, 99), torch.zeros(4, 3, dtype=torch.long), 3, 10)


@pytest.mark.parametrize("extreme", [False, True], ids=["random", "extreme"])
@pytest.mark.parametrize("channels,mixtures", SIZES)
def test_each_conditional_sums_to_one(channels, mixtures, extreme):
    g = torch.Generator().manual_seed(0)
    params = random_params(512, channels, mixtures, g, extreme)
    x = torch.randint(0, 256, (512, channels), generator=g)
    log_p = dmol_log_probs(params, x, channels, mixtures)
    assert log_p.shape == (512, channels, 256) and log_p.dtype == torch.float32
    assert torch.isfinite(log_p).all()
    total = log_p.double().exp().sum(-1)
    assert (total - 1).abs().max().item() < 1e-5


@pytest.mark.parametrize("extreme", [False, True], ids=["random", "extreme"])
@pytest.mark.parametrize("channels,mixtures", SIZES)
def test_nll_equals_chain_of_conditionals(channels, mixtures, extreme):
    g = torch.Generator().manual_seed(1)
    params = random_params(512, channels, mixtures, g, extreme)
    x = torch.randint(0, 256, (512, channels), generator=g)
    if extreme:  # also the likely values, not only the astronomically unlikely ones
        x[::2] = dmol_sample(params[::2], channels, mixtures, gumbel=noise_for(256, channels, seed=1))
    nll = dmol_nll(params, x, channels, mixtures)
    chained = -dmol_log_probs(params, x, channels, mixtures).gather(-1, x[..., None]).squeeze(-1).sum(-1)
    assert torch.isfinite(nll).all()
    torch.testing.assert_close(nll, chained, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("channels,mixtures", SIZES)
def test_matches_float64_reference(channels, mixtures):
    g = torch.Generator().manual_seed(2)
    params = random_params(256, channels, mixtures, g)
    x = torch.randint(0, 256, (256, channels), generator=g)
    x[::2] = dmol_sample(params[::2], channels, mixtures, gumbel=noise_for(128, channels, seed=2))  # likely values too
    torch.testing.assert_close(
        dmol_nll(params, x, channels, mixtures).double(),
        reference_nll(params, x, channels, mixtures),
        rtol=1e-5,
        atol=1e-4,
    )
    torch.testing.assert_close(
        dmol_log_probs(params, x, channels, mixtures).double().exp(),
        reference_conditionals(params, x, channels, mixtures),
        rtol=1e-4,
        atol=1e-6,
    )


def test_conditional_is_not_a_per_channel_mixture():
    # Two components that disagree about r and about g: seeing r must pick the component for g.
    params = pack(
        torch.zeros(1, 2),
        torch.tensor([[[-0.5, 0.5], [-0.5, 0.5], [0.0, 0.0]]]),
        torch.full((1, 3, 2), -6.0),
        torch.zeros(1, 3, 2),
    )
    for r, expected_g in [(64, 64), (191, 191)]:
        x = torch.tensor([[r, 0, 0]])
        probs = dmol_log_probs(params, x, 3, 2).exp()[0, 1]
        assert probs[expected_g - 3 : expected_g + 4].sum() > 0.99


def test_coupling_moves_the_mean_of_later_channels():
    v = torch.arange(256, dtype=torch.float64)
    for sign in (1.0, -1.0):
        params = pack(
            torch.zeros(1, 1),
            torch.zeros(1, 3, 1),
            torch.full((1, 3, 1), -5.0),
            torch.full((1, 3, 1), sign * 20.0),  # tanh -> sign * 1: mu_g = m_g + x_r, mu_b = m_b + x_r + x_g
        )
        for r, g in [(10, 200), (60, 90), (128, 100), (200, 40), (245, 10)]:
            probs = dmol_log_probs(params, torch.tensor([[r, g, 0]]), 3, 1).double().exp()[0]
            mean_g = (probs[1] * v).sum().item()
            mean_b = (probs[2] * v).sum().item()
            # x_r (scaled) -> mu_g on the same scale: g centred on value r (or its mirror 255 - r)
            assert mean_g == pytest.approx(r if sign > 0 else 255 - r, abs=0.05)
            # mu_b = x_r + x_g = (r + g - 127.5) / 127.5 - 1 on the value scale
            expected_b = r + g - 127.5 if sign > 0 else 255 - (r + g - 127.5)
            if 3 < expected_b < 252:
                assert mean_b == pytest.approx(expected_b, abs=0.05)


def test_sampling_is_reproducible_and_validates_temperature():
    params = random_params(64, 3, 10, torch.Generator().manual_seed(3))
    draw = lambda seed, t=1.0: dmol_sample(params, 3, 10, t, noise_for(64, 3, seed))  # noqa: E731
    a = draw(0)
    assert a.shape == (64, 3) and a.dtype == torch.long and a.min() >= 0 and a.max() <= 255
    assert torch.equal(a, draw(0))
    assert not torch.equal(a, draw(1))
    assert torch.equal(draw(0, 0.7), draw(0, 0.7))
    with pytest.raises(ValueError, match="temperature"):
        draw(0, -0.1)
    with pytest.raises(ValueError, match="temperature"):
        draw(0, float("nan"))


def test_zero_temperature_takes_the_argmax_of_each_conditional():
    g = torch.Generator().manual_seed(4)
    for channels in (1, 3):
        params = random_params(200, channels, 10, g)
        x = dmol_sample(params, channels, 10, temperature=0.0)
        assert torch.equal(x, dmol_log_probs(params, x, channels, 10).argmax(-1))


def total_variation(samples, probs):
    counts = torch.bincount(samples, minlength=256).double()
    return 0.5 * (counts / counts.sum() - probs).abs().sum().item()


def test_sample_frequencies_match_exact_probabilities_gray():
    n = 20000
    params = pack(
        torch.tensor([[0.0, 0.5]]),
        torch.tensor([[[-0.3, 0.4]]]),
        torch.tensor([[[-4.0, -4.5]]]),
        torch.zeros(1, 0, 2),
    )
    probs = dmol_log_probs(params, torch.zeros(1, 1, dtype=torch.long), 1, 2).double().exp()[0, 0]
    x = dmol_sample(params.expand(n, -1), 1, 2, gumbel=noise_for(n, 1, seed=5))
    assert total_variation(x[:, 0], probs) < 0.03
    # temperature T samples softmax(log p / T)
    x = dmol_sample(params.expand(n, -1), 1, 2, temperature=0.5, gumbel=noise_for(n, 1, seed=6))
    assert total_variation(x[:, 0], torch.softmax(2.0 * probs.log(), -1)) < 0.03


def test_sample_frequencies_match_exact_marginals_rgb():
    n = 20000
    params = pack(
        torch.tensor([[0.0, 0.3]]),
        torch.tensor([[[-0.3, 0.4], [0.1, -0.2], [0.0, 0.3]]]),
        torch.tensor([[[-4.0, -4.5], [-4.5, -4.0], [-4.0, -4.0]]]),
        torch.tensor([[[1.0, -1.0], [0.5, 0.5], [-1.0, 1.0]]]),
    )
    x = dmol_sample(params.expand(n, -1), 3, 2, gumbel=noise_for(n, 3, seed=6))
    # Exact marginals by summing the conditionals over the (few) likely earlier values.
    p_r = dmol_log_probs(params, torch.zeros(1, 3, dtype=torch.long), 3, 2).double().exp()[0, 0]  # (256,)
    rs = torch.arange(256)
    p_g_given_r = dmol_log_probs(params.expand(256, -1), torch.stack([rs, 0 * rs, 0 * rs], -1), 3, 2)
    p_rg = p_r[:, None] * p_g_given_r.double().exp()[:, 1]  # (256 r, 256 g)
    likely = (p_rg > 1e-7).nonzero()  # (pairs, 2)
    assert p_rg[p_rg <= 1e-7].sum() < 1e-4
    p_b_given_rg = dmol_log_probs(
        params.expand(len(likely), -1), torch.cat([likely, 0 * likely[:, :1]], -1), 3, 2
    ).double().exp()[:, 2]
    p_b = (p_rg[likely[:, 0], likely[:, 1], None] * p_b_given_rg).sum(0)
    assert total_variation(x[:, 0], p_r) < 0.03
    assert total_variation(x[:, 1], p_rg.sum(0)) < 0.03
    assert total_variation(x[:, 2], p_b / p_b.sum()) < 0.03


def test_uniform_like_component_gives_eight_bits_at_most_per_channel():
    # A huge scale spreads the mass over a range much wider than [-1, 1]: the middle values share
    # a sliver equally, nearly all the mass sits on the two open end bins.
    params = pack(torch.zeros(1, 1), torch.zeros(1, 1, 1), torch.full((1, 1, 1), 12.0), torch.zeros(1, 0, 1))
    probs = dmol_log_probs(params, torch.zeros(1, 1, dtype=torch.long), 1, 1).double().exp()[0, 0]
    assert probs[0].item() == pytest.approx(0.5, abs=1e-5) and probs[255].item() == pytest.approx(0.5, abs=1e-5)
    middle = probs[1:255]
    assert torch.allclose(middle, middle.mean().expand(254), rtol=1e-3)
    assert middle.mean().item() == pytest.approx(2 / 255 / (4 * math.exp(12.0)), rel=1e-3)


@pytest.mark.parametrize("channels", [1, 3])
def test_gradients_are_finite_for_extreme_params(channels):
    g = torch.Generator().manual_seed(7)
    params = random_params(512, channels, 10, g, extreme=True).requires_grad_()
    x = torch.randint(0, 256, (512, channels), generator=g)
    x[:, 0] = torch.tensor([0, 255, 1, 254]).repeat(128)  # the open end bins and their neighbours
    dmol_nll(params, x, channels, 10).sum().backward()
    assert torch.isfinite(params.grad).all()
    params.grad = None
    dmol_log_probs(params, x, channels, 10).logsumexp(-1).sum().backward()
    assert torch.isfinite(params.grad).all()


def test_leading_dims_and_low_precision_params():
    g = torch.Generator().manual_seed(8)
    params = random_params(24, 3, 4, g).reshape(2, 3, 4, -1)
    x = torch.randint(0, 256, (2, 3, 4, 3), generator=g)
    nll = dmol_nll(params, x, 3, 4)
    assert nll.shape == (2, 3, 4)
    assert torch.allclose(nll.flatten(), dmol_nll(params.reshape(24, -1), x.reshape(24, 3), 3, 4))
    assert dmol_log_probs(params, x, 3, 4).shape == (2, 3, 4, 3, 256)
    assert dmol_sample(params, 3, 4, gumbel=noise_for(24, 3, seed=8).view(2, 3, 4, 3, 256)).shape == (2, 3, 4, 3)
    half = params.bfloat16()
    assert dmol_nll(half, x, 3, 4).dtype == torch.float32
    torch.testing.assert_close(dmol_nll(half, x, 3, 4), dmol_nll(half.float(), x, 3, 4))
    assert dmol_log_probs(half, x, 3, 4).dtype == torch.float32
    with pytest.raises(ValueError, match="shape"):
        dmol_nll(params, x[..., :2], 3, 4)


@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.5])
def test_gumbel_max_draws_the_tempered_softmax_and_never_a_restricted_value(temperature):
    from imagetx.model.sampling import restrict, sample_softmax

    n = 40000
    log_p = torch.log_softmax(3.0 * torch.randn(256, generator=torch.Generator().manual_seed(9)), -1)
    lo, hi = torch.full((n,), 100), torch.full((n,), 140)
    restricted = restrict(log_p.expand(n, -1), lo, hi)
    x = sample_softmax(restricted, temperature, noise_for(n, 1, seed=10)[:, 0])
    assert x.min() >= 100 and x.max() <= 140
    expected = torch.softmax(restricted[0].double() / temperature, -1)
    assert total_variation(x, expected) < 0.03
    # temperature 0 is the argmax, without noise; noise of the wrong shape is an error
    assert torch.equal(sample_softmax(restricted[:3], 0.0), restricted[:3].argmax(-1))
    with pytest.raises(ValueError, match="Gumbel noise of shape"):
        sample_softmax(restricted[:3], temperature)


def test_restrict_leaves_an_empty_range_to_its_caller_without_reading_it():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from imagetx.model.sampling import restrict

    out = restrict(torch.zeros(2, 256), torch.tensor([3, 9]), torch.tensor([5, 8]))  # the second is empty
    assert torch.isfinite(out[0]).sum() == 3 and torch.isinf(out[1]).all()
    # it runs in every training step of a model.consistent model: no value may be read back to
    # the host there (a fake tensor has no values: reading one raises)
    with FakeTensorMode():
        assert restrict(torch.zeros(2, 256), torch.tensor([3, 9]), torch.tensor([5, 8])).shape == (2, 256)
