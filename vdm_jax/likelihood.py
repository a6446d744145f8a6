"""Likelihood evaluation: the probability-flow ODE and lower-variance ELBO estimates.

Two kinds of number, bounding two different things (both in nats per example here; convert
with :func:`vdm_jax.diffusion.bits_per_dim`):

* **ELBO bpd** (:func:`elbo_eval`): ``prior + recon + diffusion`` is an upper bound on
  ``-log P_VDM(x)``, the negative log-likelihood of the discrete data under the VDM's own
  generative model: ``z_1 ~ N(0, I)``, the reverse diffusion (the continuous-time limit of the
  ancestral sampler), then the discretized decoder ``p(x | z_0)``. This is the number the VDM
  paper reports (2.65 bpd on CIFAR-10). The estimate here is unbiased for that bound and comes
  with a Monte Carlo standard error; several time samples per image, low-discrepancy points
  and importance sampling of ``t`` lower the error at a fixed number of network evaluations.
* **ODE bpd** (:func:`ode_bpd`): ``E_u[-log p_Y(y)] + D log(K / 2)`` with
  ``y = 2 (x + u) / K - 1``, ``u ~ U[0, 1)^D``, is an upper bound on ``-log P_ODE(x)``, where
  ``P_ODE(x)`` is the probability that a *continuous* model puts on the bin of ``x``: the
  density ``p_Y`` of ``z_t0 / alpha_t0`` when ``z_1 ~ N(0, I)`` is carried from ``t1 = 1`` to
  ``t0`` by the deterministic probability-flow ODE. ``p_Y`` is computed exactly (up to the
  solver tolerance, and unbiasedly with a Hutchinson trace estimator) by the instantaneous
  change of variables. This is the "uniform dequantization" protocol of continuous flows and
  of score-based ODE likelihoods (Song et al., 2021, who add 7 bits for data in [-1, 1] and
  8-bit images: ``log2(K / 2)`` with ``K = 256``), so it is comparable with their numbers, and
  *not* with numbers that use variational or truncated-normal dequantization.
* **ODE bpd, decoder dequantization** (``ode_bpd(..., dequantization="decoder")``):
  ``E_{z_0 ~ q(z_0|x)}[-log p(x|z_0) - log p_ODE(z_0) + log q(z_0|x)]`` bounds
  ``-log P_ODE+dec(x)`` for the model ``z_0 ~ p_ODE`` (the ODE's density at ``t = 0``) followed
  by the VDM's own discretized decoder. It uses the same encoder, decoder and prior as the
  ELBO; the only difference is that ``-log p(z_0)`` is computed exactly along the ODE instead
  of being bounded by the diffusion and prior terms. With an exact score the two models
  coincide and this bound is at most the ELBO; for a trained model the two numbers should
  be close, which makes it the consistency check between the two methods. One caution: a
  score that is poor at very low noise can make the ODE model put almost no density on a
  few of the draws from ``q(z_0 | x)`` (a tiny MLP with ``gamma_0 ~ -9.4`` gave ~90 nats
  instead of ~3.5 for one draw in a few hundred, at any solver tolerance), so look at the
  spread of the per-image values, not only the mean.

``P_VDM`` and ``P_ODE`` are different models of the same data, so neither bound bounds the
other; for a well-trained model they should be close. One caveat: VDM trains on bin centres
``f(x)`` with a tiny ``sigma_0`` (``gamma_min = -13.3`` gives ``sigma_0 ~ 1.3e-3``), so the
model's ``t0 = 0`` density may be much narrower than a bin, and uniform dequantization then
pays for the empty parts of each bin; a larger ``t0`` gives a smoother density and is still a
valid bound (any normalised density on ``y`` is).

Probability-flow ODE of the variance-preserving process with ``sigma_t^2 = sigmoid(gamma_t)``
(derivation in :func:`probability_flow_drift`)::

    dz/dt = 0.5 gamma'(t) (sigma_t eps_hat(z, gamma_t) - sigma_t^2 z)

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

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
SOLVERS = ("tsit5", "dopri5")
TIME_METHODS = ("iid", "stratified", "shifted")
DEQUANTIZATIONS = ("uniform", "decoder")

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


def _time_coefficients(
    gamma_fn: schedules.GammaFn, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(0.5 gamma'(t), sigma_t, sigma_t^2) at a scalar time."""
    gamma, dgamma = schedules.gamma_and_derivative(gamma_fn, jnp.asarray(t, jnp.float32))
    sigma2 = schedules.sigma2(gamma)
    return 0.5 * dgamma, jnp.sqrt(sigma2), sigma2


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
    half_dgamma, sigma, sigma2 = _time_coefficients(gamma_fn, t)
    gamma_t = jnp.full((z.shape[0],), gamma_fn(jnp.asarray(t, jnp.float32)))
    eps_hat = eps_fn(z, gamma_t).astype(jnp.float32)
    return half_dgamma * (sigma * eps_hat - sigma2 * z)


