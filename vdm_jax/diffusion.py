"""The VDM negative ELBO as pure functions: encoder, discretized decoder, the three loss terms.

Everything is per example, in nats, for K-valued data ``x`` of any shape ``[B, ...]``.
The schedule enters only through :class:`ScheduleValues` (gamma at 0, at 1, at the sampled
times, and the diffusion weight), and the noise predictor is a plain function
``eps_fn(z_t, gamma_t) -> eps_hat``: any denoiser, an analytic one included, plugs in.

Gamma arrays come in two kinds. A **scalar** schedule gives ``[]`` or ``[B]`` (one gamma per
example). A **per-dimension** (multivariate) schedule gives an array of the data's rank whose
leading axis is ``B`` or 1 and whose other axes broadcast to the data's (``[B, H, W, C]``, or
``[1, 1, 1, C]`` for one gamma per channel): every formula below then holds dimension by
dimension, e.g. the continuous diffusion term is ``0.5 sum_i gamma_i'(t) (eps_i - eps_hat_i)^2``
(MuLAN: Sahoo, Gokaslan, De Sa, Kuleshov, "Diffusion Models With Learned Adaptive Noise",
NeurIPS 2024). :func:`is_per_dimension` tells the two apart.

Negative ELBO = prior + reconstruction + diffusion (Kingma, Salimans, Poole, Ho, 2021,
"Variational Diffusion Models"), where

* prior: ``KL(q(z_1 | x) || N(0, I))``;
* reconstruction: ``-log p(x | z_0)`` under the discretized decoder, one sample of z_0;
* diffusion, continuous time: ``0.5 gamma'(t) ||eps - eps_hat||^2``;
  discrete time with T steps: ``0.5 T expm1(gamma_t - gamma_s) ||eps - eps_hat||^2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from vdm_jax import schedules

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]


class ScheduleValues(NamedTuple):
    """All the schedule contributes to one loss evaluation.

    Attributes:
      gamma_0: [] gamma(0), for the reconstruction term (per-dimension: [B or 1, ...]).
      gamma_1: [] gamma(1), for the prior term (per-dimension: [B or 1, ...]).
      gamma_t: [B] gamma at each example's time (per-dimension: [B, ...]).
      weight: [B] diffusion weight: gamma'(t) (continuous) or T expm1(gamma_t - gamma_s)
        (per-dimension: [B, ...], one weight per dimension).
    """

    gamma_0: jax.Array
    gamma_1: jax.Array
    gamma_t: jax.Array
    weight: jax.Array


def encode(x: jax.Array, vocab_size: int) -> jax.Array:
    """Maps integers in {0..K-1} to the centres of K equal bins of (-1, 1): 2(x + 0.5)/K - 1."""
    return 2.0 * (x.astype(jnp.float32) + 0.5) / vocab_size - 1.0


def sum_except_batch(a: jax.Array) -> jax.Array:
    """[B, ...] -> [B]."""
    return jnp.sum(a.reshape(a.shape[0], -1), axis=-1)


def sample_times(key: jax.Array, batch_size: int, antithetic: bool = True) -> jax.Array:
    """Times in [0, 1) for a batch, [B].

    With ``antithetic``, ``t_i = (u + i / B) mod 1`` for one uniform ``u``: a low-discrepancy
    set that covers [0, 1) evenly and lowers the variance of the batch-mean loss.
    """
    if antithetic:
        u = jax.random.uniform(key, ())
        return jnp.mod(u + jnp.arange(batch_size, dtype=jnp.float32) / batch_size, 1.0)
    return jax.random.uniform(key, (batch_size,))


def is_per_dimension(gamma: jax.Array) -> bool:
    """A per-dimension gamma (data rank, >= 2 axes) rather than a scalar one ([] or [B])."""
    return gamma.ndim > 1


def batch_gamma(gamma: jax.Array, batch: int) -> jax.Array:
    """gamma at one time for a whole batch, as the noise predictor takes it.

    ``[] -> [B]`` (scalar schedule); a per-dimension ``[1 or B, ...] -> [B, ...]``.
    """
    if is_per_dimension(gamma):
        return jnp.broadcast_to(gamma, (batch, *gamma.shape[1:]))
    return jnp.full((batch,), gamma)


def schedule_values(
    gamma_fn: schedules.GammaFn, t: jax.Array, timesteps: int = 0
) -> ScheduleValues:
    """Evaluates a schedule at 0, 1 and the times ``t`` [B].

    A per-dimension schedule (``gamma_fn(t [B])`` of the data's rank) is evaluated at 0 and 1
    for every example too, ``gamma_fn(zeros [B])``: an input-adaptive one differs by example.

    Args:
      gamma_fn: schedule ``t -> gamma``, elementwise or per-dimension.
      t: [B] times in [0, 1).
      timesteps: 0 for continuous time; T > 0 moves each time to the grid point
        ``t_i = (floor(t T) + 1) / T`` in {1/T, ..., 1} and uses ``s = t_i - 1/T``.
    """
    if timesteps == 0:
        gamma_t, dgamma_dt = schedules.gamma_and_derivative(gamma_fn, t)
        weight = dgamma_dt
    else:
        t = (jnp.floor(t * timesteps) + 1.0) / timesteps
        gamma_t = gamma_fn(t)
        gamma_s = gamma_fn(t - 1.0 / timesteps)
        weight = timesteps * jnp.expm1(gamma_t - gamma_s)
    if is_per_dimension(gamma_t):
        gamma_0, gamma_1 = gamma_fn(jnp.zeros_like(t)), gamma_fn(jnp.ones_like(t))
    else:
        gamma_0, gamma_1 = gamma_fn(jnp.zeros(())), gamma_fn(jnp.ones(()))
    return ScheduleValues(gamma_0, gamma_1, gamma_t, weight)


def broadcast_batch(v: jax.Array, like: jax.Array) -> jax.Array:
    """[B] -> [B, 1, ..., 1] to broadcast against ``like`` [B, ...].

    Scalars and per-dimension arrays (already of ``like``'s rank) pass through.
    """
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim)) if v.ndim else v


def diffuse(f: jax.Array, gamma: jax.Array, eps: jax.Array) -> jax.Array:
    """Samples q(z_t | x): ``z_t = alpha_t f + sigma_t eps``; f, eps [B, ...], gamma any kind."""
    gamma = broadcast_batch(gamma, f)
    return jnp.sqrt(schedules.alpha2(gamma)) * f + jnp.sqrt(schedules.sigma2(gamma)) * eps


def prior_loss(f: jax.Array, gamma_1: jax.Array) -> jax.Array:
    """KL(q(z_1 | x) || N(0, I)) in nats, [B ...] -> [B].

    Per dimension ``0.5 (alpha^2 f^2 + sigma^2 - log sigma^2 - 1)``, rewritten with
    ``sigma^2 - 1 = -alpha^2`` so that no ``1 - sigmoid`` appears.
    """
    a2 = schedules.alpha2(gamma_1)
    kl = 0.5 * (a2 * (jnp.square(f) - 1.0) - schedules.log_sigma2(gamma_1))
    return sum_except_batch(kl)


def decoder_logits(z_0: jax.Array, gamma_0: jax.Array, vocab_size: int) -> jax.Array:
    """Discretized decoder logits log p(x_i = k | z_0) + const, [B, ...] -> [B, ..., K].

    ``p(x_i = k | z_0)`` is proportional to ``N(z_0,i / alpha_0; f(k), sigma_0^2 / alpha_0^2)``,
    and ``sigma_0^2 / alpha_0^2 = exp(gamma_0)``.
    """
    gamma_0 = broadcast_batch(gamma_0, z_0)
    z_rescaled = z_0 * jnp.exp(-0.5 * schedules.log_alpha2(gamma_0))
    centres = encode(jnp.arange(vocab_size), vocab_size)
    inv_std = jnp.exp(-0.5 * gamma_0)[..., None]
    return -0.5 * jnp.square((z_rescaled[..., None] - centres) * inv_std)


def reconstruction_loss(
    x: jax.Array, z_0: jax.Array, gamma_0: jax.Array, vocab_size: int
) -> jax.Array:
    """-log p(x | z_0) in nats under the discretized decoder, [B, ...] -> [B]."""
    log_probs = jax.nn.log_softmax(decoder_logits(z_0, gamma_0, vocab_size), axis=-1)
    picked = jnp.take_along_axis(log_probs, x[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return -sum_except_batch(picked)


def diffusion_loss(
    f: jax.Array, eps: jax.Array, gamma_t: jax.Array, weight: jax.Array, eps_fn: EpsFn
) -> jax.Array:
    """Diffusion term ``0.5 w_t ||eps - eps_hat(z_t, gamma_t)||^2`` in nats, [B].

    Args:
      f: [B, ...] encoded (or any real-valued) data.
      eps: [B, ...] standard normal noise.
      gamma_t: [B] gamma at each example's time (per-dimension: [B, ...]).
      weight: [B] diffusion weight from :func:`schedule_values` (per-dimension: [B, ...]).
      eps_fn: noise predictor ``(z_t [B, ...], gamma_t) -> eps_hat [B, ...]``.
    """
    z_t = diffuse(f, gamma_t, eps)
    eps_hat = eps_fn(z_t, gamma_t).astype(jnp.float32)
    if is_per_dimension(weight):
        return 0.5 * sum_except_batch(weight * jnp.square(eps - eps_hat))
    return 0.5 * weight * sum_except_batch(jnp.square(eps - eps_hat))


def elbo_terms(
    x: jax.Array, values: ScheduleValues, key: jax.Array, eps_fn: EpsFn, vocab_size: int
) -> dict[str, jax.Array]:
    """The three negative-ELBO terms per example in nats, given the schedule's values.

    Args:
      x: [B, ...] integers in {0..K-1}.
      values: the schedule at 0, 1 and the sampled times.
      key: PRNG key for the diffusion noise and the z_0 sample.
      eps_fn: noise predictor ``(z_t, gamma_t) -> eps_hat``.
      vocab_size: K.

    Returns:
      ``{"prior", "recon", "diffusion"}``, each [B] in nats.
    """
    key_eps, key_0 = jax.random.split(key)
    f = encode(x, vocab_size)
    eps = jax.random.normal(key_eps, f.shape)
    z_0 = diffuse(f, values.gamma_0, jax.random.normal(key_0, f.shape))
    return {
        "prior": prior_loss(f, values.gamma_1),
        "recon": reconstruction_loss(x, z_0, values.gamma_0, vocab_size),
        "diffusion": diffusion_loss(f, eps, values.gamma_t, values.weight, eps_fn),
    }


def vdm_terms(
    x: jax.Array,
    key: jax.Array,
    gamma_fn: schedules.GammaFn,
    eps_fn: EpsFn,
    *,
    vocab_size: int,
    timesteps: int = 0,
    antithetic_time: bool = True,
) -> dict[str, jax.Array]:
    """Negative-ELBO terms per example for any schedule and noise predictor.

    Args:
      x: [B, ...] integers in {0..K-1}.
      key: PRNG key.
      gamma_fn: elementwise schedule ``t -> gamma``.
      eps_fn: noise predictor ``(z_t [B, ...], gamma_t [B]) -> eps_hat [B, ...]``.
      vocab_size: K.
      timesteps: 0 for continuous time, else the number of discrete steps T.
      antithetic_time: low-discrepancy times over the batch.

    Returns:
      ``{"prior", "recon", "diffusion"}``, each [B] in nats; see :func:`bits_per_dim`.
    """
    key_t, key_rest = jax.random.split(key)
    t = sample_times(key_t, x.shape[0], antithetic_time)
    return elbo_terms(x, schedule_values(gamma_fn, t, timesteps), key_rest, eps_fn, vocab_size)


def bits_per_dim(nats: jax.Array, num_dims: int) -> jax.Array:
    """Converts nats per example to bits per dimension: nats / (D ln 2)."""
    return nats / (num_dims * math.log(2.0))
