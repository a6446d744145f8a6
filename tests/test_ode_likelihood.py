"""Probability-flow ODE likelihoods and their dequantized bounds against closed forms.

Gaussian data make everything exact: the denoiser ``E[eps | z_t]`` is linear in ``z_t``, the
probability-flow map is affine, and the model's density at t = 0 (N(0, I) carried back from
t = 1) is a Gaussian written down below in numpy, independently of the code under test.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian import exact_eps_fn
from scipy.special import logsumexp
from scipy.stats import norm

from vdm_jax import elbo_estimators, ode_likelihood

GAMMA_0, GAMMA_1 = -13.3, 5.0


def linear(t):
    return GAMMA_0 + (GAMMA_1 - GAMMA_0) * t


def _alpha2_sigma2(gamma: float) -> tuple[float, float]:
    return 1.0 / (1.0 + math.exp(gamma)), 1.0 / (1.0 + math.exp(-gamma))


# ---- correlated Gaussian data x ~ N(MU, SIGMA): a Jacobian of eps_hat with off-diagonals ----

_D = 3
_ROT, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(_D, _D)))
_EIG = np.array([0.05, 0.3, 1.0]) ** 2  # eigenvalues of SIGMA
_MU = np.array([0.3, -0.2, 0.1])


def correlated_eps_fn(z, gamma_t):
    """E[eps | z_t] = sigma V^-1 (z - alpha mu) with V = alpha^2 SIGMA + sigma^2 I, [B, D]."""
    g = gamma_t[:, None]
    a2, s2 = jax.nn.sigmoid(-g), jax.nn.sigmoid(g)
    w = (z - jnp.sqrt(a2) * _MU) @ _ROT
    return jnp.sqrt(s2) * (w / (a2 * _EIG + s2)) @ _ROT.T


def _marginal(gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """q(z_t): mean [D] and eigenvalues [D] of the covariance (eigenvectors: _ROT)."""
    a2, s2 = _alpha2_sigma2(gamma)
    return math.sqrt(a2) * _MU, a2 * _EIG + s2


def _gauss_logpdf(y: np.ndarray, mean: np.ndarray, eig: np.ndarray) -> np.ndarray:
    """log N(y; mean, _ROT diag(eig) _ROT^T), [B, D] -> [B]."""
    w = (y - mean) @ _ROT
    return -0.5 * np.sum(w**2 / eig + np.log(2 * np.pi * eig), axis=-1)


def _model_density_at_0() -> tuple[np.ndarray, np.ndarray]:
    """Mean and eigenvalues of N(0, I) at t=1 carried to t=0 by the exact flow.

    Per eigendirection the flow is z_0 - m_0 = sqrt(v_0 / v_1) (z_1 - m_1), so
    z_1 ~ N(0, I) lands on N(m_0 - A m_1, A^2) with A = ROT diag(sqrt(v_0 / v_1)) ROT^T.
    """
    m0, v0 = _marginal(GAMMA_0)
    m1, v1 = _marginal(GAMMA_1)
    a = (_ROT * np.sqrt(v0 / v1)) @ _ROT.T
    return m0 - a @ m1, v0 / v1


@pytest.fixture(scope="module")
def points():
    """Eight points from q(z_0), including the tails."""
    m0, v0 = _marginal(GAMMA_0)
    w = np.random.default_rng(1).normal(size=(8, _D)) * np.sqrt(v0) * 1.5
    return (m0 + w @ _ROT.T).astype(np.float32)


def _ode_ll(divergence, rtol, log_prior=None):
    return jax.jit(
        lambda key, y: ode_likelihood.ode_log_likelihood(
            key,
            y,
            linear,
            correlated_eps_fn,
            divergence=divergence,
            rtol=rtol,
            atol=rtol,
            log_prior=log_prior,
        )
    )


def test_ode_log_likelihood_matches_the_closed_form_model_density(points):
    """Exact divergence, rtol = atol = 1e-5: |error| ~ 1e-4 nats at NFE 93 (D = 3).

    Measured: max error 6e-2 / 2e-3 / 1e-4 / 9e-6 nats at tolerances 1e-3 / 1e-4 / 1e-5 /
    1e-6 with NFE 45 / 63 / 93 / 141.
    """
    mean, eig = _model_density_at_0()
    expected = _gauss_logpdf(points.astype(np.float64), mean, eig)
    errors = {}
    for tol in (1e-4, 1e-5):
        out = _ode_ll("exact", tol)(jax.random.key(0), points)
        assert bool(out.success)
        assert float(out.rtol) == pytest.approx(tol) and float(out.atol) == pytest.approx(tol)
        errors[tol] = np.max(np.abs(np.asarray(out.log_prob) - expected))
    assert errors[1e-5] < 1e-3
    assert errors[1e-5] < errors[1e-4]
    assert 20 < int(out.num_function_evals) < 300


def test_with_the_exact_q_z1_prior_the_ode_recovers_q_z0(points):
    """N(0, I) vs q(z_1) differ by ~0.05 nats here; with q(z_1) as prior we get q(z_0)."""
    m1, v1 = _marginal(GAMMA_1)
    m0, v0 = _marginal(GAMMA_0)

    def log_q1(z):
        w = (z - m1) @ _ROT
        return -0.5 * jnp.sum(w**2 / v1 + jnp.log(2 * jnp.pi * v1), axis=-1)

    out = _ode_ll("exact", 1e-5, log_q1)(jax.random.key(0), points)
    expected = _gauss_logpdf(points.astype(np.float64), m0, v0)
    np.testing.assert_allclose(np.asarray(out.log_prob), expected, atol=1e-3)
    mean, eig = _model_density_at_0()
    gap = np.abs(_gauss_logpdf(points.astype(np.float64), mean, eig) - expected)
    assert np.max(gap) > 0.02  # the two priors are distinguishable at this accuracy


def test_hutchinson_is_unbiased_for_the_exact_log_likelihood(points):
    """One point, 256 Rademacher probes (one per batch row, fixed through each solve).

    Measured: per-probe standard deviation ~0.96 nats (D = 3, strongly correlated data);
    the mean is within ~1 standard error of the exact value.
    """
    batch = 256
    y = np.repeat(points[:1], batch, axis=0)
    exact = _ode_ll("exact", 1e-5)(jax.random.key(0), points[:1]).log_prob[0]
    est = np.asarray(_ode_ll("hutchinson", 1e-5)(jax.random.key(1), y).log_prob, np.float64)
    stderr = est.std(ddof=1) / math.sqrt(batch)
    assert est.std() > 0.1  # the Jacobian has off-diagonals: the estimator is not trivial
    assert abs(est.mean() - float(exact)) < 4 * stderr


def test_reported_nfe_counts_every_call_of_the_network(points):
    calls = []

    def counted_eps_fn(z, gamma_t):
        jax.debug.callback(lambda: calls.append(1))
        return correlated_eps_fn(z, gamma_t)

    out = jax.jit(
        lambda y: ode_likelihood.ode_log_likelihood(
            jax.random.key(0), y, linear, counted_eps_fn, divergence="hutchinson"
        )
    )(points)
    jax.block_until_ready(out)
    jax.effects_barrier()
    assert len(calls) == int(out.num_function_evals) == 1 + 6 * int(out.num_steps)


# ---- the derivation of the drift, independent of the likelihood code ----


def test_probability_flow_transports_the_marginals():
    """Samples of q(z_1) pushed to t=0 with a fixed-step RK4 on the drift land on q(z_0).

    For Gaussian data the flow is affine: z_0 = m_0 + sqrt(v_0 / v_1) (z_1 - m_1); checked per
    sample and by the first two moments. The adaptive solver (:func:`probability_flow`)
    agrees with the same map.
    """
    mu, s, dims, n = 0.3, 0.5, 2, 4000
    eps_fn = exact_eps_fn(mu, s)
    a0, s0 = _alpha2_sigma2(GAMMA_0)
    a1, s1 = _alpha2_sigma2(GAMMA_1)
    m0, v0 = math.sqrt(a0) * mu, a0 * s**2 + s0
    m1, v1 = math.sqrt(a1) * mu, a1 * s**2 + s1
    z1 = m1 + math.sqrt(v1) * np.random.default_rng(2).normal(size=(n, dims))
    z1 = jnp.asarray(z1, jnp.float32)

    @jax.jit
    def rk4(z):
        steps = 400
        h = -1.0 / steps

        def drift(t, z):
            return ode_likelihood.probability_flow_drift(linear, eps_fn, t, z)

        def body(i, z):
            t = 1.0 + i * h
            k1 = drift(t, z)
            k2 = drift(t + h / 2, z + h / 2 * k1)
            k3 = drift(t + h / 2, z + h / 2 * k2)
            k4 = drift(t + h, z + h * k3)
            return z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)

        return jax.lax.fori_loop(0, steps, body, z)

    z0 = np.asarray(rk4(z1), np.float64)
    expected = m0 + math.sqrt(v0 / v1) * (np.asarray(z1, np.float64) - m1)
    np.testing.assert_allclose(z0, expected, atol=1e-4)
    assert abs(z0.mean() - m0) < 4 * math.sqrt(v0 / (n * dims))
    assert z0.var() == pytest.approx(v0, rel=0.05)

    flow = jax.jit(
        lambda z: ode_likelihood.probability_flow(z, linear, eps_fn, t_start=1.0, t_end=0.0)
    )(z1[:16])
    assert bool(flow.success)
    np.testing.assert_allclose(np.asarray(flow.z), expected[:16], atol=1e-4)


# ---- dequantization ----


def _exact_discrete_and_bound(x, mu, s, vocab_size):
    """Per example: exact -log P(x) and the exact bound E_u[-log p_V(x + u)], nats.

    The model's density of y = z_0 / alpha_0 is N(c, r^2) per dimension (the exact flow of
    N(0, 1) from t = 1), so P(x) is a product of normal-CDF differences over the bins
    [2x/K - 1, 2(x+1)/K - 1), and E_u[-log p_V] = E_{y ~ U(bin)}[-log N(y; c, r^2)]
    + log(K/2) in closed form.
    """
    a0, s0 = _alpha2_sigma2(GAMMA_0)
    a1, s1 = _alpha2_sigma2(GAMMA_1)
    m0, v0 = math.sqrt(a0) * mu, a0 * s**2 + s0
    m1, v1 = math.sqrt(a1) * mu, a1 * s**2 + s1
    c = (m0 - math.sqrt(v0 / v1) * m1) / math.sqrt(a0)
    r = math.sqrt(v0 / v1 / a0)
    lo = 2.0 * x / vocab_size - 1.0
    hi = lo + 2.0 / vocab_size
    nll = -np.log(norm.cdf((hi - c) / r) - norm.cdf((lo - c) / r)).sum(-1)
    second_moment = ((hi - c) ** 3 - (lo - c) ** 3) / (3 * (hi - lo))
    bound = (0.5 * np.log(2 * np.pi * r**2) + second_moment / (2 * r**2)).sum(-1)
    return nll, bound + x.shape[-1] * math.log(vocab_size / 2)


@pytest.mark.parametrize(
    ("s", "x", "max_gap_bits"),
    [
        (0.5, [[3, 4], [0, 7], [5, 2], [4, 4]], 0.1),
        (0.02, [[4, 4], [3, 4], [4, 5], [5, 3]], None),
    ],
)
def test_dequantized_bpd_bounds_the_discrete_nll(s, x, max_gap_bits):
    """ode_bpd matches the closed-form bound, which is >= the exact discrete NLL.

    s = 0.5: the density is nearly flat across a bin (width 0.25); measured gap between the
    bound and -log2 P(x) / D: 0.0001 to 0.045 bits/dim (largest in the tail bin x = 0), and
    the 64-sample importance-weighted bound is within 0.01 bits of -log2 P(x) / D.
    s = 0.02: the density is narrower than a bin and uniform dequantization pays for the
    empty part of the bin (gaps of 8 to 87 bits/dim), but the bound holds.
    """
    mu, vocab_size, samples = 0.1, 8, 64
    x = np.array(x)
    dims = x.shape[1]
    out = jax.jit(
        lambda key, x: ode_likelihood.ode_bpd(
            key,
            x,
            linear,
            exact_eps_fn(mu, s),
            vocab_size=vocab_size,
            num_dequant_samples=samples,
            divergence="exact",
        )
    )(jax.random.key(3), jnp.asarray(x))
    assert bool(out.success)
    to_bits = 1.0 / (dims * math.log(2))
    nll, bound = _exact_discrete_and_bound(x.astype(np.float64), mu, s, vocab_size)
    bpd = np.asarray(out.bpd, np.float64)
    stderr = np.asarray(out.bpd_stderr, np.float64)
    assert np.all(np.abs(bpd - bound * to_bits) < 4 * stderr + 1e-3)
    assert np.all(bound >= nll)
    assert np.all(np.asarray(out.bpd_importance_weighted) <= bpd + 1e-6)
    if max_gap_bits is not None:
        assert np.all((bound - nll) * to_bits < max_gap_bits)
        iw = np.asarray(out.bpd_importance_weighted, np.float64)
        np.testing.assert_allclose(iw, nll * to_bits, atol=0.02)
    else:
        assert np.all((bound - nll) * to_bits > 0.5)


def test_dequantization_constant():
    """Uniform p_Y = 1/2 on [-1, 1]^D is the uniform discrete model: log2 K bits per dim."""
    dims, vocab_size = 5, 256
    bits = (dims * math.log(2.0) + ode_likelihood.dequantization_log_jacobian(dims, vocab_size)) / (
        dims * math.log(2.0)
    )
    assert bits == pytest.approx(8.0)


# ---- discrete data: point masses on a 4 x 4 grid, with their exact denoiser ----
#
# x takes 16 values in {0..3}^2 with probabilities _PI; q(z_t) is a mixture of 16 Gaussians
# and E[x | z_t] a softmax over them. Here the ODE model density at t = 0 and the discrete
# likelihood of the decoder model are written down (numpy, Gauss-Hermite quadrature)
# independently of the code under test.

_MIX_K = 4
_MIX_X = np.stack(np.meshgrid(np.arange(_MIX_K), np.arange(_MIX_K), indexing="ij"), -1).reshape(
    -1, 2
)
_MIX_F = 2.0 * (_MIX_X + 0.5) / _MIX_K - 1.0  # bin centres, [16, 2]
_MIX_PI = np.random.default_rng(4).dirichlet(np.full(len(_MIX_X), 0.7))
_MIX_GAMMA_1 = 16.0  # alpha_1 = 3e-4: log q(z_1) is log N(z_1; 0, I) to ~2e-4 nats


def _mix_schedule(gamma_0):
    return lambda t: gamma_0 + (_MIX_GAMMA_1 - gamma_0) * t


def mixture_eps_fn(z, gamma_t):
    """E[eps | z_t] for the 16-point data, [B, 2], [B] -> [B, 2]."""
    g = gamma_t[:, None]
    alpha, sigma2 = jnp.sqrt(jax.nn.sigmoid(-g)), jax.nn.sigmoid(g)
    sq = jnp.sum(jnp.square(z[:, None, :] - alpha[..., None] * _MIX_F), axis=-1)  # [B, 16]
    weights = jax.nn.softmax(jnp.log(_MIX_PI) - 0.5 * sq / sigma2, axis=-1)
    return (z - alpha * (weights @ _MIX_F)) / jnp.sqrt(sigma2)


def _mix_log_q(z, gamma: float, xp=np):
    """log q(z_t) of the mixture, [N, 2] -> [N]: float64 numpy, or ``xp=jnp`` (traceable)."""
    a2, s2 = _alpha2_sigma2(gamma)
    sq = xp.sum((z[:, None, :] - math.sqrt(a2) * _MIX_F) ** 2, axis=-1)
    comp = xp.log(_MIX_PI) - 0.5 * sq / s2 - math.log(2 * math.pi * s2)
    top = comp.max(axis=1, keepdims=True)
    return (top + xp.log(xp.exp(comp - top).sum(axis=1, keepdims=True)))[:, 0]


def _decoder_log_prob(x: np.ndarray, z: np.ndarray, gamma_0: float) -> np.ndarray:
    """log p(x | z_0) of the discretized decoder, x [2], z [N, 2] -> [N], float64."""
    a2, _ = _alpha2_sigma2(gamma_0)
    centres = 2.0 * (np.arange(_MIX_K) + 0.5) / _MIX_K - 1.0
    logits = -0.5 * (z[..., None] / math.sqrt(a2) - centres) ** 2 / math.exp(gamma_0)
    logits -= logits.max(axis=-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    return np.sum(np.take_along_axis(log_probs, x[None, :, None], axis=-1)[..., 0], axis=-1)


def _index_of(x: np.ndarray) -> int:
    """Index of the data value x in _MIX_X."""
    return int(np.flatnonzero(np.all(_MIX_X == x, axis=1))[0])


def _gauss_hermite_2d(n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Nodes [n^2, 2] and weights [n^2] for E over N(0, I_2)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(n)
    weights = weights / math.sqrt(2 * math.pi)
    grid = np.stack(np.meshgrid(nodes, nodes, indexing="ij"), -1).reshape(-1, 2)
    return grid, np.outer(weights, weights).reshape(-1)


def _decoder_bound_and_nll(x: np.ndarray, gamma_0: float) -> tuple[float, float]:
    """The decoder-dequantized bound with the exact ODE density, and the exact -log P(x).

    bound = E_{z ~ q(z_0 | x)}[-log p(x | z) - log q(z_0) + log q(z | x)];
    P(x) = sum_k pi_k E_{z ~ N(alpha f_k, sigma^2)}[p(x | z)], both by quadrature.
    """
    a2, s2 = _alpha2_sigma2(gamma_0)
    alpha, sigma = math.sqrt(a2), math.sqrt(s2)
    eps, w = _gauss_hermite_2d()
    f_x = 2.0 * (x + 0.5) / _MIX_K - 1.0
    z = alpha * f_x + sigma * eps
    log_q_given_x = -0.5 * np.sum(eps**2, axis=-1) - math.log(2 * math.pi * s2)
    integrand = -_decoder_log_prob(x, z, gamma_0) - _mix_log_q(z, gamma_0) + log_q_given_x
    prob = sum(
        pi * np.sum(w * np.exp(_decoder_log_prob(x, alpha * f + sigma * eps, gamma_0)))
        for pi, f in zip(_MIX_PI, _MIX_F, strict=True)
    )
    return float(np.sum(w * integrand)), -math.log(prob)


def _mixture_ode_bpd(x, gamma_0, dequantization, samples, seed):
    return jax.jit(
        lambda key, x: ode_likelihood.ode_bpd(
            key,
            x,
            _mix_schedule(gamma_0),
            mixture_eps_fn,
            vocab_size=_MIX_K,
            num_dequant_samples=samples,
            dequantization=dequantization,
            divergence="exact",
            rtol=1e-6,
            atol=1e-6,
        )
    )(jax.random.key(seed), jnp.asarray(x))


@pytest.mark.parametrize(("gamma_0", "tol"), [(-13.3, 2e-3), (-3.0, 1e-4)])
def test_ode_recovers_the_mixture_density_from_its_exact_score(gamma_0, tol):
    """A multimodal density: with q(z_1) as the prior, the ODE's log p_0(z) is log q(z_0).

    Measured at rtol = atol = 1e-6: errors below 1e-5 nats at gamma_0 = -3 (NFE ~90) and
    9e-4 at gamma_0 = -13.3 (NFE ~220; sigma_0 = 1.3e-3 makes the start stiff). With the
    model's N(0, I) prior the prior mismatch adds 4e-3 nats at gamma_1 = 10, 2e-4 at 16.
    """
    a2, s2 = _alpha2_sigma2(gamma_0)
    rng = np.random.default_rng(5)
    comp = rng.choice(len(_MIX_PI), size=8, p=_MIX_PI)
    z = math.sqrt(a2) * _MIX_F[comp] + math.sqrt(s2) * 1.5 * rng.normal(size=(8, 2))

    def log_q1(z1):
        return _mix_log_q(z1, _MIX_GAMMA_1, jnp)

    out = jax.jit(
        lambda y, log_prior: ode_likelihood.ode_log_likelihood(
            jax.random.key(0),
            y,
            _mix_schedule(gamma_0),
            mixture_eps_fn,
            divergence="exact",
            rtol=1e-6,
            atol=1e-6,
            log_prior=log_prior,
        ),
        static_argnums=1,
    )
    expected = _mix_log_q(z.astype(np.float32).astype(np.float64), gamma_0)
    exact_prior = out(jnp.asarray(z, jnp.float32), log_q1)
    assert bool(exact_prior.success)
    np.testing.assert_allclose(np.asarray(exact_prior.log_prob, np.float64), expected, atol=tol)
    model_prior = out(jnp.asarray(z, jnp.float32), None)
    np.testing.assert_allclose(
        np.asarray(model_prior.log_prob, np.float64), expected, atol=tol + 5e-4
    )


@pytest.mark.parametrize("gamma_0", [-13.3, -3.0])
def test_decoder_dequantized_bound_matches_quadrature_and_bounds_the_exact_nll(gamma_0):
    """ode_bpd(dequantization="decoder") with the exact score, against quadrature.

    gamma_0 = -13.3: sigma_0 ~ 1e-3 is far below the bin width 0.5, so the bound is the
    data's own -log pi_x; gamma_0 = -3: the components overlap (sigma_0 = 0.22) and the
    bound sits above the exact -log P(x) of the decoder model, summed by quadrature.
    """
    x = np.array([[0, 0], [1, 2], [3, 1], [2, 2]])
    samples = 64
    out = _mixture_ode_bpd(x, gamma_0, "decoder", samples, seed=6)
    assert bool(out.success)
    to_bits = 1.0 / (2 * math.log(2))
    bpd = np.asarray(out.bpd, np.float64)
    stderr = np.asarray(out.bpd_stderr, np.float64)
    for i, xi in enumerate(x):
        bound, nll = _decoder_bound_and_nll(xi, gamma_0)
        assert abs(bpd[i] - bound * to_bits) < 4 * stderr[i] + 2e-3, (xi, bpd[i], bound)
        assert bound >= nll - 1e-9
        if gamma_0 < -10:
            log_pi = math.log(_MIX_PI[_index_of(xi)])
            assert bound == pytest.approx(-log_pi, abs=1e-3)
            assert nll == pytest.approx(-log_pi, abs=1e-3)
        else:
            assert bound - nll > 0.01  # the bound is not tight when the components overlap
    recon = np.asarray(out.bpd_recon, np.float64)
    assert np.all(recon >= -1e-4) and np.all(recon <= bpd + 1e-6)  # float32 rounding of 0


def test_with_the_exact_score_the_elbo_and_the_decoder_ode_bound_agree():
    """Exact denoiser, gamma_0 = -13.3: both methods give the data's own -log pi_x.

    The decoder ODE bound matches it per image (the components are 400 sigma_0 apart). The
    ELBO's only gaps are the prior mismatch and the posterior overlap at t > 0, both tiny
    here, but its per-image estimate is noisy (the exact posterior switches sharply between
    components), so it is compared on the mean over 256 images.
    """
    gamma_0, repeats = -13.3, 16
    x = jnp.asarray(np.repeat(_MIX_X, repeats, axis=0))  # every value 16 times, [256, 2]
    elbo = jax.jit(
        lambda key: elbo_estimators.elbo_eval(
            key, x, _mix_schedule(gamma_0), mixture_eps_fn, vocab_size=_MIX_K, num_time_samples=16
        )
    )(jax.random.key(7))
    ode = jax.jit(
        lambda key: ode_likelihood.ode_bpd(
            key,
            x,
            _mix_schedule(gamma_0),
            mixture_eps_fn,
            vocab_size=_MIX_K,
            dequantization="decoder",
            divergence="exact",
            rtol=1e-6,
            atol=1e-6,
        )
    )(jax.random.key(8))
    to_bits = 1.0 / (2 * math.log(2))
    exact = -np.log(np.repeat(_MIX_PI, repeats)) * to_bits
    ode_bpd = np.asarray(ode.bpd, np.float64)
    np.testing.assert_allclose(ode_bpd, exact, atol=4e-3)  # one solve, RMS error control
    elbo_error = np.asarray(elbo.total, np.float64) * to_bits - exact  # Monte Carlo noise
    stderr = elbo_error.std(ddof=1) / math.sqrt(len(exact))
    assert abs(elbo_error.mean()) < 4 * stderr + 0.005, (elbo_error.mean(), stderr)
    gap = np.asarray(elbo.total, np.float64) * to_bits - ode_bpd
    assert abs(gap.mean()) < 4 * gap.std(ddof=1) / math.sqrt(len(gap)) + 0.005


def _binned_nll(x: np.ndarray, gamma_0: float) -> float:
    """-log P(x) of the binned ODE model: p_Y (the density of z_0 / alpha_0) is the mixture of
    N(f_k, tau^2 I), tau = sigma_0 / alpha_0; its mass on x's bin is a sum of CDF products."""
    a2, s2 = _alpha2_sigma2(gamma_0)
    tau = math.sqrt(s2 / a2)
    lo = 2.0 * x / _MIX_K - 1.0
    hi = lo + 2.0 / _MIX_K
    mass = norm.cdf((hi - _MIX_F) / tau) - norm.cdf((lo - _MIX_F) / tau)  # [16, 2]
    return -math.log(float(np.sum(_MIX_PI * np.prod(mass, axis=-1))))


