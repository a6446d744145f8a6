"""Per-dimension and input-adaptive schedules against closed forms and quadrature.

Gaussian data with per-dimension means and variances has an exact denoiser, exact diffusion
losses and an exact probability flow, dimension by dimension (numpy, from the Gaussian
posterior: ``tests/gaussian.py``). A restricted denoiser on two perfectly correlated
dimensions has a diffusion loss that is a line integral of a non-conservative field in the
(gamma_1, gamma_2) plane, computed here by quadrature: every scalar schedule runs along the
diagonal, and a per-dimension one can do strictly better.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian import exact_eps_fn, mmse

from configs import digits_mulan
from vdm_jax import diffusion, latents, model, ode_likelihood, samplers, schedules, unet
from vdm_jax.runner import config_validation

MU = np.array([0.3, -0.2, 0.1, 0.0], np.float32)
S = np.array([0.5, 0.2, 0.8, 0.35], np.float32)
G0 = np.array([-10.0, -8.0, -12.0, -9.0], np.float32)
G1 = np.array([4.0, 6.0, 5.0, 3.0], np.float32)


def per_dim_gamma(curvature: np.ndarray, g0=G0, g1=G1):
    """``gamma_i(t) = g0_i + (g1_i - g0_i) expm1(k_i t) / expm1(k_i)``: per-dimension
    interiors (curvature k_i), t [] or [B] -> [1 or B, D]."""
    k = jnp.asarray(curvature, jnp.float32)

    def gamma_fn(t: jax.Array) -> jax.Array:
        t = jnp.reshape(jnp.asarray(t, jnp.float32), (-1, 1))
        return g0 + (g1 - g0) * jnp.expm1(k * t) / jnp.expm1(k)

    return gamma_fn


def _mean_and_stderr(values) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size))


# --------------------------------------------------------------------------------------
# The three terms with a per-dimension schedule, exact denoiser
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("curvature", [[-3.0, 0.5, 2.0, 4.0], [4.0, -2.0, 1.0, -4.0]])
def test_continuous_diffusion_loss_depends_only_on_each_dimensions_endpoints(curvature):
    """With the exact denoiser, E[0.5 sum_i gamma_i' (eps_i - eps_hat_i)^2] is
    sum_i 0.5 [log(1 + SNR0_i s_i^2) - log(1 + SNR1_i s_i^2)] whatever each interior."""
    n = 40_000
    key_f, key_t, key_eps = jax.random.split(jax.random.key(0), 3)
    f = MU + S * jax.random.normal(key_f, (n, 4))
    values = diffusion.schedule_values(per_dim_gamma(curvature), diffusion.sample_times(key_t, n))
    assert values.gamma_t.shape == (n, 4) and values.gamma_0.shape == (n, 4)
    loss = diffusion.diffusion_loss(
        f, jax.random.normal(key_eps, f.shape), values.gamma_t, values.weight, exact_eps_fn(MU, S)
    )
    want = 0.5 * np.sum(np.log1p(np.exp(-G0) * S**2) - np.log1p(np.exp(-G1) * S**2))
    mean, stderr = _mean_and_stderr(loss)
    assert abs(mean - want) < 4 * stderr, (mean, stderr, want)


def test_discrete_diffusion_loss_matches_its_per_dimension_sum():
    """T-step loss: 0.5 sum_i sum_k (SNR_i(s_k) - SNR_i(t_k)) mmse_i(SNR_i(t_k)), exactly the
    expected value of the estimator under the exact denoiser."""
    n, timesteps, curvature = 40_000, 8, np.array([-3.0, 0.5, 2.0, 4.0])
    key_f, key_t, key_eps = jax.random.split(jax.random.key(1), 3)
    f = MU + S * jax.random.normal(key_f, (n, 4))
    gamma_fn = per_dim_gamma(curvature)
    values = diffusion.schedule_values(gamma_fn, diffusion.sample_times(key_t, n), timesteps)
    loss = diffusion.diffusion_loss(
        f, jax.random.normal(key_eps, f.shape), values.gamma_t, values.weight, exact_eps_fn(MU, S)
    )
    grid = np.arange(1, timesteps + 1) / timesteps
    g = lambda t: G0 + (G1 - G0) * np.expm1(curvature * t[:, None]) / np.expm1(curvature)  # noqa: E731
    snr_t, snr_s = np.exp(-g(grid)), np.exp(-g(grid - 1.0 / timesteps))
    want = 0.5 * float(np.sum((snr_s - snr_t) * mmse(snr_t, S)))
    mean, stderr = _mean_and_stderr(loss)
    assert abs(mean - want) < 4 * stderr, (mean, stderr, want)


def test_prior_and_reconstruction_terms_take_each_dimensions_endpoint():
    """Prior: sum_i 0.5 (alpha_i^2 f_i^2 + sigma_i^2 - log sigma_i^2 - 1); reconstruction:
    the discretized decoder normalised over the K bins by brute force, per dimension."""
    vocab_size = 5
    x = jnp.array([[0, 1, 2, 4], [4, 3, 2, 0]])
    f = np.asarray(diffusion.encode(x, vocab_size), np.float64)
    g1 = np.array([[-1.0, 0.5, 2.0, 6.0]])
    a2, s2 = 1.0 / (1.0 + np.exp(g1)), 1.0 / (1.0 + np.exp(-g1))
    want_prior = 0.5 * np.sum(a2 * f**2 + s2 - np.log(s2) - 1.0, axis=1)
    got = diffusion.prior_loss(jnp.asarray(f, jnp.float32), jnp.asarray(g1, jnp.float32))
    np.testing.assert_allclose(got, want_prior, rtol=1e-5)

    g0 = np.array([[-6.0, -2.0, -4.0, -1.0]])
    z_0 = np.array([[-0.7, -0.3, 0.05, 0.9], [0.8, 0.3, -0.1, -0.75]])
    centres = np.asarray(diffusion.encode(jnp.arange(vocab_size), vocab_size), np.float64)
    rescaled = z_0 / np.sqrt(1.0 / (1.0 + np.exp(g0)))  # z / alpha_0
    logits = -0.5 * (rescaled[..., None] - centres) ** 2 / np.exp(g0)[..., None]
    log_p = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))
    want_recon = -np.sum(np.take_along_axis(log_p, np.asarray(x)[..., None], -1)[..., 0], 1)
    got = diffusion.reconstruction_loss(
        x, jnp.asarray(z_0, jnp.float32), jnp.asarray(g0, jnp.float32), vocab_size
    )
    np.testing.assert_allclose(got, want_recon, rtol=1e-4)


@pytest.mark.slow  # compiles the samplers, ODE solves and a U-Net: the slow tier
def test_equal_dimensions_are_the_scalar_schedule():
    """A per-dimension schedule whose dimensions all follow one scalar schedule gives the
    scalar path's losses, samples and ODE likelihoods (the scalar case is a special case)."""
    linear = lambda t: -9.0 + 14.0 * jnp.asarray(t, jnp.float32)  # noqa: E731

    def broadcast(t):
        t = jnp.reshape(jnp.asarray(t, jnp.float32), (-1, 1, 1, 1))
        return jnp.broadcast_to(linear(t), (t.shape[0], 2, 2, 1))

    eps_fn = lambda z, g: 0.3 * z * jnp.tanh(diffusion.broadcast_batch(g, z))  # noqa: E731
    x = jax.random.randint(jax.random.key(0), (6, 2, 2, 1), 0, 17)
    for timesteps in (0, 10):
        scalar = diffusion.vdm_terms(
            x, jax.random.key(1), linear, eps_fn, vocab_size=17, timesteps=timesteps
        )
        per_dim = diffusion.vdm_terms(
            x, jax.random.key(1), broadcast, eps_fn, vocab_size=17, timesteps=timesteps
        )
        for name in scalar:
            np.testing.assert_allclose(per_dim[name], scalar[name], rtol=2e-5, err_msg=name)

    def both(run):  # run(gamma_fn) compiled once per schedule (diffrax is slow to trace)
        return [jax.jit(lambda g=g: run(g))() for g in (linear, broadcast)]

    for sampler in sorted(samplers.SAMPLER_NAMES):
        opts = dict(num_steps=6, sampler=sampler, tolerance=1e-4)
        a, b = both(
            lambda g, o=opts: samplers.sample_latent(jax.random.key(2), g, eps_fn, x.shape, **o)
        )
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=sampler)
    for dequantization in sorted(ode_likelihood.DEQUANTIZATIONS):
        opts = dict(vocab_size=17, dequantization=dequantization, divergence="exact")
        opts.update(rtol=1e-4, atol=1e-4)
        a, b = both(
            lambda g, o=opts: ode_likelihood.ode_bpd(jax.random.key(3), x, g, eps_fn, **o).bpd
        )
        np.testing.assert_allclose(b, a, rtol=1e-4, err_msg=dequantization)


