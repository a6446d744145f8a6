"""The discretised-logistic parameterisation (``vdm_jax.parameterizations``): a logistic's
location and log-scale per dimension, discretised to the K values, read as the categorical
parameterisation's prior over them.

Checked against references written here independently of the code under test: each bin's
probability as a difference of the logistic's CDF in 50-digit decimal arithmetic, Bayes'
posterior mean by enumeration under that prior, the exact denoiser's diffusion loss as the
mutual information the noise destroys (Gauss-Hermite quadrature), and central differences
for the gradient.
"""

import decimal
import math

import flax.linen as nn
import grid
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from vdm_jax import diffusion, model, parameterizations, schedules
from vdm_jax.runner import config_validation, experiment, specs

K, D = 9, 3
GAMMA_0, GAMMA_1 = -13.3, 5.0
LOGISTIC = parameterizations.PARAMETERIZATIONS["discretized_logistic"]
LEVELS = grid.levels(K)
# Each dimension's logistic: a tight one off centre, a very tight one between two values, and
# a wide one whose tails reach past both ends.
MU = np.array([-0.55, 0.125, 0.3])
LOG_S = np.array([-2.0, -4.5, 0.5])


def linear(t: jax.Array) -> jax.Array:
    return GAMMA_0 + (GAMMA_1 - GAMMA_0) * t


def _decimal_log_probs(mu: float, log_scale: float, vocab_size: int) -> np.ndarray:
    """log P(x = v_k) as differences of the logistic's CDF, to 50 digits: [K] float64.

    Bin k covers [2k/K - 1, 2(k + 1)/K - 1], the outer ones reaching to -inf and +inf. Bins
    above ``mu`` take differences of the survival function instead, which stays exact where
    the CDF is within 1e-50 of 1.
    """
    with decimal.localcontext() as ctx:
        ctx.prec = 50
        m, s = decimal.Decimal(mu), decimal.Decimal(log_scale).exp()

        def cdf(y):
            return 1 / (1 + (-(y - m) / s).exp())

        def survival(y):
            return 1 / (1 + ((y - m) / s).exp())

        out = []
        for k in range(vocab_size):
            lo = decimal.Decimal(2 * k) / vocab_size - 1
            hi = decimal.Decimal(2 * (k + 1)) / vocab_size - 1
            if k == 0:
                p = cdf(hi)
            elif k == vocab_size - 1:
                p = survival(lo)
            elif lo >= m:
                p = survival(lo) - survival(hi)
            else:
                p = cdf(hi) - cdf(lo)
            out.append(float(p.ln()))
    return np.array(out)


PRIOR = np.stack([_decimal_log_probs(m, s, K) for m, s in zip(MU, LOG_S, strict=True)])  # [D, K]


def _outputs(n: int) -> np.ndarray:
    """The exact network output for independent dimensions: (MU_i, LOG_S_i), [n, 2 D]."""
    return np.broadcast_to(np.stack([MU, LOG_S], axis=-1).ravel(), (n, 2 * D))


