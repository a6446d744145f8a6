"""ELBO terms against closed forms, numerical integration and brute force."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian import continuous_diffusion_loss, discrete_diffusion_loss, exact_eps_fn
from scipy import integrate, special, stats

from vdm_jax import diffusion

GAMMA_0, GAMMA_1 = -13.3, 5.0


def linear(t):
    return GAMMA_0 + (GAMMA_1 - GAMMA_0) * t


def cubic(t):
    return GAMMA_0 + (GAMMA_1 - GAMMA_0) * t**3


def logit_warp(t):
    """A sigmoid-shaped schedule with the same endpoints."""
    w = lambda u: jax.nn.sigmoid(8.0 * (u - 0.3))  # noqa: E731
    return GAMMA_0 + (GAMMA_1 - GAMMA_0) * (w(t) - w(0.0)) / (w(1.0) - w(0.0))


def test_encoder_maps_to_bin_centres():
    k = 17
    f = diffusion.encode(jnp.arange(k), k)
    np.testing.assert_allclose(f[0], -1 + 1 / k, rtol=1e-6)
    np.testing.assert_allclose(f[-1], 1 - 1 / k, rtol=1e-6)
    np.testing.assert_allclose(np.diff(f), 2 / k, rtol=1e-5)


@pytest.mark.parametrize("vocab_size", [2, 17, 256])
@pytest.mark.parametrize("gamma_0", [-6.0, -1.0, 2.0])
def test_decoder_matches_brute_force_normalisation(vocab_size, gamma_0):
    rng = np.random.default_rng(0)
    x = rng.integers(0, vocab_size, size=(3, 4, 2))
    z_0 = rng.normal(size=x.shape)
    alpha_0 = math.sqrt(1 / (1 + math.exp(gamma_0)))
    sigma_0 = math.sqrt(1 / (1 + math.exp(-gamma_0)))
    centres = 2 * (np.arange(vocab_size) + 0.5) / vocab_size - 1
    log_dens = stats.norm.logpdf(z_0[..., None] / alpha_0, loc=centres, scale=sigma_0 / alpha_0)
    log_probs = log_dens - special.logsumexp(log_dens, axis=-1, keepdims=True)
    logits = diffusion.decoder_logits(
        jnp.asarray(z_0, jnp.float32), jnp.float32(gamma_0), vocab_size
    )
    np.testing.assert_allclose(jax.nn.softmax(logits, -1), np.exp(log_probs), atol=2e-5)
    picked = np.take_along_axis(log_probs, x[..., None], -1)
    expected = -picked.reshape(3, -1).sum(-1)
    recon = diffusion.reconstruction_loss(
        jnp.asarray(x), jnp.asarray(z_0, jnp.float32), jnp.float32(gamma_0), vocab_size
    )
    np.testing.assert_allclose(recon, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gamma_1", [-3.0, 0.0, 5.0, 12.0])
def test_prior_kl_matches_numerical_integration(gamma_1):
    f = np.array([[-0.9, 0.0, 0.35, 0.99]])
    alpha = math.sqrt(1 / (1 + math.exp(gamma_1)))
    sigma = math.sqrt(1 / (1 + math.exp(-gamma_1)))
    expected = 0.0
    for fi in f[0]:
        q = stats.norm(alpha * fi, sigma)
        integrand = lambda z, q=q: q.pdf(z) * (q.logpdf(z) - stats.norm.logpdf(z))  # noqa: E731
        expected += integrate.quad(integrand, -12, 12, epsabs=1e-12, limit=200)[0]
    got = diffusion.prior_loss(jnp.asarray(f, jnp.float32), jnp.float32(gamma_1))
    np.testing.assert_allclose(got, [expected], rtol=2e-4, atol=1e-7)


def _gaussian_diffusion_mc(gamma_fn, timesteps, mu=0.2, s=0.5, n=40_000, dims=4, seed=0):
    """Per-example diffusion losses for x ~ N(mu, s^2 I) with the exact denoiser, [n]."""
    key_x, key_t, key_eps = jax.random.split(jax.random.key(seed), 3)
    f = mu + s * jax.random.normal(key_x, (n, dims))
    t = diffusion.sample_times(key_t, n, antithetic=False)
    values = diffusion.schedule_values(gamma_fn, t, timesteps)
    eps = jax.random.normal(key_eps, f.shape)
    losses = diffusion.diffusion_loss(f, eps, values.gamma_t, values.weight, exact_eps_fn(mu, s))
    return np.asarray(losses, np.float64)


def _mean_and_se(a):
    return a.mean(), a.std(ddof=1) / math.sqrt(a.size)


def test_continuous_diffusion_loss_is_the_closed_form_for_schedules_sharing_endpoints():
    expected = continuous_diffusion_loss(GAMMA_0, GAMMA_1, s=0.5, dims=4)
    variances = []
    for gamma_fn in (linear, cubic, logit_warp):
        losses = _gaussian_diffusion_mc(gamma_fn, timesteps=0)
        mean, se = _mean_and_se(losses)
        assert abs(mean - expected) < 4 * se, (gamma_fn.__name__, mean, expected, se)
        variances.append(losses.var())
    # Same expectation, different estimator variance: the interior matters only there.
    assert max(variances) > 1.5 * min(variances)


def test_discrete_diffusion_loss_matches_its_sum_and_approaches_continuous_time():
    continuous = continuous_diffusion_loss(GAMMA_0, GAMMA_1, s=0.5, dims=4)
    exact = {}
    for timesteps in (2, 10, 1000):
        exact[timesteps] = discrete_diffusion_loss(
            lambda t: GAMMA_0 + (GAMMA_1 - GAMMA_0) * t, timesteps, s=0.5, dims=4
        )
        mean, se = _mean_and_se(_gaussian_diffusion_mc(linear, timesteps))
        assert abs(mean - exact[timesteps]) < 4 * se, (timesteps, mean, exact[timesteps], se)
    assert exact[2] > exact[10] > exact[1000] > continuous
    assert exact[2] > 1.5 * continuous
    assert exact[1000] - continuous < 0.01 * continuous


def test_antithetic_times_cover_the_unit_interval_evenly():
    t = np.sort(np.asarray(diffusion.sample_times(jax.random.key(1), 64, antithetic=True)))
    assert 0.0 <= t[0] < 1 / 64 and t[-1] < 1.0
    np.testing.assert_allclose(np.diff(t), 1 / 64, atol=1e-6)


def test_discrete_times_sit_on_the_grid():
    t = jnp.array([0.0, 0.2, 0.5, 0.999])
    values = diffusion.schedule_values(linear, t, timesteps=4)
    grid_t = np.array([0.25, 0.25, 0.75, 1.0])  # (floor(4 t) + 1) / 4
    np.testing.assert_allclose(values.gamma_t, linear(grid_t), rtol=1e-5)
    expected_w = 4 * np.expm1(linear(grid_t) - linear(grid_t - 0.25))
    np.testing.assert_allclose(values.weight, expected_w, rtol=1e-4)


def test_zero_denoiser_elbo_on_uniform_data_is_not_below_the_entropy():
    """The ELBO bounds -log p(x); for uniform x the expectation of -log p is >= D log K."""
    vocab_size, n = 17, 4096
    x = jax.random.randint(jax.random.key(0), (n, 8, 8, 1), 0, vocab_size)
    terms = diffusion.vdm_terms(
        x, jax.random.key(1), linear, lambda z, g: jnp.zeros_like(z), vocab_size=vocab_size
    )
    bpd = np.asarray(diffusion.bits_per_dim(sum(terms.values()), 64), np.float64)
    mean, se = _mean_and_se(bpd)
    assert mean + 3 * se >= math.log2(vocab_size), (mean, se)