# --------------------------------------------------------------------------------------
# Samplers and the ODE likelihood with a per-dimension schedule, exact denoiser
# --------------------------------------------------------------------------------------

CURVATURE = np.array([-3.0, 0.5, 2.0, 4.0])


def _marginal(gamma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of z_t = alpha x + sigma eps per dimension."""
    a2, s2 = 1.0 / (1.0 + np.exp(gamma)), 1.0 / (1.0 + np.exp(-gamma))
    return np.sqrt(a2) * MU, a2 * S**2 + s2


@pytest.mark.slow  # 1,000 steps of each sampler
@pytest.mark.parametrize("sampler", sorted(samplers.SAMPLER_NAMES))
def test_samplers_reach_each_dimensions_data_marginal(sampler):
    """z_0 ~ N(alpha_0,i mu_i, alpha_0,i^2 s_i^2 + sigma_0,i^2) in every dimension."""
    n = 4000
    z_0 = samplers.sample_latent(
        jax.random.key(0),
        per_dim_gamma(CURVATURE),
        exact_eps_fn(MU, S),
        (n, 4),
        num_steps=1000,
        sampler=sampler,
        tolerance=1e-5,
    )
    z_0 = np.asarray(z_0, np.float64)
    mean, var = _marginal(G0)
    assert np.all(np.abs(z_0.mean(0) - mean) < 5 * np.sqrt(var / n))
    np.testing.assert_allclose(z_0.var(0), var, rtol=0.07)


@pytest.mark.parametrize(("sampler", "order"), [("ddim", 1), ("dpm_solver_2m", 2)])
def test_deterministic_samplers_keep_their_order_per_dimension(sampler, order):
    """Each dimension's flow is z_0 = m_0 + sqrt(v_0 / v_1) (z_1 - m_1); halving the step
    divides the error by 2^order when each dimension steps in its own lambda."""
    z_1 = jax.random.normal(jax.random.key(0), (64, 4))
    (m0, v0), (m1, v1) = _marginal(G0), _marginal(G1)
    exact = m0 + np.sqrt(v0 / v1) * (np.asarray(z_1, np.float64) - m1)
    errors = []
    for steps in (40, 80, 160, 320):
        z_0 = samplers.sample_latent(
            jax.random.key(1),
            per_dim_gamma(CURVATURE),
            exact_eps_fn(MU, S),
            z_1.shape,
            num_steps=steps,
            sampler=sampler,
            z_1=z_1,
        )
        errors.append(np.abs(np.asarray(z_0, np.float64) - exact).max())
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    np.testing.assert_allclose(orders, order, atol=0.15)


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_ode_likelihood_is_the_per_dimension_gaussian_density(divergence):
    """With the exact denoiser and q(z_1) as the prior, the ODE's log-density at t = 0 is
    sum_i log N(y_i; m_0,i, v_0,i): the divergence is taken per dimension."""
    (m0, v0), (m1, v1) = _marginal(G0), _marginal(G1)
    y = (m0 + np.sqrt(v0) * np.random.default_rng(0).normal(size=(16, 4))).astype(np.float32)

    def log_q1(z):
        return -0.5 * jnp.sum((z - m1) ** 2 / v1 + jnp.log(2 * jnp.pi * v1), axis=-1)

    # Hutchinson: 64 copies of the points in one solve, each row with its own probe (the
    # rows do not interact, and the trajectory does not depend on the probe).
    copies = 1 if divergence == "exact" else 64
    log_prob = ode_likelihood.ode_log_likelihood(
        jax.random.key(0),
        jnp.asarray(np.tile(y, (copies, 1))),
        per_dim_gamma(CURVATURE),
        exact_eps_fn(MU, S),
        divergence=divergence,
        probe="gaussian",  # Rademacher probes are exact on this diagonal Jacobian
        rtol=1e-5,
        atol=1e-5,
        log_prior=log_q1,
    ).log_prob
    draws = np.asarray(log_prob, np.float64).reshape(copies, len(y))
    want = -0.5 * np.sum((y - m0) ** 2 / v0 + np.log(2 * np.pi * v0), axis=-1)
    if divergence == "exact":
        np.testing.assert_allclose(draws[0], want, atol=2e-3)
    else:  # unbiased: the mean over probes reaches the exact value
        stderr = draws.std(0, ddof=1) / math.sqrt(copies)
        assert np.all(stderr > 0)
        assert np.all(np.abs(draws.mean(0) - want) < 4 * stderr + 2e-3)


# --------------------------------------------------------------------------------------
# A restricted denoiser: per-dimension schedules beat every scalar one
# --------------------------------------------------------------------------------------

PRIOR_STD = 0.3  # f_1 = f_2 = f ~ N(0, 0.3^2), well inside (-1, 1)
ENDS = (-8.0, 4.0)
VOCAB = 2**12  # f = encode(x) is then the Gaussian to within 5e-4 (std 0.3)


def _restricted_eps_fn(z: jax.Array, gamma: jax.Array) -> jax.Array:
    """Dimension 1 predicts from z_1 alone, dimension 2 from (z_1, z_2): both exact posterior
    means under that restriction. z [B, 2], gamma [B or 1, 2]."""
    gamma = jnp.broadcast_to(gamma, z.shape)
    snr = jnp.exp(-gamma)
    y = z / jnp.sqrt(jax.nn.sigmoid(gamma))  # sqrt(snr) f + eps
    prec = 1.0 / PRIOR_STD**2
    f_1 = jnp.sqrt(snr[:, 0]) * y[:, 0] / (prec + snr[:, 0])
    f_12 = (jnp.sqrt(snr[:, 0]) * y[:, 0] + jnp.sqrt(snr[:, 1]) * y[:, 1]) / (
        prec + snr[:, 0] + snr[:, 1]
    )
    return jnp.stack([y[:, 0] - jnp.sqrt(snr[:, 0]) * f_1, y[:, 1] - jnp.sqrt(snr[:, 1]) * f_12], 1)


def _exact_eps_fn(z: jax.Array, gamma: jax.Array) -> jax.Array:
    """Both dimensions from (z_1, z_2): the unrestricted posterior mean."""
    gamma = jnp.broadcast_to(gamma, z.shape)
    snr = jnp.exp(-gamma)
    y = z / jnp.sqrt(jax.nn.sigmoid(gamma))
    f_12 = jnp.sum(jnp.sqrt(snr) * y, 1) / (1.0 / PRIOR_STD**2 + jnp.sum(snr, 1))
    return y - jnp.sqrt(snr) * f_12[:, None]


def _gamma_np(curvature: np.ndarray, t: np.ndarray) -> np.ndarray:
    """[N] times -> [N, 2]; curvature 0 is the straight line."""
    k = np.asarray(curvature, np.float64)
    lo, hi = ENDS
    safe = np.where(k == 0, 1.0, k)
    shape = np.where(k == 0, t[:, None], np.expm1(safe * t[:, None]) / np.expm1(safe))
    return lo + (hi - lo) * shape


def _quadrature_nats(curvature, exact: bool = False) -> float:
    """0.5 integral_0^1 [g_1' mmse_1 + g_2' mmse_2] dt by Gauss-Legendre (400 nodes), with
    mmse_1 = v_1 / (1/s^2 + v_1) (from z_1 alone) or v_1 / (1/s^2 + v_1 + v_2) (exact), and
    mmse_2 = v_2 / (1/s^2 + v_1 + v_2): the variances of eps_i given what dimension i sees."""
    nodes, weights = np.polynomial.legendre.leggauss(400)
    t, w = 0.5 * (nodes + 1.0), 0.5 * weights
    h = 1e-6
    g = _gamma_np(curvature, t)
    dg = (_gamma_np(curvature, t + h) - _gamma_np(curvature, t - h)) / (2 * h)
    v = np.exp(-g)
    prec = 1.0 / PRIOR_STD**2
    mmse_1 = v[:, 0] / (prec + (v[:, 0] + v[:, 1] if exact else v[:, 0]))
    mmse_2 = v[:, 1] / (prec + v[:, 0] + v[:, 1])
    return float(0.5 * np.sum(w * (dg[:, 0] * mmse_1 + dg[:, 1] * mmse_2)))


def _schedule_fn(params, t):
    k = params["curvature"]
    t = jnp.reshape(jnp.asarray(t, jnp.float32), (-1, 1))
    lo, hi = ENDS
    return lo + (hi - lo) * jnp.expm1(k * t) / jnp.expm1(k)


def _correlated_data(key: jax.Array, n: int) -> jax.Array:
    f = PRIOR_STD * jax.random.normal(key, (n, 1))
    x = jnp.clip(jnp.round((f + 1.0) * VOCAB / 2.0 - 0.5), 0, VOCAB - 1).astype(jnp.int32)
    return jnp.concatenate([x, x], axis=1)  # [n, 2]: the same value in both dimensions


def _loss_and_curvature_grad(curvature, eps_fn, seeds=8, n=8192):
    """Monte Carlo diffusion term (nats per image) and d(mean negative ELBO, bits/dim) /
    d curvature through :func:`vdm_jax.model.loss_and_grads`, one row per seed."""
    cfg = model.LossConfig(vocab_size=VOCAB)
    params = {"curvature": jnp.asarray(curvature, jnp.float32)}
    step = jax.jit(
        lambda key: model.loss_and_grads(
            _schedule_fn, params, lambda p, z, g: eps_fn(z, g), {}, _correlated_data(key, n),
            jax.random.fold_in(key, 1), cfg,
        )
    )  # fmt: skip
    losses, grads = [], []
    for seed in range(seeds):
        (_, terms), (schedule_grads, _) = step(jax.random.key(seed))
        losses.append(np.asarray(terms["diffusion"]) * 2 * math.log(2.0))
        grads.append(np.asarray(schedule_grads["curvature"]))
    return np.concatenate(losses), np.stack(grads)


def test_every_scalar_schedule_gives_the_same_loss_and_per_dimension_ones_do_better():
    """Quadrature: scalar schedules (any interior, same endpoints) all follow the diagonal
    and agree; the per-dimension schedule that noises dimension 2 first, while dimension 1 is
    still clean, is strictly lower; the exact denoiser is path-independent (I-MMSE).
    Monte Carlo through the loss agrees with each quadrature."""
    scalar = [_quadrature_nats([k, k]) for k in (0.0, 3.0, -4.0)]
    np.testing.assert_allclose(scalar, scalar[0], rtol=1e-6)
    better = _quadrature_nats([6.0, -6.0])  # dimension 1 late, dimension 2 early
    worse = _quadrature_nats([-6.0, 6.0])
    # Measured: 3.144, 4.368 and 5.592 nats; the exact denoiser 3.142 on every path.
    assert better < scalar[0] - 1.0 < worse - 2.0
    exact = [_quadrature_nats(k, exact=True) for k in ([0.0, 0.0], [6.0, -6.0], [-6.0, 6.0])]
    np.testing.assert_allclose(exact, exact[0], rtol=1e-6)
    for curvature, want in (([3.0, 3.0], scalar[1]), ([6.0, -6.0], better)):
        losses, _ = _loss_and_curvature_grad(curvature, _restricted_eps_fn, seeds=2)
        mean, stderr = _mean_and_stderr(losses)
        assert abs(mean - want) < 4 * stderr, (curvature, mean, stderr, want)


@pytest.mark.slow
def test_the_elbo_gradient_moves_a_per_dimension_interior_unless_the_denoiser_is_exact():
    """What training the schedule means here: with a restricted denoiser the ELBO gradient
    of the interior matches the central difference of the quadrature (nonzero), so the
    interior must be trained on the ELBO; with the exact denoiser it vanishes (the
    endpoints-only invariance still holds), and the variance gradient would be free to act."""
    curvature = np.array([2.0, -2.0])
    to_bpd = 1.0 / (2 * math.log(2.0))
    for eps_fn, exact in ((_restricted_eps_fn, False), (_exact_eps_fn, True)):
        _, grads = _loss_and_curvature_grad(curvature, eps_fn)
        mean, stderr = grads.mean(0), grads.std(0, ddof=1) / math.sqrt(len(grads))
        h = 1e-3
        quad = lambda k, exact=exact: _quadrature_nats(k, exact)  # noqa: E731
        want = to_bpd * np.array(
            [(quad(curvature + h * e) - quad(curvature - h * e)) / (2 * h) for e in np.eye(2)]
        )
        assert np.all(np.abs(mean - want) < 4 * stderr + 1e-4), (exact, mean, stderr, want)
        if not exact:
            assert np.all(np.abs(want) > 5 * stderr)


def test_the_time_warp_leaves_the_elbo_and_trains_on_the_variance():
    """gamma_i(t) = path_i(u(t)) with a shared warp u(t) = t^p: the ELBO gradient of p is
    zero (the speed along the paths cannot change the continuous-time bound) while that of
    the paths' curvature is not; ``schedule_grad="variance"`` takes p's gradient from the
    second moment of the estimate and the curvature's from the ELBO."""

    def warped(params, t):
        u = jnp.reshape(jnp.asarray(t, jnp.float32), (-1,)) ** params["warp_linear"]
        return _schedule_fn(params, u)

    n, seeds = 8192, 8
    params = {"curvature": jnp.array([2.0, -2.0]), "warp_linear": jnp.array(1.7)}
    grads = {"elbo": [], "variance": []}
    for mode in grads:
        cfg = model.LossConfig(
            vocab_size=VOCAB,
            schedule_grad=mode,
            variance_params=frozenset({"warp_linear"}),
            per_dimension=True,
        )
        step = jax.jit(
            lambda key, cfg=cfg: model.loss_and_grads(
                warped, params, lambda p, z, g: _restricted_eps_fn(z, g), {},
                _correlated_data(key, n), jax.random.fold_in(key, 1), cfg,
            )[1][0]
        )  # fmt: skip
        grads[mode] = [step(jax.random.key(seed)) for seed in range(seeds)]
    elbo = {k: np.stack([g[k] for g in grads["elbo"]]) for k in params}
    warp_mean = elbo["warp_linear"].mean()
    warp_stderr = elbo["warp_linear"].std(ddof=1) / math.sqrt(seeds)
    assert abs(warp_mean) < 4 * warp_stderr + 1e-4, (warp_mean, warp_stderr)
    curvature_stderr = elbo["curvature"].std(0, ddof=1) / math.sqrt(seeds)
    assert np.all(np.abs(elbo["curvature"].mean(0)) > 5 * curvature_stderr)
    for g_elbo, g_var in zip(grads["elbo"], grads["variance"], strict=True):
        np.testing.assert_allclose(g_var["curvature"], g_elbo["curvature"], rtol=1e-5)
        assert not np.allclose(g_var["warp_linear"], g_elbo["warp_linear"])


# --------------------------------------------------------------------------------------
# The schedule modules, the auxiliary latent, the network and the config checks
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("interior", schedules.PER_DIMENSION_INTERIORS)
def test_adaptive_schedules_are_increasing_with_fixed_endpoints_for_any_input(interior):
    """Random parameters and contexts: every dimension strictly increasing in t, gamma(0)
    and gamma(1) exactly the per-dimension endpoint parameters."""
    module = schedules.PerDimensionSchedule((3, 2, 1), interior=interior, width=8)
    t = jnp.linspace(0.0, 1.0, 257)
    context = jax.random.normal(jax.random.key(1), (5, 4)) * 3.0
    params = module.init(jax.random.key(0), t[:5], context)
    for seed in range(3):
        key = jax.random.key(seed)
        noisy = jax.tree.map(lambda p, k=key: p + 2.0 * jax.random.normal(k, p.shape), params)
        gamma = jax.vmap(lambda u, p=noisy: module.apply(p, u, context))(t)  # [257, 5, 3, 2, 1]
        assert np.all(np.diff(np.asarray(gamma), axis=0) > 0)
        p = noisy["params"]
        g0 = np.asarray(p["gamma_min"] + p["gamma_min_offset"]).reshape(3, 2, 1)
        np.testing.assert_allclose(gamma[0], np.broadcast_to(g0, gamma[0].shape), atol=1e-4)
        log_range = p["log_gamma_range"] + p["log_gamma_range_offset"]
        g1 = g0 + np.exp(np.asarray(log_range)).reshape(3, 2, 1)
        np.testing.assert_allclose(gamma[-1], np.broadcast_to(g1, gamma[-1].shape), rtol=1e-4)
        assert not np.allclose(gamma[128, 0], gamma[128, 1])  # the input moves the interior


def test_gaussian_kl_matches_its_monte_carlo_definition():
    mean = jnp.array([[0.5, -1.0, 0.0], [2.0, 0.3, -0.7]])
    log_var = jnp.array([[0.0, -1.0, 0.7], [-2.0, 0.2, 1.0]])
    c = jax.vmap(lambda k: latents.sample_posterior(k, mean, log_var))(
        jax.random.split(jax.random.key(0), 200_000)
    )
    log_q = -0.5 * jnp.sum((c - mean) ** 2 / jnp.exp(log_var) + log_var + math.log(2 * math.pi), -1)
    log_p = -0.5 * jnp.sum(c**2 + math.log(2 * math.pi), -1)
    mc = np.asarray(log_q - log_p, np.float64)
    want = np.asarray(latents.gaussian_kl(mean, log_var))
    np.testing.assert_allclose(mc.mean(0), want, atol=4 * mc.std(0).max() / math.sqrt(len(mc)))
    np.testing.assert_allclose(latents.gaussian_kl(jnp.zeros((1, 3)), jnp.zeros((1, 3))), [0.0])


@pytest.mark.slow  # compiles the samplers, ODE solves and a U-Net: the slow tier
def test_an_adaptive_vdm_starts_input_independent_and_trains_every_part():
    """At initialisation q(c | x) = p(c) (KL 0) and the schedule ignores c; one gradient
    reaches the encoder, the schedule and the network, and the KL is part of the loss."""
    spec_config = digits_mulan.get_config("adaptive")
    spec_config.model.num_blocks, spec_config.model.channels = 1, 16
    from vdm_jax.runner import specs

    spec = specs.from_section(specs.ModelSpec, spec_config.model)
    kind = schedules.SCHEDULES[spec.schedule]
    schedule = kind.build(kind.settings.from_section(spec_config.model), (8, 8, 1))
    vdm = spec.build(schedule, 0)
    x = jax.random.randint(jax.random.key(0), (4, 8, 8, 1), 0, 17)
    init = jax.jit(lambda key: vdm.init(key, jnp.zeros((4, 8, 8, 1)), jnp.zeros((4,))))
    params = init(jax.random.key(1))["params"]
    assert set(params) == {"schedule", "score_net", "encoder"}
    context, kl = model.posterior_context(vdm, params, x, 17, jax.random.key(2))
    np.testing.assert_allclose(kl, 0.0, atol=1e-6)
    g = model.inference_fns(vdm, params, context=context)[0](jnp.full((4,), 0.5))
    np.testing.assert_allclose(g, jnp.broadcast_to(g[:1], g.shape), rtol=1e-6)
    cfg = model.LossConfig(vocab_size=17)
    loss_and_grads = jax.jit(
        lambda p: model.vdm_loss_and_grads(vdm, p, {"image": x}, jax.random.key(3), cfg)
    )
    (loss, terms), _ = loss_and_grads(params)
    assert set(terms) == {"prior", "recon", "diffusion", "latent"}
    total = sum(np.asarray(v) for v in terms.values()).mean()
    np.testing.assert_allclose(loss, total, rtol=1e-6)
    # At initialisation the zero heads stop every path into the encoder; a step later they
    # are open. Moved parameters stand in for that step.
    key = jax.random.key(4)
    moved = jax.tree.map(lambda p: p + 0.01 * jax.random.normal(key, p.shape), params)
    _, grads = loss_and_grads(moved)
    for part in ("schedule", "score_net", "encoder"):
        norm = sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(grads[part]))
        assert norm > 0, part