def _truncated_normal_bound(x: np.ndarray, gamma_0: float, nodes: int = 96) -> float:
    """E_q[-log p_Y(f(x) + u) + log q(u)] with q the N(0, tau^2) truncated to the bin, by
    Gauss-Legendre quadrature over the bin (2 dims)."""
    a2, s2 = _alpha2_sigma2(gamma_0)
    tau, half = math.sqrt(s2 / a2), 1.0 / _MIX_K
    t, wt = np.polynomial.legendre.leggauss(nodes)
    u1 = half * t
    q1 = norm.pdf(u1 / tau) / tau / (norm.cdf(half / tau) - norm.cdf(-half / tau))
    w1 = half * wt * q1  # quadrature weights of E_q over one dimension
    u = np.stack(np.meshgrid(u1, u1, indexing="ij"), -1).reshape(-1, 2)
    w = np.outer(w1, w1).reshape(-1)
    log_q = np.log(np.outer(q1, q1).reshape(-1))
    y = 2.0 * (x + 0.5) / _MIX_K - 1.0 + u
    log_p_y = _mix_log_q(math.sqrt(a2) * y, gamma_0) + 2 * 0.5 * math.log(a2)
    return float(np.sum(w * (log_q - log_p_y)))


@pytest.mark.parametrize("gamma_0", [-3.0, -6.0])
def test_dequantized_bounds_and_their_importance_weighting_on_summable_data(gamma_0):
    """The 16-value data, whose binned ODE model P(x) sums exactly (normal CDFs).

    Uniform and truncated-normal (i-DODE) dequantization both bound -log P(x), and the
    truncated normal's matches its quadrature. At gamma_0 = -6 the model's density is
    narrower than a bin (tau = 0.05 against the half-width 0.25) and the truncated normal is
    exact; at -3 (tau = 0.22) the components overlap the neighbouring bins and the two are
    close. There, importance weighting over S draws tightens each bound as S grows (1, 4, 16,
    64: the mean over groups of S of the 64 draws). Measured gaps to -log P(x) at -3, in
    nats: uniform 0.060, 0.031, 0.024, 0.021; truncated normal 0.094, 0.065, 0.054, 0.049.
    """
    x = np.array([[0, 0], [1, 2], [3, 1], [2, 2]])
    samples = 64
    nll = np.array([_binned_nll(xi, gamma_0) for xi in x])
    to_nats = 2 * math.log(2)
    bounds, iw = {}, {}
    for dequantization in ("uniform", "truncated_normal"):
        out = _mixture_ode_bpd(x, gamma_0, dequantization, samples, seed=9)
        assert bool(out.success)
        bound = np.asarray(out.bpd, np.float64) * to_nats
        stderr = np.asarray(out.bpd_stderr, np.float64) * to_nats
        assert np.all(bound > nll - 4 * stderr - 1e-3), (dequantization, bound, nll)
        bounds[dequantization] = bound
        if dequantization == "truncated_normal":
            want = np.array([_truncated_normal_bound(xi, gamma_0) for xi in x])
            assert np.all(np.abs(bound - want) < 4 * stderr + 2e-3), (bound, want, stderr)
        nats = np.asarray(out.nats, np.float64)  # [64, 4]
        iw[dequantization] = [
            np.mean(-(logsumexp(-nats.reshape(samples // s, s, -1), axis=1) - math.log(s)), 0)
            for s in (1, 4, 16, 64)
        ]
        np.testing.assert_allclose(
            iw[dequantization][-1], out.bpd_importance_weighted * to_nats, rtol=1e-5
        )
    if gamma_0 == -6.0:
        # The components sit 10 tau apart: on x's bin p_Y is one truncated normal, q itself,
        # so every draw's bound is exact. The uniform's ratios p / q reach 16x their mean,
        # which 64 draws do not average out.
        assert np.all(bounds["uniform"] - bounds["truncated_normal"] > 0.5)
        np.testing.assert_allclose(bounds["truncated_normal"], nll, atol=2e-3)
        return
    for dequantization, by_draws in iw.items():
        gaps = [np.mean(b - nll) for b in by_draws]  # averaged over the four images
        assert all(a > b for a, b in itertools.pairwise(gaps)), (dequantization, gaps)
        assert gaps[-1] > -2e-3, (dequantization, gaps)  # still a bound (exact traces)
        assert gaps[-1] < 0.6 * gaps[0], (dequantization, gaps)
