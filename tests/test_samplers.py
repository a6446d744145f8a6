"""Samplers against the Gaussian posterior and the exact Gaussian denoiser."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian import exact_eps_fn

from vdm_jax import diffusion, samplers

MU, S = 0.3, 0.4


def linear(t):
    return -13.3 + 18.3 * t


def _sigma_alpha(gamma):
    return math.sqrt(1 / (1 + math.exp(-gamma))), math.sqrt(1 / (1 + math.exp(gamma)))


def test_ancestral_step_is_the_gaussian_posterior_q_zs_given_zt_x():
    """Textbook q(z_s | z_t, x) with x = x_hat(z_t), written from alpha_{t|s}, sigma_{t|s}."""
    gamma_t, gamma_s = 1.5, -2.0
    sigma_t, alpha_t = _sigma_alpha(gamma_t)
    sigma_s, alpha_s = _sigma_alpha(gamma_s)
    z_t, eps_hat, n = 0.7, -0.4, 200_000
    x_hat = (z_t - sigma_t * eps_hat) / alpha_t
    alpha_ts = alpha_t / alpha_s
    var_ts = sigma_t**2 - alpha_ts**2 * sigma_s**2
    mean = alpha_ts * sigma_s**2 / sigma_t**2 * z_t + alpha_s * var_ts / sigma_t**2 * x_hat
    var = var_ts * sigma_s**2 / sigma_t**2
    draws = samplers.ancestral_step(
        jax.random.key(0),
        jnp.full((n,), z_t),
        jnp.full((n,), eps_hat),
        jnp.float32(gamma_t),
        jnp.float32(gamma_s),
    )
    draws = np.asarray(draws, np.float64)
    assert abs(draws.mean() - mean) < 5 * math.sqrt(var / n)
    np.testing.assert_allclose(draws.var(), var, rtol=0.02)


def test_ddim_step_keeps_x_hat_and_eps_hat():
    gamma_t, gamma_s = 0.5, -3.0
    z_t, eps_hat = jnp.array([0.2, -1.0]), jnp.array([0.5, 0.1])
    z_s = samplers.ddim_step(None, z_t, eps_hat, jnp.float32(gamma_t), jnp.float32(gamma_s))
    sigma_t, alpha_t = _sigma_alpha(gamma_t)
    sigma_s, alpha_s = _sigma_alpha(gamma_s)
    x_hat = (np.asarray(z_t) - sigma_t * np.asarray(eps_hat)) / alpha_t
    np.testing.assert_allclose(z_s, alpha_s * x_hat + sigma_s * np.asarray(eps_hat), rtol=1e-5)


@pytest.mark.parametrize("sampler", sorted(samplers.SAMPLER_NAMES))  # Every sampler.
def test_samples_from_the_exact_denoiser_match_the_data_moments(sampler):
    """z_0 ~ N(alpha_0 mu, alpha_0^2 s^2 + sigma_0^2) when the denoiser is exact.

    Ancestral steps replace x by its posterior mean, which loses O(1/T) of the variance
    (0.134 at T=50, 0.152 at T=200 against 0.160); T=1000 is within sampling error.
    """
    n, dims = 4000, 4
    z_0 = samplers.sample_latent(
        jax.random.key(0),
        linear,
        exact_eps_fn(MU, S),
        (n, dims),
        num_steps=1000,
        sampler=sampler,
    )
    z_0 = np.asarray(z_0, np.float64).ravel()
    sigma_0, alpha_0 = _sigma_alpha(-13.3)
    want_var = alpha_0**2 * S**2 + sigma_0**2
    assert abs(z_0.mean() - alpha_0 * MU) < 5 * math.sqrt(want_var / z_0.size)
    np.testing.assert_allclose(z_0.var(), want_var, rtol=0.05)


def _flow_errors(sampler: str, settings: list[dict]) -> np.ndarray:
    """Max error of z_0 against the exact probability-flow map, one per setting.

    With the exact denoiser, the probability-flow ODE carries z_1 to
    z_0 = alpha_0 mu + sqrt(v_0 / v_1) (z_1 - alpha_1 mu), v = alpha^2 s^2 + sigma^2 (it keeps
    the standardised value of the Gaussian marginals).
    """
    z_1 = jax.random.normal(jax.random.key(0), (64, 2))
    sigma_0, alpha_0 = _sigma_alpha(-13.3)
    sigma_1, alpha_1 = _sigma_alpha(5.0)
    v_0, v_1 = alpha_0**2 * S**2 + sigma_0**2, alpha_1**2 * S**2 + sigma_1**2
    exact = alpha_0 * MU + math.sqrt(v_0 / v_1) * (np.asarray(z_1, np.float64) - alpha_1 * MU)
    errors = []
    for kwargs in settings:
        eps_fn = exact_eps_fn(MU, S)
        z_0 = samplers.sample_latent(
            jax.random.key(1), linear, eps_fn, z_1.shape, sampler=sampler, z_1=z_1, **kwargs
        )
        errors.append(np.abs(np.asarray(z_0, np.float64) - exact).max())
    return np.array(errors)


@pytest.mark.parametrize(("sampler", "order"), [("ddim", 1), ("dpm_solver_2m", 2)])
def test_deterministic_samplers_converge_to_the_exact_flow_at_their_order(sampler, order):
    """Halving the step divides the error by 2^order (measured: DDIM 0.96, 0.98, 0.99;
    DPM-Solver++(2M) 1.91, 1.98, 1.99)."""
    errors = _flow_errors(sampler, [dict(num_steps=n) for n in (20, 40, 80, 160)])
    orders = np.log2(errors[:-1] / errors[1:])
    np.testing.assert_allclose(orders, order, atol=0.12)


def test_adaptive_ode_sampler_reaches_the_exact_flow_as_the_tolerance_falls():
    # Measured: 7.0e-3, 5.6e-4, 3.9e-6, 6.3e-7 (DPM-Solver++(2M) at 160 steps: 2.1e-4).
    tolerances = (1e-3, 1e-4, 1e-5, 1e-6)
    errors = _flow_errors("ode", [dict(num_steps=1, tolerance=t) for t in tolerances])
    assert np.all(np.diff(errors) < 0)
    assert errors[0] < 3e-2 and errors[2] < 2e-5


def test_decoded_samples_are_integers_in_range_and_argmax_picks_the_nearest_bin():
    vocab_size = 17
    centres = diffusion.encode(jnp.arange(vocab_size), vocab_size)
    x = jnp.arange(vocab_size).reshape(1, vocab_size)
    z_0 = diffusion.diffuse(centres[x], jnp.float32(-13.3), jnp.zeros(x.shape))
    np.testing.assert_array_equal(samplers.decode(None, z_0, jnp.float32(-13.3), vocab_size), x)
    out = samplers.sample(
        jax.random.key(1),
        linear,
        lambda z, g: jnp.zeros_like(z),
        (3, 8, 8, 1),
        vocab_size=vocab_size,
        num_steps=5,
        decode_method="sample",
    )
    assert out.shape == (3, 8, 8, 1) and out.dtype == jnp.int32
    assert int(out.min()) >= 0 and int(out.max()) < vocab_size


def test_sampler_compiles_once_and_is_deterministic_for_a_key():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(key):
        return samplers.sample(key, linear, exact_eps_fn(MU, S), (8, 2), vocab_size=5, num_steps=10)

    a, b = run(jax.random.key(0)), run(jax.random.key(0))
    c = run(jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_bad_sampler_arguments_raise():
    with pytest.raises(ValueError, match="unknown sampler"):
        samplers.sample_latent(jax.random.key(0), linear, None, (1,), num_steps=1, sampler="euler")
    with pytest.raises(ValueError, match="num_steps"):
        samplers.sample_latent(jax.random.key(0), linear, None, (1,), num_steps=0)
    with pytest.raises(ValueError, match="unknown decoding"):
        samplers.decode(None, jnp.zeros(1), jnp.float32(0.0), 4, method="mean")