def _solver(name: str) -> diffrax.AbstractSolver:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; allowed: {SOLVERS}")
    return diffrax.Tsit5() if name == "tsit5" else diffrax.Dopri5()


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


def _exact_divergence(
    eps_of: Callable[[jax.Array], jax.Array], z: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """eps_hat [B, ...] and the exact trace of d eps_hat_b / d z_b per example, [B].

    One linearisation and D batched Jacobian-vector products with the basis vectors.
    """
    batch, dims = z.shape[0], _flat_dims(z.shape)
    eps_hat, jvp_fn = jax.linearize(eps_of, z)
    basis = jnp.eye(dims, dtype=z.dtype).reshape((dims, 1, *z.shape[1:]))
    columns = jax.vmap(jvp_fn)(jnp.broadcast_to(basis, (dims, *z.shape)))
    columns = columns.reshape(dims, batch, dims)
    return eps_hat, jnp.sum(jnp.diagonal(columns, axis1=0, axis2=2), axis=-1)


def _hutchinson_divergence(
    eps_of: Callable[[jax.Array], jax.Array], z: jax.Array, probe: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """eps_hat [B, ...] and ``v^T (d eps_hat / d z) v`` per example [B] from one JVP."""
    eps_hat, jv = jax.jvp(eps_of, (z,), (probe,))
    return eps_hat, diffusion.sum_except_batch(probe * jv.astype(jnp.float32))


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
        raise ValueError(f"unknown divergence {divergence!r}; allowed: {DIVERGENCES}")
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; allowed: {PROBES}")
    if not t1 > t0:
        raise ValueError(f"need t1 > t0, got t0={t0}, t1={t1}")
    y = y.astype(jnp.float32)
    batch, dims = y.shape[0], _flat_dims(y.shape)
    if probe == "rademacher":
        v = jax.random.rademacher(key, y.shape, dtype=jnp.float32)
    else:
        v = jax.random.normal(key, y.shape, dtype=jnp.float32)

    def vector_field(t, state, args):
        z, _ = state
        half_dgamma, sigma, sigma2 = _time_coefficients(gamma_fn, t)
        gamma_t = jnp.full((batch,), gamma_fn(jnp.asarray(t, jnp.float32)))

        def eps_of(z_):
            return eps_fn(z_, gamma_t).astype(jnp.float32)

        if divergence == "exact":
            eps_hat, div_eps = _exact_divergence(eps_of, z)
        else:
            eps_hat, div_eps = _hutchinson_divergence(eps_of, z, v)
        dz = half_dgamma * (sigma * eps_hat - sigma2 * z)
        d_delta = half_dgamma * (sigma * div_eps - sigma2 * dims)
        return dz, d_delta

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
      dequantization: ``"uniform"`` or ``"decoder"`` (see above).
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
        raise ValueError(f"unknown dequantization {dequantization!r}; allowed: {DEQUANTIZATIONS}")
    key_u, key_ode = jax.random.split(key)
    samples, batch, dims = num_dequant_samples, x.shape[0], _flat_dims(x.shape)
    gamma_t0 = gamma_fn(jnp.asarray(t0, jnp.float32))
    x_rep = jnp.broadcast_to(x, (samples, *x.shape)).reshape((samples * batch, *x.shape[1:]))
    if dequantization == "uniform":
        log_alpha = 0.5 * schedules.log_alpha2(gamma_t0)
        u = jax.random.uniform(key_u, x_rep.shape)
        y = 2.0 * (x_rep.astype(jnp.float32) + u) / vocab_size - 1.0
        z = jnp.exp(log_alpha) * y
        # -log p_V(v) = -log p_t0(z) - D log alpha_t0 + D log(K / 2).
        offset = -dims * log_alpha + dequantization_log_jacobian(dims, vocab_size)
        recon = jnp.zeros((samples * batch,), jnp.float32)
    else:
        eps = jax.random.normal(key_u, x_rep.shape)
        z = diffusion.diffuse(diffusion.encode(x_rep, vocab_size), gamma_t0, eps)
        # q(z | x) = N(alpha f(x), sigma^2 I): the density of eps over sigma^D.
        log_q = standard_normal_log_prob(eps) - dims * 0.5 * schedules.log_sigma2(gamma_t0)
        recon = diffusion.reconstruction_loss(x_rep, z, gamma_t0, vocab_size)
        offset = recon + log_q
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
    to_bpd = 1.0 / (dims * math.log(2.0))
    bpd = jnp.mean(nats, axis=0) * to_bpd
    if samples > 1:
        stderr = jnp.std(nats, axis=0, ddof=1) / math.sqrt(samples) * to_bpd
    else:
        stderr = jnp.full((batch,), jnp.nan)
    iw_nats = -(jax.nn.logsumexp(-nats, axis=0) - math.log(samples))
    return ODEBpd(
        bpd=bpd,
        bpd_stderr=stderr,
        bpd_importance_weighted=iw_nats * to_bpd,
        nats=nats,
        bpd_recon=jnp.mean(recon.reshape(samples, batch), axis=0) * to_bpd,
        num_function_evals=result.num_function_evals,
        success=result.success,
        rtol=result.rtol,
        atol=result.atol,
    )


# --------------------------------------------------------------------------------------
# Lower-variance ELBO estimation
# --------------------------------------------------------------------------------------


class TimeProposal(NamedTuple):
    """A piecewise-constant density q(t) on M equal bins of [0, 1].

    Attributes:
      bin_probs: [M] probability of each bin, positive, summing to 1; the density on bin
        ``m`` is ``M bin_probs[m]``.
    """

    bin_probs: jax.Array


def uniform_proposal(num_bins: int = 1) -> TimeProposal:
    """q(t) = 1 on [0, 1] (plain uniform t), as an M-bin proposal."""
    return TimeProposal(jnp.full((num_bins,), 1.0 / num_bins, jnp.float32))


def proposal_density(proposal: TimeProposal, t: jax.Array) -> jax.Array:
    """q(t) for times in [0, 1], any shape."""
    probs = proposal.bin_probs
    num_bins = probs.shape[0]
    m = jnp.clip(jnp.floor(t * num_bins).astype(jnp.int32), 0, num_bins - 1)
    return num_bins * probs[m]


def sample_proposal(proposal: TimeProposal, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inverse-CDF transform of uniforms ``u`` in [0, 1) to times ``t ~ q``, any shape.

    Low-discrepancy ``u`` (see :func:`time_uniforms`) stay low-discrepancy under q.

    Returns:
      ``(t, q_t)``: the times and the density of each at its own bin (exactly the density
      the time was drawn from, without re-binning it).
    """
    probs = proposal.bin_probs / jnp.sum(proposal.bin_probs)
    num_bins = probs.shape[0]
    cdf = jnp.concatenate([jnp.zeros((1,), probs.dtype), jnp.cumsum(probs)])
    m = jnp.clip(jnp.searchsorted(cdf, u, side="right") - 1, 0, num_bins - 1)
    frac = jnp.clip((u - cdf[m]) / probs[m], 0.0, 1.0)
    t = jnp.minimum((m + frac) / num_bins, 1.0 - 1e-7)
    return t, num_bins * probs[m]


def fit_proposal(
    t: jax.Array, integrand: jax.Array, *, num_bins: int = 32, uniform_mix: float = 0.1
) -> TimeProposal:
    """Variance-minimising piecewise-constant proposal from pilot samples of the loss.

    For ``E_{t~q}[L(t) / q(t)]`` the variance is ``integral E[L^2 | t] / q(t) dt - mean^2``,
    minimised by ``q(t) proportional to sqrt(E[L^2 | t])``. This estimates
    ``sqrt(E[L^2 | t])`` per bin from the pilot and mixes in ``uniform_mix`` of the uniform
    density, so that every bin keeps positive mass (unbiasedness) and weights stay bounded
    by ``1 / uniform_mix``. Bins without pilot samples get the largest estimate.

    Args:
      t: [N] pilot times in [0, 1) (any shape; flattened).
      integrand: [N] the per-example diffusion integrand ``L(t) = 0.5 gamma'(t)
        ||eps - eps_hat||^2`` at those times (:attr:`DiffusionSamples.integrand`, not divided
        by the pilot's proposal density).
      num_bins: M.
      uniform_mix: weight of the uniform density in the mixture, in (0, 1].

    Returns:
      A :class:`TimeProposal`.
    """
    if not 0.0 < uniform_mix <= 1.0:
        raise ValueError(f"uniform_mix must be in (0, 1], got {uniform_mix}")
    t, integrand = t.reshape(-1), integrand.reshape(-1).astype(jnp.float32)
    m = jnp.clip(jnp.floor(t * num_bins).astype(jnp.int32), 0, num_bins - 1)
    sum_sq = jax.ops.segment_sum(jnp.square(integrand), m, num_segments=num_bins)
    count = jax.ops.segment_sum(jnp.ones_like(integrand), m, num_segments=num_bins)
    rms = jnp.sqrt(sum_sq / jnp.maximum(count, 1.0))
    rms = jnp.where(count > 0, rms, jnp.max(rms))
    probs = rms / jnp.sum(rms)
    probs = (1.0 - uniform_mix) * probs + uniform_mix / num_bins
    return TimeProposal(probs)


def time_uniforms(
    key: jax.Array,
    batch_size: int,
    num_samples: int,
    *,
    num_replicates: int = 2,
    method: str = "stratified",
) -> jax.Array:
    """K uniforms in [0, 1) per example, grouped into R independent replicates, [B, K].

    Column ``r * S + j`` (``S = K / R``) is point ``j`` of replicate ``r``. Within a
    replicate the S points are low-discrepancy; replicates (and examples) are independent,
    so the spread of replicate means gives an honest standard error
    (:func:`replicate_mean_stderr`).

    Args:
      key: PRNG key.
      batch_size: B.
      num_samples: K, a multiple of ``num_replicates``.
      num_replicates: R >= 2 (ignored by ``"iid"``, whose K points are each a replicate).
      method: ``"iid"`` (independent uniforms), ``"stratified"`` (one jittered point in
        each of S equal strata: ``(j + U_j) / S``) or ``"shifted"`` (one random shift of an
        even grid: ``(U + j / S) mod 1``, as in :func:`vdm_jax.diffusion.sample_times`).
    """
    if method not in TIME_METHODS:
        raise ValueError(f"unknown time method {method!r}; allowed: {TIME_METHODS}")
    if method == "iid":
        return jax.random.uniform(key, (batch_size, num_samples))
    if num_replicates < 2 or num_samples % num_replicates:
        raise ValueError(
            f"need num_replicates >= 2 dividing num_samples, got {num_replicates}, {num_samples}"
        )
    per = num_samples // num_replicates
    j = jnp.arange(per, dtype=jnp.float32)
    if method == "stratified":
        jitter = jax.random.uniform(key, (batch_size, num_replicates, per))
        u = (j + jitter) / per
    else:
        shift = jax.random.uniform(key, (batch_size, num_replicates, 1))
        u = jnp.mod(shift + j / per, 1.0)
    return jnp.minimum(u, 1.0 - 1e-7).reshape(batch_size, num_samples)


def effective_replicates(num_samples: int, num_replicates: int, method: str) -> int:
    """Number of independent replicates behind :func:`time_uniforms`' columns."""
    return num_samples if method == "iid" else num_replicates


class DiffusionSamples(NamedTuple):
    """K draws of the diffusion term per example, from :func:`diffusion_loss_samples`.

    Attributes:
      t: [B, K] times.
      integrand: [B, K] ``L(t) = 0.5 gamma'(t) ||eps - eps_hat(z_t, gamma_t)||^2`` in nats.
      estimate: [B, K] ``L(t) / q(t)``, each an unbiased estimate of the diffusion term.
    """

    t: jax.Array
    integrand: jax.Array
    estimate: jax.Array


def diffusion_loss_samples(
    key: jax.Array,
    f: jax.Array,
    gamma_fn: schedules.GammaFn,
    eps_fn: diffusion.EpsFn,
    *,
    num_samples: int,
    num_replicates: int = 2,
    method: str = "stratified",
    proposal: TimeProposal | None = None,
) -> DiffusionSamples:
    """Continuous-time diffusion term at K times per example: K calls of ``eps_fn`` on [B, ...].

    The calls run one after another (``lax.map``), so memory is that of one batch.

    Args:
      key: PRNG key for times and noise.
      f: [B, ...] encoded data (or any real-valued data).
      gamma_fn: elementwise schedule ``t -> gamma``.
      eps_fn: noise predictor ``(z_t [B, ...], gamma_t [B]) -> eps_hat [B, ...]``.
      num_samples: K.
      num_replicates: R, see :func:`time_uniforms`.
      method: ``"iid"``, ``"stratified"`` or ``"shifted"``.
      proposal: importance-sampling density of t; None for uniform t.

    Returns:
      A :class:`DiffusionSamples`.
    """
    key_u, key_eps = jax.random.split(key)
    batch = f.shape[0]
    u = time_uniforms(key_u, batch, num_samples, num_replicates=num_replicates, method=method)
    if proposal is None:
        t, q_t = u, jnp.ones_like(u)
    else:
        t, q_t = sample_proposal(proposal, u)
    keys = jax.random.split(key_eps, num_samples)

    def one_time(args: tuple[jax.Array, jax.Array]) -> jax.Array:
        t_k, key_k = args
        gamma_t, dgamma_dt = schedules.gamma_and_derivative(gamma_fn, t_k)
        eps = jax.random.normal(key_k, f.shape)
        return diffusion.diffusion_loss(f, eps, gamma_t, dgamma_dt, eps_fn)

    integrand = jax.lax.map(one_time, (t.T, keys)).T
    return DiffusionSamples(t=t, integrand=integrand, estimate=integrand / q_t)


def replicate_mean_stderr(samples: jax.Array, num_replicates: int) -> tuple[jax.Array, jax.Array]:
    """Per-example mean over K samples and its standard error from R replicate means.

    Args:
      samples: [B, K], columns grouped by replicate as in :func:`time_uniforms`.
      num_replicates: R (K for iid samples: :func:`effective_replicates`).

    Returns:
      ``(mean, stderr)``, each [B]: ``stderr = std(replicate means, ddof=1) / sqrt(R)``.
    """
    batch, k = samples.shape
    means = samples.reshape(batch, num_replicates, k // num_replicates).mean(axis=-1)
    stderr = jnp.std(means, axis=-1, ddof=1) / math.sqrt(num_replicates)
    return means.mean(axis=-1), stderr


class ELBOEstimate(NamedTuple):
    """Per-example negative-ELBO estimate in nats, each field [B] unless noted.

    Attributes:
      prior: KL(q(z_1 | x) || N(0, I)), exact.
      recon: reconstruction term, mean over R draws of z_0.
      diffusion: diffusion term, mean over K time samples.
      total: prior + recon + diffusion, unbiased for the per-example negative ELBO.
      recon_stderr: Monte Carlo standard error of ``recon``.
      diffusion_stderr: Monte Carlo standard error of ``diffusion``.
      total_stderr: Monte Carlo standard error of ``total``.
      num_function_evals: [] int, calls of ``eps_fn`` (each on the whole batch): K.
    """

    prior: jax.Array
    recon: jax.Array
    diffusion: jax.Array
    total: jax.Array
    recon_stderr: jax.Array
    diffusion_stderr: jax.Array
    total_stderr: jax.Array
    num_function_evals: jax.Array


def elbo_eval(
    key: jax.Array,
    x: jax.Array,
    gamma_fn: schedules.GammaFn,
    eps_fn: diffusion.EpsFn,
    *,
    vocab_size: int,
    num_time_samples: int = 8,
    num_replicates: int = 2,
    method: str = "stratified",
    proposal: TimeProposal | None = None,
) -> ELBOEstimate:
    """Continuous-time negative ELBO per example with K time samples and a standard error.

    The prior and reconstruction terms are those of :func:`vdm_jax.diffusion.elbo_terms`;
    the diffusion term averages K draws (:func:`diffusion_loss_samples`). Replicate ``r``
    pairs its diffusion mean with its own draw of z_0 for the reconstruction term, so the
    R replicate totals are i.i.d. and their spread is the standard error of ``total``.

    For the whole evaluation split, combine with :func:`split_mean_stderr`.

    Args:
      key: PRNG key.
      x: [B, ...] integers in {0..K-1}.
      gamma_fn: elementwise schedule ``t -> gamma``.
      eps_fn: noise predictor ``(z_t [B, ...], gamma_t [B]) -> eps_hat [B, ...]``.
      vocab_size: K (number of data values; not the number of time samples).
      num_time_samples: time samples (network calls) per example.
      num_replicates: independent replicates (>= 2) for ``"stratified"`` / ``"shifted"``.
      method: ``"iid"``, ``"stratified"`` or ``"shifted"`` time points.
      proposal: importance-sampling density of t (:func:`fit_proposal`); None = uniform.

    Returns:
      An :class:`ELBOEstimate` in nats; bits/dim by :func:`vdm_jax.diffusion.bits_per_dim`
      (linear, so it applies to the standard errors too).
    """
    key_diff, key_recon = jax.random.split(key)
    replicates = effective_replicates(num_time_samples, num_replicates, method)
    f = diffusion.encode(x, vocab_size)
    gamma_0, gamma_1 = gamma_fn(jnp.zeros(())), gamma_fn(jnp.ones(()))
    diff = diffusion_loss_samples(
        key_diff,
        f,
        gamma_fn,
        eps_fn,
        num_samples=num_time_samples,
        num_replicates=num_replicates,
        method=method,
        proposal=proposal,
    )
    batch = x.shape[0]
    diff_reps = diff.estimate.reshape(batch, replicates, -1).mean(axis=-1)  # [B, R]

    def recon_once(k: jax.Array) -> jax.Array:
        z_0 = diffusion.diffuse(f, gamma_0, jax.random.normal(k, f.shape))
        return diffusion.reconstruction_loss(x, z_0, gamma_0, vocab_size)

    recon_reps = jax.vmap(recon_once)(jax.random.split(key_recon, replicates)).T  # [B, R]
    prior = diffusion.prior_loss(f, gamma_1)
    total_reps = prior[:, None] + recon_reps + diff_reps
    recon, recon_se = replicate_mean_stderr(recon_reps, replicates)
    diff_mean, diff_se = replicate_mean_stderr(diff_reps, replicates)
    total, total_se = replicate_mean_stderr(total_reps, replicates)
    return ELBOEstimate(
        prior=prior,
        recon=recon,
        diffusion=diff_mean,
        total=total,
        recon_stderr=recon_se,
        diffusion_stderr=diff_se,
        total_stderr=total_se,
        num_function_evals=jnp.asarray(num_time_samples, jnp.int32),
    )


def split_mean_stderr(mean: jax.Array, stderr: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Average over a whole evaluation split and its Monte Carlo standard error.

    Per-example estimates are independent, so the error of the average is
    ``sqrt(sum_i stderr_i^2) / N``: the uncertainty from the random times and noise for
    this fixed split. (The spread of the per-example values, ``std(mean) / sqrt(N)``, is the
    larger sampling error of the split itself as a sample of the data distribution.)

    Args:
      mean: [N] per-example estimates (any units, e.g. bits/dim).
      stderr: [N] their standard errors.

    Returns:
      ``(average, stderr)``, scalars.
    """
    n = mean.shape[0]
    return jnp.mean(mean), jnp.sqrt(jnp.sum(jnp.square(stderr))) / n
