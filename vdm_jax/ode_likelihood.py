"""The probability-flow ODE: sampling paths and exact log-densities, and dequantized bounds.

Two bounds on the discrete data's negative log-likelihood come from the ODE model (both in
nats per example here; :func:`ode_bpd` converts to bits/dim). The ELBO, the VDM's own bound,
and its lower-variance estimators are in :mod:`vdm_jax.elbo_estimators`.

* **Uniform dequantization** (``ode_bpd(..., dequantization="uniform")``):
  ``E_u[-log p_Y(y)] + D log(K / 2)`` with ``y = 2 (x + u) / K - 1``, ``u ~ U[0, 1)^D``, is
  an upper bound on ``-log P_ODE(x)``, where ``P_ODE(x)`` is the probability that a
  *continuous* model puts on the bin of ``x``: the density ``p_Y`` of ``z_t0 / alpha_t0``
  when ``z_1 ~ N(0, I)`` is carried from ``t1 = 1`` to ``t0`` by the deterministic
  probability-flow ODE. ``p_Y`` is computed exactly (up to the solver tolerance, and
  unbiasedly with a Hutchinson trace estimator) by the instantaneous change of variables.
  This is the protocol of continuous flows and of score-based ODE likelihoods (Song et al.,
  2021, who add 7 bits for data in [-1, 1] and 8-bit images: ``log2(K / 2)`` with
  ``K = 256``), so it is comparable with their numbers, and *not* with numbers that use
  variational or truncated-normal dequantization.
* **Truncated-normal dequantization** (``dequantization="truncated_normal"``; Zheng et al.,
  2023, "Improved Techniques for Maximum Likelihood Estimation for Diffusion ODEs", i-DODE):
  the same bound on ``-log P_ODE(x)``, with the noise drawn from ``q(u)``, a normal of scale
  ``sigma_t0 / alpha_t0`` truncated to x's bin (variational dequantization):
  ``E_q[-log p_Y(f(x) + u) + log q(u)]``. Around a bin centre the model's density has about
  the diffusion's own width ``sigma_t0 / alpha_t0``; ``q`` follows it, where the uniform
  dequantization pays for the empty parts of the bin.
* **Decoder dequantization** (``dequantization="decoder"``):
  ``E_{z_0 ~ q(z_0|x)}[-log p(x|z_0) - log p_ODE(z_0) + log q(z_0|x)]`` bounds
  ``-log P_ODE+dec(x)`` for the model ``z_0 ~ p_ODE`` (the ODE's density at ``t = 0``)
  followed by the VDM's own discretized decoder. It uses the same encoder, decoder and prior
  as the ELBO; the only difference is that ``-log p(z_0)`` is computed exactly along the ODE
  instead of being bounded by the diffusion and prior terms. With an exact score the two
  models coincide and this bound is at most the ELBO; for a trained model the two numbers
  should be close, which makes it the consistency check between the two methods. One
  caution: a score that is poor at very low noise can make the ODE model put almost no
  density on a few of the draws from ``q(z_0 | x)`` (a tiny MLP with ``gamma_0 ~ -9.4`` gave
  ~90 nats instead of ~3.5 for one draw in a few hundred, at any solver tolerance), so look
  at the spread of the per-image values, not only the mean.

Each bound is an expectation over dequantization draws ``s``; ``-log mean_s exp(-bound_s)``
over S draws is also a bound in expectation, and tighter as S grows (importance weighting,
Burda et al. 2016; MuLAN reports its ODE figure so with S = 20). With Hutchinson traces each
``bound_s`` is noisy, and ``exp`` of a noisy log-density is biased upwards, so the
importance-weighted figure falls below the bound by about the trace noise (0.26 bpd on the
digits model with 4 draws); exact traces keep it a bound, and the evaluation requires them.

``P_VDM`` (the ELBO's model) and ``P_ODE`` are different models of the same data, so neither
bound bounds the other; for a well-trained model they should be close. One caveat: VDM trains
on bin centres ``f(x)`` with a tiny ``sigma_0`` (``gamma_min = -13.3`` gives
``sigma_0 ~ 1.3e-3``), so the model's ``t0 = 0`` density may be much narrower than a bin, and
uniform dequantization then pays for the empty parts of each bin; a larger ``t0`` gives a
smoother density and is still a valid bound (any normalised density on ``y`` is).

Probability-flow ODE of the variance-preserving process with ``sigma_t^2 = sigmoid(gamma_t)``
(derivation in :func:`probability_flow_drift`)::

    dz/dt = 0.5 gamma'(t) (sigma_t eps_hat(z, gamma_t) - sigma_t^2 z)

The string choices are registries: :data:`SOLVERS`, :data:`DIVERGENCES`, :data:`PROBES`,
:data:`DEQUANTIZATIONS`.

Conventions: ``gamma_fn: t -> gamma`` elementwise; ``eps_fn(z_t [B, ...], gamma_t [B]) ->
eps_hat [B, ...]`` with no coupling between examples (no BatchNorm): the divergence of example
``b`` is computed from the batched Jacobian on that assumption.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import diffrax
import jax
import jax.numpy as jnp

from vdm_jax import diffusion, schedules

# Adaptive 5th-order Runge-Kutta pairs, by name.
SOLVERS: dict[str, type[diffrax.AbstractSolver]] = {
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
}
# Hutchinson probe distributions: (key, shape, dtype) -> probe.
PROBES: dict[str, Callable[..., jax.Array]] = {
    "rademacher": jax.random.rademacher,
    "gaussian": jax.random.normal,
}

# Vector-field evaluations per attempted step of the 7-stage FSAL pairs (Tsit5, Dopri5),
# plus the first stage of the first step. (diffrax wraps the term before its initial step
# heuristic sees it, so the first step is a fixed 0.01 and costs no extra evaluations.)
_EVALS_PER_STEP = 6
_EVALS_AT_START = 1


# --------------------------------------------------------------------------------------
# Probability-flow ODE
# --------------------------------------------------------------------------------------


def _flat_dims(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:])


class _FlowCoefficients(NamedTuple):
    """The probability-flow ODE's time-dependent factors at one scalar time.

    Each is [] for a scalar schedule, or per dimension ([1 or B, ...], the data's rank).
    """

    gamma: jax.Array  # []
    half_dgamma: jax.Array  # [] 0.5 gamma'(t)
    sigma: jax.Array  # []
    sigma2: jax.Array  # []

    def drift(self, z: jax.Array, eps_hat: jax.Array) -> jax.Array:
        """dz/dt = 0.5 gamma' (sigma eps_hat - sigma^2 z), any shape."""
        return self.half_dgamma * (self.sigma * eps_hat - self.sigma2 * z)

    def drift_divergence(self, eps_divergence: jax.Array, num_dims: int) -> jax.Array:
        """Trace of d drift / dz from the trace of d eps_hat / dz, per example (scalar only)."""
        return self.half_dgamma * (self.sigma * eps_divergence - self.sigma2 * num_dims)

    def eps_scale(self) -> jax.Array:
        """``0.5 gamma' sigma``: drift = eps_scale eps_hat - diagonal part."""
        return self.half_dgamma * self.sigma

    def diagonal_trace(self, like: jax.Array) -> jax.Array:
        """``sum_i 0.5 gamma_i' sigma_i^2`` per example of ``like`` [B, ...]: the trace of the
        drift's part that is linear in z."""
        return diffusion.sum_except_batch(
            jnp.broadcast_to(self.half_dgamma * self.sigma2, like.shape)
        )


def _flow_coefficients(gamma_fn: schedules.GammaFn, t: jax.Array) -> _FlowCoefficients:
    gamma, dgamma = schedules.gamma_and_derivative(gamma_fn, jnp.asarray(t, jnp.float32))
    sigma2 = schedules.sigma2(gamma)
    return _FlowCoefficients(gamma, 0.5 * dgamma, jnp.sqrt(sigma2), sigma2)


def probability_flow_drift(
    gamma_fn: schedules.GammaFn, eps_fn: diffusion.EpsFn, t: jax.Array, z: jax.Array
) -> jax.Array:
    """Drift of the probability-flow ODE, dz/dt, at a scalar time ``t``.

    Derivation. ``q(z_t | x) = N(alpha_t x, sigma_t^2 I)`` is the marginal of the SDE
    ``dz = f(t) z dt + g(t) dW`` with ``f = d log alpha_t / dt`` and
    ``g^2 = d sigma_t^2 / dt - 2 f sigma_t^2``. From ``alpha_t^2 = sigmoid(-gamma_t)`` and
    ``sigma_t^2 = sigmoid(gamma_t)``: ``f = -0.5 gamma' sigma_t^2`` and
    ``g^2 = gamma' sigma_t^2 alpha_t^2 + gamma' sigma_t^4 = gamma' sigma_t^2``. The ODE with
    the same marginals is ``dz/dt = f z - 0.5 g^2 score`` and the model's score is
    ``-eps_hat / sigma_t``, so::

        dz/dt = 0.5 gamma'(t) (sigma_t eps_hat(z, gamma_t) - sigma_t^2 z).

    Args:
      gamma_fn: elementwise schedule ``t -> gamma``.
      eps_fn: noise predictor ``(z_t [B, ...], gamma_t [B]) -> eps_hat [B, ...]``.
      t: [] time.
      z: [B, ...] state.

    Returns:
      [B, ...] dz/dt in float32.
    """
    coef = _flow_coefficients(gamma_fn, t)
    eps_hat = eps_fn(z, diffusion.batch_gamma(coef.gamma, z.shape[0])).astype(jnp.float32)
    return coef.drift(z, eps_hat)


def _solver(name: str) -> diffrax.AbstractSolver:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; allowed: {sorted(SOLVERS)}")
    return SOLVERS[name]()


def _num_function_evals(num_steps: jax.Array) -> jax.Array:
    """Vector-field evaluations of an adaptive Tsit5 / Dopri5 solve with ``num_steps`` tries.

    One evaluation of the first stage, then six per attempted step (accepted or rejected;
    the first stage of the next step reuses the last of the previous one). If the very first
    step is rejected, its retry re-evaluates the first stage, one evaluation not counted here.
    Checked against a direct count in the tests.
    """
    return _EVALS_AT_START + _EVALS_PER_STEP * num_steps


class FlowSolution(NamedTuple):
    """Result of :func:`probability_flow`.

    Attributes:
      z: [B, ...] state at ``t_end``.
      num_function_evals: [] int, evaluations of the drift (each one call of ``eps_fn``).
      success: [] bool, whether the solver reached ``t_end`` within ``max_steps``.
    """

    z: jax.Array
    num_function_evals: jax.Array
    success: jax.Array


def probability_flow(
    z: jax.Array,
    gamma_fn: schedules.GammaFn,
    eps_fn: diffusion.EpsFn,
    *,
    t_start: float,
    t_end: float,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    solver: str = "tsit5",
    max_steps: int = 4096,
) -> FlowSolution:
    """Carries ``z`` from ``t_start`` to ``t_end`` along the probability-flow ODE.

    ``t_end < t_start`` runs backwards (sampling: ``t_start = 1``, ``t_end = 0``); forwards
    is the deterministic encoder.

    Args:
      z: [B, ...] states at ``t_start``.
      gamma_fn: elementwise schedule ``t -> gamma``.
      eps_fn: noise predictor ``(z_t [B, ...], gamma_t [B]) -> eps_hat [B, ...]``.
      t_start: initial time.
      t_end: final time.
      rtol: relative tolerance of the PID step-size controller.
      atol: absolute tolerance.
      solver: ``"tsit5"`` or ``"dopri5"`` (both 5th order, adaptive).
      max_steps: solver step limit; ``success`` is False and ``z`` is NaN if it is reached.

    Returns:
      A :class:`FlowSolution`.
    """
    term = diffrax.ODETerm(lambda t, y, args: probability_flow_drift(gamma_fn, eps_fn, t, y))
    sol = diffrax.diffeqsolve(
        term,
        _solver(solver),
        t_start,
        t_end,
        None,
        z.astype(jnp.float32),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        saveat=diffrax.SaveAt(t1=True),
        max_steps=max_steps,
        throw=False,
    )
    success = sol.result == diffrax.RESULTS.successful
    z_end = jnp.where(success, sol.ys[0], jnp.nan)
    return FlowSolution(z_end, _num_function_evals(sol.stats["num_steps"]), success)


def exact_divergence(
    eps_of: Callable[[jax.Array], jax.Array], z: jax.Array, probe: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """eps_hat [B, ...] and the exact trace of d eps_hat_b / d z_b per example, [B].

    One linearisation and D batched Jacobian-vector products with the basis vectors (small D
    only). ``probe`` is unused.
    """
    del probe
    batch, dims = z.shape[0], _flat_dims(z.shape)
    eps_hat, jvp_fn = jax.linearize(eps_of, z)
    basis = jnp.eye(dims, dtype=z.dtype).reshape((dims, 1, *z.shape[1:]))
    columns = jax.vmap(jvp_fn)(jnp.broadcast_to(basis, (dims, *z.shape)))
    columns = columns.reshape(dims, batch, dims)
    return eps_hat, jnp.sum(jnp.diagonal(columns, axis1=0, axis2=2), axis=-1)


def hutchinson_divergence(
    eps_of: Callable[[jax.Array], jax.Array], z: jax.Array, probe: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """eps_hat [B, ...] and ``v^T (d eps_hat / d z) v`` per example [B] from one JVP.

    Unbiased for the trace when the probe ``v`` [B, ...] has identity covariance.
    """
    eps_hat, jv = jax.jvp(eps_of, (z,), (probe,))
    return eps_hat, diffusion.sum_except_batch(probe * jv.astype(jnp.float32))


# The trace of d eps_hat / d z: ``(eps_of, z [B, ...], probe [B, ...]) -> (eps_hat, [B])``.
DIVERGENCES: dict[str, Callable[..., tuple[jax.Array, jax.Array]]] = {
    "exact": exact_divergence,
    "hutchinson": hutchinson_divergence,
}


def standard_normal_log_prob(z: jax.Array) -> jax.Array:
    """log N(z; 0, I) per example, [B, ...] -> [B]."""
    dims = _flat_dims(z.shape)
    return -0.5 * diffusion.sum_except_batch(jnp.square(z)) - 0.5 * dims * math.log(2 * math.pi)


class ODELikelihood(NamedTuple):
    """Result of :func:`ode_log_likelihood`.

    Attributes:
      log_prob: [B] log p_t0(y) in nats (NaN where the solve failed).
      prior_log_prob: [B] log p_t1(z_t1) under the prior.
      delta_log_prob: [B] integral over [t0, t1] of the drift's divergence along the path.
      z_t1: [B, ...] the point ``y`` is carried to at ``t1``.
      num_function_evals: [] int, evaluations of the ODE's right-hand side. Each is one
        ``eps_fn`` JVP (Hutchinson) or one linearisation plus D batched JVPs (exact).
      num_steps: [] int, attempted solver steps (accepted and rejected).
      success: [] bool, whether the solver reached ``t1`` within ``max_steps``.
      rtol: [] relative tolerance used.
      atol: [] absolute tolerance used.
    """

    log_prob: jax.Array
    prior_log_prob: jax.Array
    delta_log_prob: jax.Array
    z_t1: jax.Array
    num_function_evals: jax.Array
    num_steps: jax.Array
    success: jax.Array
    rtol: jax.Array
    atol: jax.Array


def ode_log_likelihood(
    key: jax.Array,
    y: jax.Array,
    gamma_fn: schedules.GammaFn,
    eps_fn: diffusion.EpsFn,
    *,
    divergence: str = "exact",
    probe: str = "rademacher",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t0: float = 0.0,
    t1: float = 1.0,
    solver: str = "tsit5",
    max_steps: int = 4096,
    log_prior: Callable[[jax.Array], jax.Array] | None = None,
) -> ODELikelihood:
    """Log-density of points under the probability-flow ODE model at time ``t0``.

    The model's density at ``t0`` is that of ``z_t0`` when ``z_t1`` is drawn from the prior
    and carried to ``t0`` by the ODE of :func:`probability_flow_drift`. With
    ``d log p_t(z_t) / dt = -div(drift)`` along a trajectory,
    ``log p_t0(y) = log p_t1(z_t1) + integral_{t0}^{t1} div(drift)(z_t, t) dt``, where
    ``div(drift) = 0.5 gamma' (sigma_t div(eps_hat) - sigma_t^2 D)``. Both ``z`` and the
    integral are solved jointly from ``t0`` to ``t1`` by an adaptive Runge-Kutta pair (one
    batched solve; the PID controller's error norm is the RMS over every element of the
    batch state, as in Song et al.'s likelihood code).

    The default prior is the model's own, exactly ``N(0, I)`` (the sampler starts there), so
    nothing is neglected: the small mismatch between ``q(z_1 | x)`` and ``N(0, I)`` is part
    of the model, just as it is the prior term of the ELBO. Pass ``log_prior`` to use another.

    ``divergence="exact"`` computes the trace with D Jacobian-vector products per evaluation
    (small D only). ``"hutchinson"`` uses ``v^T J v`` with one probe ``v`` per example, drawn
    from ``key`` once and fixed for the whole solve; the trajectory does not depend on ``v``,
    so the returned ``log_prob`` is an unbiased estimate of the exact one.

    Args:
      key: PRNG key for the Hutchinson probe (unused by ``"exact"``).
      y: [B, ...] points in z-space at time ``t0`` (for data, see :func:`ode_bpd`).
      gamma_fn: elementwise schedule ``t -> gamma``.
      eps_fn: noise predictor ``(z_t [B, ...], gamma_t [B]) -> eps_hat [B, ...]``, without
        coupling between examples.
      divergence: ``"exact"`` or ``"hutchinson"``.
      probe: Hutchinson probe distribution, ``"rademacher"`` (lower variance) or
        ``"gaussian"``.
      rtol: relative tolerance of the PID step-size controller.
      atol: absolute tolerance.
      t0: time of the density (0 for the model's data-side end).
      t1: time of the prior.
      solver: ``"tsit5"`` or ``"dopri5"``.
      max_steps: solver step limit; results are NaN and ``success`` False if reached.
      log_prior: ``z_t1 [B, ...] -> [B]`` log-density at ``t1``; default
        :func:`standard_normal_log_prob`.

    Returns:
      An :class:`ODELikelihood`; ``log_prob`` [B] in nats.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; allowed: {sorted(DIVERGENCES)}")
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; allowed: {sorted(PROBES)}")
    if not t1 > t0:
        raise ValueError(f"need t1 > t0, got t0={t0}, t1={t1}")
    y = y.astype(jnp.float32)
    batch, dims = y.shape[0], _flat_dims(y.shape)
    v = PROBES[probe](key, y.shape, dtype=jnp.float32)
    divergence_fn = DIVERGENCES[divergence]

    def vector_field(t, state, args):
        z, _ = state
        coef = _flow_coefficients(gamma_fn, t)
        gamma_t = diffusion.batch_gamma(coef.gamma, batch)

        def eps_of(z_):
            return eps_fn(z_, gamma_t).astype(jnp.float32)

        if not diffusion.is_per_dimension(coef.gamma):
            eps_hat, div_eps = divergence_fn(eps_of, z, v)
            return coef.drift(z, eps_hat), coef.drift_divergence(div_eps, dims)
        # Per dimension: div(drift) = sum_i a_i d eps_hat_i / dz_i - sum_i 0.5 gamma_i' sigma_i^2
        # with a = 0.5 gamma' sigma; the first sum is the divergence of a * eps_hat.
        scaled, div_scaled = divergence_fn(lambda z_: coef.eps_scale() * eps_of(z_), z, v)
        drift = scaled - coef.half_dgamma * coef.sigma2 * z
        return drift, div_scaled - coef.diagonal_trace(z)

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        _solver(solver),
        t0,
        t1,
        None,
        (y, jnp.zeros((batch,), jnp.float32)),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        saveat=diffrax.SaveAt(t1=True),
        max_steps=max_steps,
        throw=False,
    )
    success = sol.result == diffrax.RESULTS.successful
    z_t1, delta = sol.ys[0][0], sol.ys[1][0]
    prior = (log_prior or standard_normal_log_prob)(z_t1)
    log_prob = jnp.where(success, prior + delta, jnp.nan)
    num_steps = sol.stats["num_steps"]
    return ODELikelihood(
        log_prob=log_prob,
        prior_log_prob=prior,
        delta_log_prob=delta,
        z_t1=z_t1,
        num_function_evals=_num_function_evals(num_steps),
        num_steps=num_steps,
        success=success,
        rtol=jnp.asarray(rtol, jnp.float32),
        atol=jnp.asarray(atol, jnp.float32),
    )


class ODEBpd(NamedTuple):
    """Result of :func:`ode_bpd`; per-example values are [B].

    Attributes:
      bpd: the dequantized bound in bits/dim, averaged over dequantization samples: an
        unbiased estimate of ``E_u[-log p_Y(y)] / (D ln 2) + log2(K / 2)``.
      bpd_stderr: standard error of ``bpd`` over the dequantization samples (its spread
        includes the Hutchinson noise); NaN with a single sample.
      bpd_importance_weighted: ``-log2 mean_s p_V(x + u_s) / D``, a tighter bound in
        expectation (equal to ``bpd`` with one sample).
      nats: [S, B] per-sample bound in nats (``-log p_V(x + u_s)`` for uniform
        dequantization; ``-log p(x|z_0) - log p_ODE(z_0) + log q(z_0|x)`` for the decoder).
      bpd_recon: the decoder's ``-log p(x | z_0)`` part of ``bpd`` (0 for uniform).
      num_function_evals: [] int, right-hand-side evaluations of the single batched solve.
      success: [] bool.
      rtol: [] relative tolerance used.
      atol: [] absolute tolerance used.
    """

    bpd: jax.Array
    bpd_stderr: jax.Array
    bpd_importance_weighted: jax.Array
    nats: jax.Array
    bpd_recon: jax.Array
    num_function_evals: jax.Array
    success: jax.Array
    rtol: jax.Array
    atol: jax.Array


def dequantization_log_jacobian(num_dims: int, vocab_size: int) -> float:
    """``D log(K / 2)``: nats added to ``-log p_Y(y)`` to get ``-log p_V(v)``.

    ``v = x + u`` in ``[0, K)^D`` maps to ``y = 2 v / K - 1`` in ``[-1, 1)^D``, so
    ``p_V(v) = p_Y(y) (2 / K)^D`` and ``-log p_V(v) = -log p_Y(y) + D log(K / 2)``.
    """
    return num_dims * math.log(vocab_size / 2.0)


class Dequantized(NamedTuple):
    """Points for the ODE and what the bound adds to their ``-log p_t0``, each per row.

    Attributes:
      z: [N, ...] points in z-space at ``t0``.
      offset: [N] nats added to ``-log p_t0(z)`` to give the row's bound.
      recon: [N] the decoder's ``-log p(x | z)`` inside ``offset`` (0 without a decoder).
    """

    z: jax.Array
    offset: jax.Array
    recon: jax.Array


def _sum_over_dims(v: jax.Array, like: jax.Array) -> jax.Array:
    """``sum_i v_i`` per example of ``like`` [N, ...]: ``D v`` for a scalar-schedule ``v``, or
    a per-dimension ``v`` broadcast and summed."""
    if not diffusion.is_per_dimension(v):
        return _flat_dims(like.shape) * v
    return diffusion.sum_except_batch(jnp.broadcast_to(v, like.shape))


def uniform_dequantization(
    key: jax.Array, x: jax.Array, gamma_t0: jax.Array, vocab_size: int
) -> Dequantized:
    """``z = alpha_t0 (2 (x + u) / K - 1)``, ``u ~ U[0, 1)^D``: see :func:`ode_bpd`."""
    dims = _flat_dims(x.shape)
    log_alpha = 0.5 * schedules.log_alpha2(gamma_t0)
    u = jax.random.uniform(key, x.shape)
    y = 2.0 * (x.astype(jnp.float32) + u) / vocab_size - 1.0
    # -log p_V(v) = -log p_t0(z) - D log alpha_t0 + D log(K / 2).
    offset = -_sum_over_dims(log_alpha, x) + dequantization_log_jacobian(dims, vocab_size)
    zeros = jnp.zeros((x.shape[0],), jnp.float32)
    return Dequantized(jnp.exp(log_alpha) * y, zeros + offset, zeros)


def decoder_dequantization(
    key: jax.Array, x: jax.Array, gamma_t0: jax.Array, vocab_size: int
) -> Dequantized:
    """``z ~ q(z_t0 | x)``, offset ``-log p(x | z) + log q(z | x)``: see :func:`ode_bpd`."""
    eps = jax.random.normal(key, x.shape)
    z = diffusion.diffuse(diffusion.encode(x, vocab_size), gamma_t0, eps)
    # q(z | x) = N(alpha f(x), sigma^2 I): the density of eps over prod_i sigma_i.
    log_q = standard_normal_log_prob(eps) - _sum_over_dims(0.5 * schedules.log_sigma2(gamma_t0), x)
    recon = diffusion.reconstruction_loss(x, z, gamma_t0, vocab_size)
    return Dequantized(z, recon + log_q, recon)


class Dequantization(NamedTuple):
    """A registered dequantization: how data become ODE points, and what it reports.

    Attributes:
      draw: ``(key, x [N, ...] ints, gamma_t0 [] (or per dimension), vocab_size) ->
        Dequantized``.
      has_decoder: the bound contains the decoder's ``-log p(x | z)`` (reported as
        ``bpd_recon``).
    """

    draw: Callable[[jax.Array, jax.Array, jax.Array, int], Dequantized]
    has_decoder: bool


def truncated_normal_dequantization(
    key: jax.Array, x: jax.Array, gamma_t0: jax.Array, vocab_size: int
) -> Dequantized:
    """``z = alpha_t0 (f(x) + u)`` with ``u`` normal of scale ``sigma_t0 / alpha_t0`` truncated
    to x's bin, offset ``log q(u) - D log alpha_t0``: see :func:`ode_bpd`."""
    log_alpha = 0.5 * schedules.log_alpha2(gamma_t0)
    log_scale = 0.5 * gamma_t0  # log(sigma / alpha): the model's own smoothing of a bin centre
    limit = jnp.exp(-log_scale) / vocab_size  # half a bin (1 / K) in units of the scale
    n = jax.random.truncated_normal(key, -limit, limit, x.shape, jnp.float32)
    y = diffusion.encode(x, vocab_size) + jnp.exp(log_scale) * n
    # log q(u) per dimension: log N(n; 0, 1) - log scale - log(Phi(limit) - Phi(-limit)).
    log_mass = jnp.log1p(-jax.scipy.special.erfc(limit / math.sqrt(2.0)))
    log_q = standard_normal_log_prob(n) - _sum_over_dims(log_scale + log_mass, x)
    zeros = jnp.zeros((x.shape[0],), jnp.float32)
    return Dequantized(jnp.exp(log_alpha) * y, log_q - _sum_over_dims(log_alpha, x), zeros)


DEQUANTIZATIONS: dict[str, Dequantization] = {
    "uniform": Dequantization(uniform_dequantization, has_decoder=False),
    "truncated_normal": Dequantization(truncated_normal_dequantization, has_decoder=False),
    "decoder": Dequantization(decoder_dequantization, has_decoder=True),
}


def ode_bpd(
    key: jax.Array,
    x: jax.Array,
    gamma_fn: schedules.GammaFn,
    eps_fn: diffusion.EpsFn,
    *,
    vocab_size: int,
    num_dequant_samples: int = 1,
    dequantization: str = "uniform",
    divergence: str = "hutchinson",
    probe: str = "rademacher",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t0: float = 0.0,
    t1: float = 1.0,
    solver: str = "tsit5",
    max_steps: int = 4096,
) -> ODEBpd:
    """A bound on the discrete data's NLL under the ODE model, bits/dim.

    ``dequantization="uniform"`` (the protocol of continuous flows). Let ``p_Y`` be the
    density of ``y = z_t0 / alpha_t0`` under the model (``z_t0`` from the ODE,
    :func:`ode_log_likelihood`): ``log p_Y(y) = log p_t0(alpha_t0 y) + D log alpha_t0``.
    Any normalised density defines a discrete model
    ``P(x) = integral over x's bin of p_Y``; the bins of the encoder
    ``f(x) = 2 (x + 0.5) / K - 1`` are ``[2x/K - 1, 2(x+1)/K - 1)``, width ``2 / K``, centred
    on ``f(x)``. With ``v = x + u``, ``u ~ U[0, 1)^D`` (density 1 on the unit cube) and
    ``p_V(v) = p_Y(y) (2 / K)^D``, Jensen's inequality gives::

        -log P(x) = -log E_u[p_V(x + u)] <= E_u[-log p_Y(y)] + D log(K / 2).

    In bits/dim the constant is ``log2(K / 2)``: 7 bits for 8-bit data in [-1, 1], the offset
    in Song et al. (2021) and the usual "uniform dequantization" protocol, so the numbers are
    comparable. The importance-weighted variant ``-log mean_s p_V(x + u_s)`` is also an upper
    bound in expectation and tighter; report which one is quoted.

    Why ``z_t0 / alpha_t0``. The model's density lives on ``z_0 = alpha_0 y + sigma_0 eps``
    with ``alpha_0 < 1``; rescaling by ``1 / alpha_0`` (with the Jacobian ``D log alpha_0``,
    about ``-8e-7 D`` nats at ``gamma_0 = -13.3``) puts it on the data's scale without adding
    noise, so ``p_Y`` is exactly normalised and the bound exact. The ``sigma_0`` smoothing is
    part of the model, not of the dequantization. Any ``t0`` gives a valid bound, for the
    model defined by its own ``p_t0``.

    ``dequantization="truncated_normal"`` (i-DODE) bounds the same ``P(x)`` with ``u`` drawn
    from ``q(u)``, a normal ``N(0, tau^2)`` with ``tau = sigma_t0 / alpha_t0``, truncated to
    ``[-1/K, 1/K)`` per dimension (the bin around ``f(x)``): by Jensen's inequality,
    ``-log P(x) <= E_q[-log p_Y(f(x) + u) + log q(u)]`` for any ``q`` on the bin, and ``log q``
    is ``sum_i log N(u_i; 0, tau^2) - log(Phi(1/(K tau)) - Phi(-1/(K tau)))``.

    ``dequantization="decoder"`` (the VDM's own encoder and decoder). The discrete model is
    ``P(x) = integral p_t0(z) p(x | z) dz`` with the ODE density ``p_t0`` and the ELBO's
    discretized decoder ``p(x | z)`` at ``gamma_t0``. With ``z = alpha_t0 f(x) + sigma_t0
    eps`` drawn from the diffusion's ``q(z_t0 | x)``, Jensen's inequality gives::

        -log P(x) <= E_eps[-log p(x | z) - log p_t0(z) + log q(z | x)].

    The ELBO bounds the same decoder model with ``-log p_t0(z)`` replaced by its variational
    bound through the reverse diffusion (its diffusion and prior terms), so the two numbers
    are directly comparable.

    Args:
      key: PRNG key for the dequantization noise and the Hutchinson probes.
      x: [B, ...] integers in {0..K-1}.
      gamma_fn: elementwise schedule ``t -> gamma``.
      eps_fn: noise predictor ``(z_t [B, ...], gamma_t [B]) -> eps_hat [B, ...]``.
      vocab_size: K.
      num_dequant_samples: S, dequantization draws per example; all ``S B`` points go
        through one batched solve, each with its own probe.
      dequantization: ``"uniform"``, ``"truncated_normal"`` or ``"decoder"`` (see above).
      divergence: ``"hutchinson"`` (images) or ``"exact"`` (small D).
      probe: ``"rademacher"`` or ``"gaussian"``.
      rtol: relative tolerance.
      atol: absolute tolerance.
      t0: time of the model density.
      t1: time of the N(0, I) prior.
      solver: ``"tsit5"`` or ``"dopri5"``.
      max_steps: solver step limit.

    Returns:
      An :class:`ODEBpd`.
    """
    if num_dequant_samples < 1:
        raise ValueError(f"num_dequant_samples must be >= 1, got {num_dequant_samples}")
    if dequantization not in DEQUANTIZATIONS:
        raise ValueError(
            f"unknown dequantization {dequantization!r}; allowed: {sorted(DEQUANTIZATIONS)}"
        )
    key_u, key_ode = jax.random.split(key)
    samples, batch, dims = num_dequant_samples, x.shape[0], _flat_dims(x.shape)
    gamma_t0 = gamma_fn(jnp.asarray(t0, jnp.float32))
    x_rep = jnp.broadcast_to(x, (samples, *x.shape)).reshape((samples * batch, *x.shape[1:]))
    z, offset, recon = DEQUANTIZATIONS[dequantization].draw(key_u, x_rep, gamma_t0, vocab_size)
    result = ode_log_likelihood(
        key_ode,
        z,
        gamma_fn,
        eps_fn,
        divergence=divergence,
        probe=probe,
        rtol=rtol,
        atol=atol,
        t0=t0,
        t1=t1,
        solver=solver,
        max_steps=max_steps,
    )
    nats = (offset - result.log_prob).reshape(samples, batch)
    if samples > 1:
        stderr = jnp.std(nats, axis=0, ddof=1) / math.sqrt(samples)
    else:
        stderr = jnp.full((batch,), jnp.nan)
    iw_nats = -(jax.nn.logsumexp(-nats, axis=0) - math.log(samples))
    return ODEBpd(
        bpd=diffusion.bits_per_dim(jnp.mean(nats, axis=0), dims),
        bpd_stderr=diffusion.bits_per_dim(stderr, dims),
        bpd_importance_weighted=diffusion.bits_per_dim(iw_nats, dims),
        nats=nats,
        bpd_recon=diffusion.bits_per_dim(jnp.mean(recon.reshape(samples, batch), axis=0), dims),
        num_function_evals=result.num_function_evals,
        success=result.success,
        rtol=result.rtol,
        atol=result.atol,
    )
