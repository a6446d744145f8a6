"""The categorical parameterisation (``vdm_jax.parameterizations``): logits over the data's K
values plus each value's likelihood of z_i, read as the posterior mean of x.

Checked against what grid data makes exact, computed here in float64 numpy independently of
the code under test: Bayes' posterior mean by enumeration (independent dimensions, and a
joint table where the logits are the leave-one-out posterior), the exact denoiser's diffusion
loss as the mutual information the noise destroys (Gauss-Hermite quadrature), the samplers'
output distribution, and central differences for the gradient.
"""

import math

import flax.linen as nn
import grid
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from vdm_jax import diffusion, model, parameterizations, samplers, schedules

K, D = 6, 3
GAMMA_0, GAMMA_1 = -13.3, 5.0
CATEGORICAL = parameterizations.PARAMETERIZATIONS["categorical"]
LEVELS = grid.levels(K)  # the K bin centres in (-1, 1)
# Independent dimensions, each with its own distribution over the K values: [D, K].
PROBS = np.random.default_rng(0).dirichlet(np.full(K, 0.7), size=D)


def linear(t: jax.Array) -> jax.Array:
    return GAMMA_0 + (GAMMA_1 - GAMMA_0) * t


def _draws(n: int, seed: int, gamma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x ~ PROBS as values [n, D] and z = alpha x + sigma eps [n, D] at ``gamma``."""
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(K, size=n, p=PROBS[i]) for i in range(D)], axis=-1)
    a, s = grid.alpha_sigma(np.broadcast_to(gamma, (n, D)))
    return LEVELS[idx], a * LEVELS[idx] + s * rng.normal(size=(n, D))


def _to_eps(logits: np.ndarray, z: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """eps_hat through the registered conversion, with logits [B, D, K] flattened."""
    flat = jnp.asarray(logits.reshape(logits.shape[0], -1), jnp.float32)
    out = CATEGORICAL.to_eps(flat, jnp.asarray(z, jnp.float32), jnp.asarray(gamma, jnp.float32), K)
    return np.asarray(out, np.float64)


@pytest.mark.parametrize("per_dimension", [False, True])
def test_prior_logits_give_the_bayes_denoiser_of_independent_dimensions(per_dimension):
    # For independent dimensions p(x_i | z_{-i}) = p_i, so logits log p_i make the
    # parameterisation the exact posterior mean, at every noise level down to gamma_0.
    n = 512
    gamma = np.linspace(GAMMA_0, GAMMA_1, n)[:, None]
    if per_dimension:  # each dimension at its own noise level
        gamma = gamma + np.array([0.0, -1.5, 2.0])
    _, z = _draws(n, 1, gamma)
    logits = np.broadcast_to(np.log(PROBS), (n, D, K))
    want = grid.eps_of(grid.bayes_x_hat(z, gamma, np.log(PROBS), LEVELS), z, gamma)
    gamma_in = gamma if per_dimension else gamma[:, 0]
    # x_hat enters divided by sigma (1.3e-3 at gamma_0), as in the x parameterisation.
    np.testing.assert_allclose(_to_eps(logits, z, gamma_in), want, atol=3e-4)
    # Zero logits (the zero-initialised output layer) are the uniform prior's denoiser.
    uniform = grid.eps_of(grid.bayes_x_hat(z, gamma, np.zeros(K), LEVELS), z, gamma)
    np.testing.assert_allclose(_to_eps(0 * logits, z, gamma_in), uniform, atol=3e-4)


def test_leave_one_out_logits_give_the_joint_posterior_mean():
    # Dependent dimensions: a random joint table over K^2 states of two dimensions. The
    # split p(x_i | z) ~ N(z_i; alpha x_i, sigma^2) p(x_i | z_{-i}) is exact, so logits
    # log p(x_i = v_k | z_{-i}) give E[x | z] as enumerated over the whole table.
    rng = np.random.default_rng(2)
    joint = rng.dirichlet(np.full(K * K, 0.3)).reshape(K, K)
    n = 256
    gamma = np.linspace(-9.0, 3.0, n)[:, None]
    a, s = grid.alpha_sigma(gamma)
    flat = rng.choice(K * K, size=n, p=joint.ravel())
    x = LEVELS[np.stack([flat // K, flat % K], axis=-1)]
    z = a * x + s * rng.normal(size=(n, 2))
    log_lik = -0.5 * ((z[..., None] - a[..., None] * LEVELS) / s[..., None]) ** 2  # [n, 2, K]
    log_joint = np.log(joint) + log_lik[:, 0, :, None] + log_lik[:, 1, None, :]  # [n, K, K]
    post = np.exp(log_joint - logsumexp(log_joint, axis=(1, 2), keepdims=True))
    x_hat = np.stack([post.sum(2) @ LEVELS, post.sum(1) @ LEVELS], axis=-1)
    # log p(x_0 = k | z_1) and log p(x_1 = k | z_0), up to constants in k.
    loo = np.stack(
        [
            logsumexp(np.log(joint) + log_lik[:, 1, None, :], axis=2),
            logsumexp(np.log(joint) + log_lik[:, 0, :, None], axis=1),
        ],
        axis=1,
    )
    np.testing.assert_allclose(
        _to_eps(loo, z, gamma[:, 0]), grid.eps_of(x_hat, z, gamma), atol=3e-4
    )


class PriorLogits(nn.Module):
    """A parameter-free "network": logits log p_i for every input (the exact denoiser)."""

    def __call__(self, z, gamma_t, label=None, *, train=False):
        del gamma_t, label, train
        return jnp.broadcast_to(
            jnp.log(jnp.asarray(PROBS, jnp.float32)).ravel(), (z.shape[0], D * K)
        )


def _exact_eps_fn():
    schedule = schedules.make_schedule("fixed_linear", gamma_min=GAMMA_0, gamma_max=GAMMA_1)
    vdm = model.VDM(schedule, PriorLogits(), parameterization="categorical", vocab_size=K)
    return model.inference_fns(vdm, {})[1]


def test_mutual_information_quadrature_has_its_limits():
    # The reference below, checked at its ends: all of H(x) survives gamma_0, none gamma = 30.
    entropy = -(PROBS * np.log(PROBS)).sum(-1)
    for i in range(D):
        assert abs(grid.mutual_information(GAMMA_0, PROBS[i], LEVELS) - entropy[i]) < 1e-6
        assert grid.mutual_information(30.0, PROBS[i], LEVELS) < 1e-6


def test_diffusion_loss_of_the_exact_denoiser_is_the_information_the_noise_destroys():
    # I-MMSE (Guo, Shamai & Verdu 2005): 0.5 int gamma' E||eps - eps_hat||^2 dt with the exact
    # denoiser is sum_i I(x_i; z_0) - I(x_i; z_1), whatever the data's distribution.
    n = 200_000  # the integrand is sharp in gamma where each value is resolved
    key_t, key_e = jax.random.split(jax.random.key(3))
    t = diffusion.sample_times(key_t, n, antithetic=True)
    x, _ = _draws(n, 4, np.zeros(()))
    eps = jax.random.normal(key_e, (n, D))
    weight = jnp.full((n,), GAMMA_1 - GAMMA_0)
    loss = diffusion.diffusion_loss(
        jnp.asarray(x, jnp.float32), eps, linear(t), weight, _exact_eps_fn()
    )
    mean, stderr = float(loss.mean()), float(loss.std() / math.sqrt(n))
    want = grid.information_destroyed(PROBS, LEVELS, GAMMA_0, GAMMA_1)
    assert abs(mean - want) < 4 * stderr, (mean, stderr, want)
    assert stderr < 0.01 * want


@pytest.mark.parametrize("sampler", ["ancestral", "dpm_solver_2m"])
def test_samplers_with_the_exact_denoiser_draw_the_data_distribution(sampler):
    # 4,000 draws decoded to the grid: each dimension's frequencies within 4.5 standard
    # errors of PROBS (and the dimensions independent: the joint frequency of one cell).
    n = 4000
    eps_fn = jax.jit(_exact_eps_fn())
    z_0 = samplers.sample_latent(
        jax.random.key(5), linear, eps_fn, (n, D), num_steps=200, sampler=sampler
    )
    x = np.asarray(samplers.decode(jax.random.key(6), z_0, linear(jnp.zeros(())), K))
    freq = np.stack([np.bincount(x[:, i], minlength=K) / n for i in range(D)])
    se = np.sqrt(PROBS * (1 - PROBS) / n)
    assert np.all(np.abs(freq - PROBS) < 4.5 * se + 1e-3), (freq, PROBS)
    cell = PROBS[0].argmax(), PROBS[1].argmax()
    p_cell = PROBS[0][cell[0]] * PROBS[1][cell[1]]
    got = np.mean((x[:, 0] == cell[0]) & (x[:, 1] == cell[1]))
    assert abs(got - p_cell) < 4.5 * math.sqrt(p_cell * (1 - p_cell) / n)


def test_gradient_with_respect_to_the_logits_matches_central_differences():
    rng = np.random.default_rng(7)
    n = 4
    gamma = np.array([-6.0, -3.0, 0.0, 2.0])
    _, z = _draws(n, 8, gamma[:, None])
    logits = rng.normal(size=(n, D * K))
    probe = rng.normal(size=(n, D))

    def objective(flat: jax.Array) -> jax.Array:
        eps = CATEGORICAL.to_eps(
            flat, jnp.asarray(z, jnp.float32), jnp.asarray(gamma, jnp.float32), K
        )
        return jnp.sum(eps * probe)

    grad = np.asarray(jax.grad(objective)(jnp.asarray(logits, jnp.float32)))
    h = 1e-2
    for index in [(0, 0), (1, 7), (2, 11), (3, 17), (2, 3)]:
        step = np.zeros_like(logits)
        step[index] = h
        plus = float(objective(jnp.asarray(logits + step, jnp.float32)))
        minus = float(objective(jnp.asarray(logits - step, jnp.float32)))
        assert abs((plus - minus) / (2 * h) - grad[index]) < 2e-3 + 1e-2 * abs(grad[index])


def test_the_conversion_refuses_a_missing_vocabulary_or_the_wrong_width():
    z, gamma = jnp.zeros((2, D)), jnp.zeros((2,))
    with pytest.raises(ValueError, match="vocab_size K >= 2"):
        CATEGORICAL.to_eps(jnp.zeros((2, D * K)), z, gamma, 0)
    with pytest.raises(ValueError, match="C K output channels"):
        CATEGORICAL.to_eps(jnp.zeros((2, D)), z, gamma, K)