def test_the_network_sees_a_per_dimension_gamma_and_the_context():
    net = unet.ScoreUNet(num_blocks=1, channels=16, num_groups=4, fourier_features=False)
    z = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
    gamma = jnp.linspace(-5.0, 2.0, 32).reshape(2, 4, 4, 1)
    context = jnp.ones((2, 3))
    params = net.init(jax.random.key(1), z, gamma, train=False, context=context)["params"]
    assert params["conv_in"]["kernel"].shape[2] == 2  # z and its gamma map
    assert params["context_dense"]["kernel"].shape == (3, 64)
    out = net.apply({"params": params}, z, gamma, train=False, context=context)
    assert out.shape == z.shape


def _validate(**overrides):
    config = digits_mulan.get_config("per_dim")
    for field, value in overrides.items():
        section, name = field.split(".")
        config[section][name] = value
    return config_validation.validate(config, num_devices=1, process_count=1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model.weighting": "sigmoid"}, "weighting='sigmoid': a per-dimension"),
        ({"model.schedule": "monotone_net", "model.latent_dim": 8}, "only a per-dimension"),
        ({"model.schedule_per": "row"}, "schedule_per"),
        (
            {"model.latent_dim": 8, "eval.method": "ode", "eval.ode_dequant_samples": 2},
            "draws one latent per image",
        ),
    ],
)
def test_config_checks_refuse_what_a_per_dimension_schedule_cannot_do(overrides, message):
    with pytest.raises(config_validation.ConfigError, match=message):
        _validate(**overrides)


def test_every_digits_mulan_variant_is_valid():
    for variant in digits_mulan.VARIANTS:
        config_validation.validate(digits_mulan.get_config(variant), num_devices=1, process_count=1)
    with pytest.raises(ValueError, match="unknown variant"):
        digits_mulan.get_config("cosine")
