"""Weighted diffusion losses (Kingma & Gao 2023): the weights, the gradients that train on
them, and the monotone weighting as an expectation of ELBOs of noise-augmented data."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian import exact_eps_fn
from test_model import DIMS, MONOTONE, K, _denoiser, _grads, _setup, assert_grads_close

from vdm_jax import diffusion, weightings
from vdm_jax import model as vdm_model

LOG_SNR = np.linspace(-12.0, 14.0, 261)


def _edm_weight_from_sigma(log_snr: np.ndarray) -> np.ndarray:
    """EDM's loss in its own terms: ln sigma ~ N(-1.2, 1.2^2), per-sample weight
    (sigma^2 + 0.25) / (0.25 sigma^2) on ||D - x||^2 = sigma^2 ||eps_hat - eps||^2, carried
    to a density over log-SNR = -2 ln sigma (Jacobian 1/2)."""
    log_sigma = -0.5 * log_snr
    density_log_sigma = np.exp(-0.5 * ((log_sigma + 1.2) / 1.2) ** 2) / (1.2 * np.sqrt(2 * np.pi))
    sigma2 = np.exp(2 * log_sigma)
    return 0.5 * density_log_sigma * (sigma2 + 0.25) / (0.25 * sigma2) * sigma2


@pytest.mark.parametrize(
    "name, bias, want",
    [
        ("elbo", 0.0, lambda lam, b: np.ones_like(lam)),
        ("sigmoid", 0.0, lambda lam, b: 1.0 / (1.0 + np.exp(lam - b))),
        ("sigmoid", -2.5, lambda lam, b: 1.0 / (1.0 + np.exp(lam - b))),
        ("edm", 0.0, lambda lam, b: _edm_weight_from_sigma(lam)),
    ],
)
def test_weights_and_slopes_against_their_formulas(name, bias, want):
    gamma = jnp.asarray(-LOG_SNR, jnp.float32)
    w, slope = weightings.weight_and_slope(name, bias, gamma)
    np.testing.assert_allclose(w, want(LOG_SNR, bias), rtol=2e-5, atol=1e-9)
    h = 1e-3  # d w / d gamma by central differences of the formula.
    fd = (want(LOG_SNR - h, bias) - want(LOG_SNR + h, bias)) / (2 * h)
    np.testing.assert_allclose(slope, fd, rtol=1e-3, atol=1e-7)
    assert np.all(np.asarray(w) > 0)


def test_monotone_flags_match_the_weights():
    for name, entry in weightings.WEIGHTINGS.items():
        w = np.asarray(entry.fn(jnp.asarray(LOG_SNR, jnp.float32), 0.0))
        assert entry.monotone == bool(np.all(np.diff(w) <= 0)), name


def _weighted_cfg(schedule_grad="elbo"):
    return vdm_model.LossConfig(
        vocab_size=K,
        schedule_grad=schedule_grad,
        weighting="sigmoid",
        weighting_bias=-1.0,
        variance_params=MONOTONE.variance_params,
    )


def _direct(sched, s_params, d_params, x, key, cfg):
    """Per-example terms and weights through the plain composable loss, [B] each."""
    gamma_fn = lambda t: sched.apply({"params": s_params}, t)  # noqa: E731
    nats = diffusion.vdm_terms(
        x, key, gamma_fn, lambda z, g: _denoiser(d_params, z, g), vocab_size=K
    )
    key_t, _ = jax.random.split(key)
    gamma_t = gamma_fn(diffusion.sample_times(key_t, x.shape[0]))
    w = weightings.WEIGHTINGS[cfg.weighting].fn(-gamma_t, cfg.weighting_bias)
    return {k: diffusion.bits_per_dim(v, DIMS) for k, v in nats.items()}, w


def test_weighted_gradients_equal_direct_autodiff():
    """Denoiser: grad of prior + recon + w * diffusion; schedule: grad of the ELBO ("elbo"),
    or of mean (w L_diff)^2 for the interior ("variance"), with w moving with gamma_t."""
    sched, s_params, d_params, x = _setup(seed=2)
    key = jax.random.key(11)
    (loss, terms), (g_sched, g_net) = _grads(sched, s_params, d_params, x, key, _weighted_cfg())
    (_, _), (g_sched_v, g_net_v) = _grads(
        sched, s_params, d_params, x, key, _weighted_cfg("variance")
    )

    def objective(sp, dp):
        t, w = _direct(sched, sp, dp, x, key, _weighted_cfg())
        return jnp.mean(t["prior"] + t["recon"] + jax.lax.stop_gradient(w) * t["diffusion"])

    def elbo(sp):
        return jnp.mean(sum(_direct(sched, sp, d_params, x, key, _weighted_cfg())[0].values()))

    def second_moment(sp):
        t, w = _direct(sched, sp, d_params, x, key, _weighted_cfg())
        return jnp.mean(jnp.square(w * t["diffusion"]))

    want_terms, want_w = _direct(sched, s_params, d_params, x, key, _weighted_cfg())
    np.testing.assert_allclose(loss, jnp.mean(sum(want_terms.values())), rtol=1e-6)
    np.testing.assert_allclose(
        terms["diffusion_weighted"], want_w * want_terms["diffusion"], rtol=1e-5
    )
    want_net = jax.grad(objective, argnums=1)(s_params, d_params)
    assert_grads_close(g_net, want_net)
    jax.tree.map(np.testing.assert_array_equal, g_net, g_net_v)
    assert_grads_close(g_sched, jax.grad(elbo)(s_params))
    want_var = jax.grad(second_moment)(s_params)
    for name in s_params:
        if name in MONOTONE.endpoint_params:
            np.testing.assert_array_equal(g_sched_v[name], g_sched[name])
        else:
            np.testing.assert_allclose(g_sched_v[name], want_var[name], rtol=1e-3, atol=1e-5)
    # The weight is not the ELBO's: the denoiser's gradient differs from the ELBO's.
    (_, _), (_, g_net_elbo) = _grads(
        sched, s_params, d_params, x, key, vdm_model.LossConfig(vocab_size=K)
    )
    assert not np.allclose(g_net["w2"], g_net_elbo["w2"], rtol=1e-2)


def _gamma_np(t):
    return -9.0 + 15.0 * t + 2.0 * np.sin(np.pi * t)


def _gamma_jnp(t):
    return -9.0 + 15.0 * t + 2.0 * jnp.sin(jnp.pi * t)


def test_monotone_weighting_is_an_expectation_of_elbos_of_noised_data():
    """Gaussian data x ~ N(mu, s^2) with its exact denoiser: the Monte Carlo weighted loss
    0.5 E[w gamma' ||eps - eps_hat||^2] equals w(lambda_0) L(0) + int (dw/dt) L(t) dt with
    the closed form L(t) = 0.5 D log((1 + SNR_t s^2) / (1 + SNR_1 s^2)), by quadrature."""
    mu, s, dims, n, bias = 0.3, 0.6, 4, 200_000, 1.0
    keys = jax.random.split(jax.random.key(0), 3)
    t = jax.random.uniform(keys[0], (n,))
    f = mu + s * jax.random.normal(keys[1], (n, dims))
    values = diffusion.schedule_values(_gamma_jnp, t)
    w, _ = weightings.weight_and_slope("sigmoid", bias, values.gamma_t)
    eps = jax.random.normal(keys[2], f.shape)
    losses = w * diffusion.diffusion_loss(
        f, eps, values.gamma_t, values.weight, exact_eps_fn(mu, s)
    )
    estimate, stderr = float(jnp.mean(losses)), float(jnp.std(losses)) / math.sqrt(n)

    grid = np.linspace(0.0, 1.0, 200_001)
    snr = np.exp(-_gamma_np(grid))
    elbo_from = 0.5 * dims * (np.log1p(snr * s**2) - np.log1p(snr[-1] * s**2))  # L(t)
    w_np = 1.0 / (1.0 + np.exp(-_gamma_np(grid) - bias))  # sigmoid(b - lambda), lambda = -gamma
    dw_dt = np.gradient(w_np, grid)
    assert np.all(dw_dt >= 0)  # positive weights on the ELBOs: a likelihood objective
    integrand = dw_dt * elbo_from
    quadrature = w_np[0] * elbo_from[0] + np.sum(
        0.5 * (integrand[1:] + integrand[:-1]) * np.diff(grid)
    )
    assert abs(estimate - quadrature) < 4 * stderr, (estimate, quadrature, stderr)
    # The check has power: the unweighted (ELBO) value is far away.
    assert abs(elbo_from[0] - quadrature) > 50 * stderr
