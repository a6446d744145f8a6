"""The network's output read as eps, x or v (``vdm_jax.parameterizations``), against the
closed forms of Gaussian data x ~ N(MU, S^2): its exact denoiser written in each
parameterisation must give the exact noise prediction, and so the same ELBO, samples and ODE
likelihood; and the diffusion loss of each matches its closed form."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian import continuous_diffusion_loss, exact_eps_fn, exact_v_fn, exact_x_fn

from vdm_jax import (
    diffusion,
    elbo_estimators,
    model,
    ode_likelihood,
    parameterizations,
    samplers,
    schedules,
)

MU, S, K = 0.3, 0.5, 16
GAMMA_0, GAMMA_1 = -13.3, 5.0
# The predictions of a real number (the categorical one has its own tests, on grid data).
NAMES = tuple(k for k, v in parameterizations.PARAMETERIZATIONS.items() if v.from_eps is not None)
EXACT_OUTPUT = {"eps": exact_eps_fn(MU, S), "x": exact_x_fn(MU, S), "v": exact_v_fn(MU, S)}
# x_hat enters eps_hat divided by sigma (1.3e-3 at GAMMA_0): float32 rounding of z - alpha x_hat
# (about 1e-7) grows to about 1e-4 there.
ATOL = {"eps": 1e-6, "v": 1e-5, "x": 3e-4}


def linear(t: jax.Array) -> jax.Array:
    return GAMMA_0 + (GAMMA_1 - GAMMA_0) * t


class ExactOutput(nn.Module):
    """A parameter-free "network" that outputs the exact denoiser in one parameterisation."""

    kind: str

    def __call__(self, z, gamma_t, label=None, *, train=False):
        del label, train
        return EXACT_OUTPUT[self.kind](z, jnp.broadcast_to(gamma_t, z.shape[:1]))


def _exact_eps_via(name: str):
    """``eps_fn`` of a VDM whose network outputs the exact ``name`` prediction."""
    schedule = schedules.make_schedule("fixed_linear", gamma_min=GAMMA_0, gamma_max=GAMMA_1)
    vdm = model.VDM(schedule, ExactOutput(name), parameterization=name)
    _, eps_fn = model.inference_fns(vdm, {})
    return eps_fn


def _latents(n: int = 256, dims: int = 3, seed: int = 0):
    """z_t ~ q(z_t) at gammas spread over [GAMMA_0, GAMMA_1]: [n, dims], [n]."""
    rng = np.random.default_rng(seed)
    gamma = np.linspace(GAMMA_0, GAMMA_1, n)
    a, s = np.sqrt(1 / (1 + np.exp(gamma))), np.sqrt(1 / (1 + np.exp(-gamma)))
    x = MU + S * rng.normal(size=(n, dims))
    z = a[:, None] * x + s[:, None] * rng.normal(size=(n, dims))
    return jnp.asarray(z, jnp.float32), jnp.asarray(gamma, jnp.float32)


@pytest.mark.parametrize("name", NAMES)
def test_exact_denoiser_in_each_parameterization_gives_the_exact_eps(name):
    z, gamma = _latents()
    expected = exact_eps_fn(MU, S)(z, gamma)
    np.testing.assert_allclose(_exact_eps_via(name)(z, gamma), expected, atol=ATOL[name])
    # from_eps is the inverse: the exact eps maps to the exact output of that kind.
    # (x and v divide by alpha, at least 0.08 here.)
    back = parameterizations.PARAMETERIZATIONS[name].from_eps(expected, z, gamma)
    np.testing.assert_allclose(back, EXACT_OUTPUT[name](z, gamma), atol=1e-5)


def test_conversions_at_a_known_point():
    # gamma = 0: alpha = sigma = sqrt(1/2). z = alpha x + sigma eps with x = 1, eps = -1 gives
    # z = 0 and v = alpha eps - sigma x = -sqrt(2).
    z, gamma = jnp.zeros((1, 1)), jnp.zeros((1,))
    table = parameterizations.PARAMETERIZATIONS
    np.testing.assert_allclose(table["x"].to_eps(jnp.ones((1, 1)), z, gamma), [[-1.0]], atol=1e-6)
    np.testing.assert_allclose(table["v"].from_eps(-jnp.ones((1, 1)), z, gamma), [[-math.sqrt(2)]])
    np.testing.assert_allclose(table["v"].to_eps(jnp.full((1, 1), -math.sqrt(2)), z, gamma), [[-1]])


@pytest.mark.parametrize("name", NAMES)
def test_diffusion_loss_of_each_parameterization_matches_the_closed_form(name):
    # 0.5 E_t[gamma'(t) ||eps - eps_hat||^2] for continuous Gaussian data: the exact denoiser's
    # loss is 0.5 D log((1 + SNR_0 S^2) / (1 + SNR_1 S^2)), whatever it outputs.
    n, dims = 20000, 2
    key_f, key_t, key_e = jax.random.split(jax.random.key(1), 3)
    f = MU + S * jax.random.normal(key_f, (n, dims))
    t = diffusion.sample_times(key_t, n, antithetic=True)
    weight = jnp.full((n,), GAMMA_1 - GAMMA_0)  # gamma'(t) of the linear schedule
    eps = jax.random.normal(key_e, (n, dims))
    loss = diffusion.diffusion_loss(f, eps, linear(t), weight, _exact_eps_via(name))
    mean, stderr = float(loss.mean()), float(loss.std() / math.sqrt(n))
    assert abs(mean - continuous_diffusion_loss(GAMMA_0, GAMMA_1, S, dims)) < 4 * stderr


def test_elbo_samples_and_ode_likelihood_agree_across_parameterizations():
    x = jax.random.randint(jax.random.key(2), (8, 2), 0, K)
    y = jnp.asarray(_latents(8, 2, seed=3)[0])
    results = {}
    for name in NAMES:
        eps_fn = _exact_eps_via(name)
        elbo = elbo_estimators.elbo_eval(
            jax.random.key(4), x, linear, eps_fn, vocab_size=K, num_time_samples=16
        )
        latents = samplers.sample_latent(jax.random.key(5), linear, eps_fn, (8, 2), num_steps=50)
        ode = ode_likelihood.ode_log_likelihood(jax.random.key(6), y, linear, eps_fn)
        assert bool(ode.success)
        results[name] = (elbo.total, latents, ode.log_prob)
    for name in NAMES:
        for got, want in zip(results[name], results["eps"], strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