def _to_eps(out: np.ndarray, z: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    eps = LOGISTIC.to_eps(
        jnp.asarray(out, jnp.float32), jnp.asarray(z, jnp.float32), jnp.asarray(gamma), K
    )
    return np.asarray(eps, np.float64)


def _draws(n: int, seed: int, gamma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x from the D discretised logistics as values [n, D], and z = alpha x + sigma eps."""
    rng = np.random.default_rng(seed)
    probs = np.exp(PRIOR)
    idx = np.stack([rng.choice(K, size=n, p=probs[i] / probs[i].sum()) for i in range(D)], -1)
    a, s = grid.alpha_sigma(np.broadcast_to(gamma, (n, D)))
    return LEVELS[idx], a * LEVELS[idx] + s * rng.normal(size=(n, D))


@pytest.mark.parametrize("vocab_size", [2, 9, 17, 256])
def test_log_probs_are_the_logistic_cdf_differences_and_sum_to_one(vocab_size):
    # Locations inside, between and far outside the values; scales from a hundredth of a bin
    # (far bins at log-probabilities near -1e4) to a hundred times the data's range.
    mus = np.array([-0.3, 0.0, 1.0 / vocab_size, 0.77, -2.5, 6.0])
    log_scales = np.array([-9.0, -5.0, -2.0, 0.0, 2.0, 5.0])
    mu, log_s = (a.ravel() for a in np.meshgrid(mus, log_scales))
    got = parameterizations.discretized_logistic_log_probs(
        jnp.asarray(mu, jnp.float32), jnp.asarray(log_s, jnp.float32), vocab_size
    )
    got = np.asarray(got, np.float64)
    mu32, log_s32 = np.float32(mu).astype(np.float64), np.float32(log_s).astype(np.float64)
    want = np.stack(
        [_decimal_log_probs(m, s, vocab_size) for m, s in zip(mu32, log_s32, strict=True)]
    )
    assert np.all(np.isfinite(got))
    # float32 arithmetic: each standardised edge (up to 1e5 in size) is off by about 1e-7 of
    # itself, plus 6e-8 / s from rounding the edge (7e-4 at s = e^-9, where a location on an
    # edge splits its mass over two bins whose log-probabilities then move by up to 4e-4).
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=5e-4)
    np.testing.assert_allclose(np.exp(got).sum(-1), 1.0, atol=2e-5)


@pytest.mark.parametrize("per_dimension", [False, True])
def test_logistic_outputs_give_the_bayes_denoiser_under_that_prior(per_dimension):
    # For independent dimensions p(x_i | z_{-i}) is the prior, so outputting its location and
    # log-scale makes the parameterisation the exact posterior mean, at every noise level.
    n = 512
    gamma = np.linspace(GAMMA_0, GAMMA_1, n)[:, None]
    if per_dimension:
        gamma = gamma + np.array([0.0, -1.5, 2.0])
    _, z = _draws(n, 1, gamma)
    want = grid.eps_of(grid.bayes_x_hat(z, gamma, PRIOR, LEVELS), z, gamma)
    gamma_in = gamma if per_dimension else gamma[:, 0]
    # x_hat enters divided by sigma (1.3e-3 at gamma_0), as in the x parameterisation.
    np.testing.assert_allclose(_to_eps(_outputs(n), z, gamma_in), want, atol=3e-4)


class LogisticPrior(nn.Module):
    """A parameter-free "network" that outputs each dimension's (MU_i, LOG_S_i)."""

    def __call__(self, z, gamma_t, label=None, *, train=False):
        del gamma_t, label, train
        return jnp.asarray(_outputs(z.shape[0]), jnp.float32)


def test_diffusion_loss_of_the_exact_denoiser_is_the_information_the_noise_destroys():
    # I-MMSE (Guo, Shamai & Verdu 2005): the exact denoiser's diffusion loss is
    # sum_i I(x_i; z_0) - I(x_i; z_1), here through the model's own eps_fn.
    schedule = schedules.make_schedule("fixed_linear", gamma_min=GAMMA_0, gamma_max=GAMMA_1)
    vdm = model.VDM(
        schedule, LogisticPrior(), parameterization="discretized_logistic", vocab_size=K
    )
    eps_fn = model.inference_fns(vdm, {})[1]
    n = 200_000
    key_t, key_e = jax.random.split(jax.random.key(3))
    t = diffusion.sample_times(key_t, n, antithetic=True)
    x, _ = _draws(n, 4, np.zeros(()))
    eps = jax.random.normal(key_e, (n, D))
    weight = jnp.full((n,), GAMMA_1 - GAMMA_0)
    loss = diffusion.diffusion_loss(jnp.asarray(x, jnp.float32), eps, linear(t), weight, eps_fn)
    mean, stderr = float(loss.mean()), float(loss.std() / math.sqrt(n))
    want = grid.information_destroyed(np.exp(PRIOR), LEVELS, GAMMA_0, GAMMA_1)
    assert abs(mean - want) < 4 * stderr, (mean, stderr, want)
    assert stderr < 0.01 * want


def test_gradient_matches_central_differences_and_stays_finite_in_the_tails():
    rng = np.random.default_rng(7)
    n = 4
    gamma = np.array([-6.0, -3.0, 0.0, 2.0])
    _, z = _draws(n, 8, gamma[:, None])
    out = np.stack([rng.uniform(-1, 1, (n, D)), rng.uniform(-3, 0.5, (n, D))], -1)
    out = out.reshape(n, 2 * D)
    probe = rng.normal(size=(n, D))

    @jax.jit
    def objective(flat: jax.Array) -> jax.Array:
        eps = LOGISTIC.to_eps(flat, jnp.asarray(z, jnp.float32), jnp.asarray(gamma), K)
        return jnp.sum(eps * probe)

    grad = np.asarray(jax.grad(objective)(jnp.asarray(out, jnp.float32)))
    h = 1e-2
    for index in [(0, 0), (0, 1), (1, 2), (2, 3), (3, 4), (3, 5)]:
        step = np.zeros_like(out)
        step[index] = h
        plus = float(objective(jnp.asarray(out + step, jnp.float32)))
        minus = float(objective(jnp.asarray(out - step, jnp.float32)))
        assert abs((plus - minus) / (2 * h) - grad[index]) < 2e-3 + 1e-2 * abs(grad[index])
    # Locations far outside the data and scales far from a bin: no NaN or inf, forward or back.
    extreme = np.tile([[50.0, -15.0], [-50.0, 8.0], [0.1, -15.0]], (n, 1))[: n * D]
    extreme = jnp.asarray(extreme.reshape(n, 2 * D), jnp.float32)
    assert np.isfinite(float(objective(extreme)))
    assert np.all(np.isfinite(np.asarray(jax.grad(objective)(extreme))))


@pytest.mark.slow  # Builds and compiles the whole digits U-Net.
@pytest.mark.parametrize(
    "name, outputs, prior",
    [
        # Zero logits: the uniform prior over the 17 values.
        ("categorical", 17, np.zeros(17)),
        # Zero location and log-scale: the logistic mu = 0, s = 1.
        ("discretized_logistic", 2, _decimal_log_probs(0.0, 0.0, 17)),
    ],
)
def test_digits_model_has_its_outputs_per_pixel_and_starts_at_its_zero_output_prior(
    name, outputs, prior
):
    config = test_config.get_config()
    config.model.parameterization = name
    vdm = experiment.build(config).vdm
    assert vdm.vocab_size == 17 and vdm.score_net.outputs_per_channel == outputs
    x = jax.random.randint(jax.random.key(9), (2, 8, 8, 1), 0, 17)
    gamma = jnp.array([-7.0, 1.0])
    f = diffusion.encode(x, 17)
    z = diffusion.diffuse(f, gamma, jax.random.normal(jax.random.key(10), f.shape))
    params = vdm.init(jax.random.key(11), z, jnp.array([0.2, 0.7]))["params"]
    assert params["score_net"]["conv_out"]["kernel"].shape[-1] == outputs
    eps = model.inference_fns(vdm, params)[1](z, gamma)
    zz, g = np.asarray(z, np.float64), np.asarray(gamma, np.float64)[:, None, None, None]
    want = grid.eps_of(grid.bayes_x_hat(zz, g, prior, grid.levels(17)), zz, g)
    np.testing.assert_allclose(eps, want, atol=1e-4)


def test_missing_vocabulary_wrong_width_and_added_z_are_refused():
    z, gamma = jnp.zeros((2, D)), jnp.zeros((2,))
    with pytest.raises(ValueError, match="vocab_size K >= 2"):
        LOGISTIC.to_eps(jnp.zeros((2, 2 * D)), z, gamma, 0)
    with pytest.raises(ValueError, match="2 C output channels"):
        LOGISTIC.to_eps(jnp.zeros((2, D * K)), z, gamma, K)
    config = test_config.get_config()
    config.model.parameterization = "discretized_logistic"
    spec = specs.from_section(specs.ModelSpec, config.model)
    with pytest.raises(ValueError, match="needs the vocabulary size"):
        spec.build(schedules.FixedLinearSchedule(), 0, vocab_size=0)
    config.model.add_z_to_eps = True
    with pytest.raises(ValueError, match=r"outputs a distribution .* add_z_to_eps"):
        config_validation.validate(config, num_devices=1, process_count=1)
