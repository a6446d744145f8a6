"""Lower-variance estimates of the continuous-time negative ELBO, per image, with errors.

``prior + recon + diffusion`` (in nats per example here; convert with
:func:`vdm_jax.diffusion.bits_per_dim`) is an upper bound on ``-log P_VDM(x)``, the negative
log-likelihood of the discrete data under the VDM's own generative model: ``z_1 ~ N(0, I)``,
the reverse diffusion (the continuous-time limit of the ancestral sampler), then the
discretized decoder ``p(x | z_0)``. This is the number the VDM paper reports (2.65 bpd on
CIFAR-10). :func:`elbo_eval` estimates it without bias and with a Monte Carlo standard error;
several time samples per image, low-discrepancy points (:data:`TIME_POINTS`) and importance
sampling of ``t`` (:func:`fit_proposal`) lower the error at a fixed number of network
evaluations. The probability-flow ODE's bounds are in :mod:`vdm_jax.ode_likelihood`.

Conventions: ``gamma_fn: t -> gamma`` elementwise; ``eps_fn(z_t [B, ...], gamma_t [B]) ->
eps_hat [B, ...]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from vdm_jax import diffusion, schedules


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
    mean_sq, count = _binned_mean_squares(t, integrand, num_bins)
    return proposal_from_moments(jnp.where(count > 0, mean_sq, jnp.max(mean_sq)), uniform_mix)


def _binned_mean_squares(
    t: jax.Array, integrand: jax.Array, num_bins: int
) -> tuple[jax.Array, jax.Array]:
    """Per bin of t: the mean of ``integrand^2`` (0 where empty) and the count, [M] each."""
    t, integrand = t.reshape(-1), integrand.reshape(-1).astype(jnp.float32)
    m = jnp.clip(jnp.floor(t * num_bins).astype(jnp.int32), 0, num_bins - 1)
    sum_sq = jax.ops.segment_sum(jnp.square(integrand), m, num_segments=num_bins)
    count = jax.ops.segment_sum(jnp.ones_like(integrand), m, num_segments=num_bins)
    return sum_sq / jnp.maximum(count, 1.0), count


def proposal_from_moments(second_moments: jax.Array, uniform_mix: float = 0.1) -> TimeProposal:
    """q(t) proportional to ``sqrt(E[L^2 | bin])`` from per-bin second moments [M], mixed with
    ``uniform_mix`` of the uniform density (see :func:`fit_proposal`)."""
    rms = jnp.sqrt(second_moments)
    probs = rms / jnp.sum(rms)
    num_bins = second_moments.shape[0]
    return TimeProposal((1.0 - uniform_mix) * probs + uniform_mix / num_bins)


def update_moments(
    second_moments: jax.Array, t: jax.Array, integrand: jax.Array, decay: float
) -> jax.Array:
    """Exponential moving average of ``E[L^2 | bin]`` [M] with one batch of times ``t`` and
    integrand values ``L(t)`` (not divided by the proposal density); bins the batch missed
    keep their value. The training-time proposal of ``model.adaptive_time``."""
    num_bins = second_moments.shape[0]
    mean_sq, count = _binned_mean_squares(t, integrand, num_bins)
    updated = decay * second_moments + (1.0 - decay) * mean_sq
    return jnp.where(count > 0, updated, second_moments)


def _stratified(key: jax.Array, batch_size: int, replicates: int, per: int) -> jax.Array:
    """One jittered point in each of ``per`` equal strata: ``(j + U_j) / per``, [B, R, per]."""
    jitter = jax.random.uniform(key, (batch_size, replicates, per))
    return (jnp.arange(per, dtype=jnp.float32) + jitter) / per


def _shifted(key: jax.Array, batch_size: int, replicates: int, per: int) -> jax.Array:
    """One random shift of an even grid: ``(U + j / per) mod 1``, [B, R, per]."""
    shift = jax.random.uniform(key, (batch_size, replicates, 1))
    return jnp.mod(shift + jnp.arange(per, dtype=jnp.float32) / per, 1.0)


def _iid(key: jax.Array, batch_size: int, replicates: int, per: int) -> jax.Array:
    """Independent uniforms, [B, R, per]."""
    return jax.random.uniform(key, (batch_size, replicates, per))


class TimePoints(NamedTuple):
    """A registered scheme of time points.

    Attributes:
      draw: ``(key, B, R, S) -> [B, R, S]`` uniforms in [0, 1), S points per replicate.
      independent_points: every point is independent of the others (each its own
        replicate), so the scheme needs no grouping into replicates.
    """

    draw: Callable[[jax.Array, int, int, int], jax.Array]
    independent_points: bool


TIME_POINTS: dict[str, TimePoints] = {
    "iid": TimePoints(_iid, independent_points=True),
    "stratified": TimePoints(_stratified, independent_points=False),
    "shifted": TimePoints(_shifted, independent_points=False),
}


def time_uniforms(
    key: jax.Array,
    batch_size: int,
    num_samples: int,
    *,
    num_replicates: int = 2,
    time_points: str = "stratified",
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
      time_points: a key of :data:`TIME_POINTS`: ``"iid"`` (independent uniforms),
        ``"stratified"`` (one jittered point in each of S equal strata: ``(j + U_j) / S``)
        or ``"shifted"`` (one random shift of an even grid: ``(U + j / S) mod 1``, as in
        :func:`vdm_jax.diffusion.sample_times`).
    """
    if time_points not in TIME_POINTS:
        raise ValueError(f"unknown time points {time_points!r}; allowed: {sorted(TIME_POINTS)}")
    scheme = TIME_POINTS[time_points]
    replicates = effective_replicates(num_samples, num_replicates, time_points)
    if replicates < 2 or num_samples % replicates:
        raise ValueError(
            f"need num_replicates >= 2 dividing num_samples, got {num_replicates}, {num_samples}"
        )
    u = scheme.draw(key, batch_size, replicates, num_samples // replicates)
    return jnp.minimum(u, 1.0 - 1e-7).reshape(batch_size, num_samples)


def effective_replicates(num_samples: int, num_replicates: int, time_points: str) -> int:
    """Number of independent replicates behind :func:`time_uniforms`' columns."""
    return num_samples if TIME_POINTS[time_points].independent_points else num_replicates


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
    time_points: str = "stratified",
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
      time_points: a key of :data:`TIME_POINTS`.
      proposal: importance-sampling density of t; None for uniform t.

    Returns:
      A :class:`DiffusionSamples`.
    """
    key_u, key_eps = jax.random.split(key)
    batch = f.shape[0]
    u = time_uniforms(
        key_u, batch, num_samples, num_replicates=num_replicates, time_points=time_points
    )
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
    time_points: str = "stratified",
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
      time_points: a key of :data:`TIME_POINTS`.
      proposal: importance-sampling density of t (:func:`fit_proposal`); None = uniform.

    Returns:
      An :class:`ELBOEstimate` in nats; bits/dim by :func:`vdm_jax.diffusion.bits_per_dim`
      (linear, so it applies to the standard errors too).
    """
    key_diff, key_recon = jax.random.split(key)
    replicates = effective_replicates(num_time_samples, num_replicates, time_points)
    f = diffusion.encode(x, vocab_size)
    gamma_0, gamma_1 = gamma_fn(jnp.zeros(())), gamma_fn(jnp.ones(()))
    diff = diffusion_loss_samples(
        key_diff,
        f,
        gamma_fn,
        eps_fn,
        num_samples=num_time_samples,
        num_replicates=num_replicates,
        time_points=time_points,
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
