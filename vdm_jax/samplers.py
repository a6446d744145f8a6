"""Samplers: ancestral, DDIM and DPM-Solver++(2M) on a time grid; the adaptive ODE solve.

The grid samplers (:data:`SAMPLERS`) run ``num_steps`` steps from ``t = 1`` to ``t = 0`` on
the grid ``t_i = i / T`` inside a ``lax.fori_loop`` (no host round trip per step). Noise for
step ``i`` comes from ``fold_in(key, i)``. DDIM and DPM-Solver++(2M) follow the
probability-flow ODE: first and second order in the step of the half log-SNR
``lambda = -gamma / 2`` (with a linear schedule, in 1 / T). The adaptive sampler
(:data:`ADAPTIVE_SAMPLERS`, ``"ode"``) solves the same ODE with diffrax's Tsit5 to a
tolerance instead. Every sampler then decodes ``z_0`` to integers with the discretized
decoder.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from vdm_jax import diffusion, ode_likelihood, schedules


class StepMemory(NamedTuple):
    """What a multistep solver carries from one step to the next.

    Attributes:
      x_hat: [B, ...] the previous step's data prediction.
      h: [] the previous step's increment of ``lambda = -gamma / 2`` (per-dimension schedule:
        one per dimension, of gamma's shape); 0 before the first step.
    """

    x_hat: jax.Array
    h: jax.Array


# (key, z_t [B, ...], eps_hat [B, ...], gamma_t [], gamma_s [], memory) -> (z_s, memory).
StepFn = Callable[
    [jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, StepMemory],
    tuple[jax.Array, StepMemory],
]


def ancestral_step(
    key: jax.Array, z_t: jax.Array, eps_hat: jax.Array, gamma_t: jax.Array, gamma_s: jax.Array
) -> jax.Array:
    """One draw from p(z_s | z_t) = q(z_s | z_t, x = x_hat(z_t)), for s < t.

    ``z_s = sqrt(alpha_s^2 / alpha_t^2) (z_t - sigma_t c eps_hat) + sqrt(sigma_s^2 c) eps`` with
    ``c = -expm1(gamma_s - gamma_t)``. Shapes: z_t, eps_hat [B, ...]; gammas scalars.
    """
    c = -jnp.expm1(gamma_s - gamma_t)
    scale = jnp.exp(0.5 * (schedules.log_alpha2(gamma_s) - schedules.log_alpha2(gamma_t)))
    mean = scale * (z_t - jnp.sqrt(schedules.sigma2(gamma_t)) * c * eps_hat)
    std = jnp.sqrt(schedules.sigma2(gamma_s) * c)
    return mean + std * jax.random.normal(key, z_t.shape)


def _x_hat(z_t: jax.Array, eps_hat: jax.Array, gamma_t: jax.Array) -> jax.Array:
    """The data prediction ``(z_t - sigma_t eps_hat) / alpha_t``."""
    return (z_t - jnp.sqrt(schedules.sigma2(gamma_t)) * eps_hat) * jnp.exp(
        -0.5 * schedules.log_alpha2(gamma_t)
    )


def ddim_step(
    key: jax.Array, z_t: jax.Array, eps_hat: jax.Array, gamma_t: jax.Array, gamma_s: jax.Array
) -> jax.Array:
    """Deterministic DDIM step: ``z_s = alpha_s x_hat + sigma_s eps_hat``.

    Here ``x_hat = (z_t - sigma_t eps_hat) / alpha_t``.

    ``key`` is unused; it keeps the signature of :func:`ancestral_step`.
    """
    del key
    x_hat = _x_hat(z_t, eps_hat, gamma_t)
    return (
        jnp.sqrt(schedules.alpha2(gamma_s)) * x_hat + jnp.sqrt(schedules.sigma2(gamma_s)) * eps_hat
    )


def dpm_solver_2m_step(
    key: jax.Array,
    z_t: jax.Array,
    eps_hat: jax.Array,
    gamma_t: jax.Array,
    gamma_s: jax.Array,
    memory: StepMemory,
) -> tuple[jax.Array, StepMemory]:
    """One step of DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided
    Sampling of Diffusion Probabilistic Models", Algorithm 2), for s < t.

    The probability-flow ODE in the data prediction, integrated exactly in its linear part:
    ``z_s = (sigma_s / sigma_t) z_t - alpha_s expm1(-h) D`` with ``h = lambda_s - lambda_t``,
    ``lambda = -gamma / 2``. ``D`` is the current ``x_hat`` on the first step (which is then
    DDIM) and ``(1 + 1 / (2 r)) x_hat - 1 / (2 r) x_hat_prev`` after it, ``r = h_prev / h``: a
    linear extrapolation of ``x_hat`` in lambda that makes the method second order.
    Shapes: z_t, eps_hat [B, ...]; gammas scalars, or per dimension (each dimension then
    steps in its own lambda, which its ODE is linear in). ``key`` is unused.
    """
    del key
    x_hat = _x_hat(z_t, eps_hat, gamma_t)
    h = 0.5 * (gamma_t - gamma_s)
    first = memory.h <= 0
    r = jnp.where(first, 1.0, memory.h / h)
    d = jnp.where(first, x_hat, (1.0 + 0.5 / r) * x_hat - (0.5 / r) * memory.x_hat)
    ratio = jnp.exp(0.5 * (schedules.log_sigma2(gamma_s) - schedules.log_sigma2(gamma_t)))
    z_s = ratio * z_t - jnp.sqrt(schedules.alpha2(gamma_s)) * jnp.expm1(-h) * d
    return z_s, StepMemory(x_hat, h)


def _one_step(step: Callable[..., jax.Array]) -> StepFn:
    """A single-step method as a :data:`StepFn` that carries its memory unchanged."""

    def with_memory(key, z_t, eps_hat, gamma_t, gamma_s, memory):
        return step(key, z_t, eps_hat, gamma_t, gamma_s), memory

    return with_memory


# Reverse-process steps by name (``sample.sampler``).
SAMPLERS: dict[str, StepFn] = {
    "ancestral": _one_step(ancestral_step),
    "ddim": _one_step(ddim_step),
    "dpm_solver_2m": dpm_solver_2m_step,
}


def probability_flow_latent(
    gamma_fn: schedules.GammaFn, eps_fn: diffusion.EpsFn, z_1: jax.Array, tolerance: float
) -> jax.Array:
    """z_0 [B, ...] from z_1 by the probability-flow ODE, solved adaptively (Tsit5, rtol = atol
    = ``tolerance``; :func:`vdm_jax.ode_likelihood.probability_flow`); NaN where the solve
    does not finish within its step limit."""
    return ode_likelihood.probability_flow(
        z_1, gamma_fn, eps_fn, t_start=1.0, t_end=0.0, rtol=tolerance, atol=tolerance
    ).z


# Samplers that choose their own steps by name (``sample.sampler``), with
# ``(gamma_fn, eps_fn, z_1, tolerance) -> z_0``.
ADAPTIVE_SAMPLERS: dict[str, Callable[..., jax.Array]] = {"ode": probability_flow_latent}
SAMPLER_NAMES = (*SAMPLERS, *ADAPTIVE_SAMPLERS)


def _decoder_mode(key: jax.Array, logits: jax.Array) -> jax.Array:
    del key
    return jnp.argmax(logits, axis=-1)


def _decoder_sample(key: jax.Array, logits: jax.Array) -> jax.Array:
    return jax.random.categorical(key, logits, axis=-1)


# How z_0 becomes integers (``sample.decode``): (key, logits [B, ..., K]) -> [B, ...].
DECODERS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "argmax": _decoder_mode,
    "sample": _decoder_sample,
}


def sample_latent(
    key: jax.Array,
    gamma_fn: schedules.GammaFn,
    eps_fn: diffusion.EpsFn,
    shape: tuple[int, ...],
    *,
    num_steps: int,
    sampler: str = "ancestral",
    z_1: jax.Array | None = None,
    tolerance: float = 1e-5,
) -> jax.Array:
    """Runs the reverse process from z_1 ~ N(0, I) to z_0, [B, ...] float32.

    Args:
      key: PRNG key.
      gamma_fn: elementwise schedule ``t -> gamma``.
      eps_fn: noise predictor ``(z_t [B, ...], gamma_t [B]) -> eps_hat [B, ...]``.
      shape: ``(B, ...)`` of the samples.
      num_steps: T, steps on the grid ``i / T`` (for a discrete-time model, its own T);
        unused by the adaptive samplers.
      sampler: a name of :data:`SAMPLER_NAMES`.
      z_1: [B, ...] the starting point instead of a draw from the prior (for the
        deterministic samplers, this makes the result a function of z_1).
      tolerance: relative and absolute tolerance of the adaptive samplers.
    """
    if sampler not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: {sorted(SAMPLER_NAMES)}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    key_init, key_steps = jax.random.split(key)
    if z_1 is None:
        z_1 = jax.random.normal(key_init, shape)
    if sampler in ADAPTIVE_SAMPLERS:
        return ADAPTIVE_SAMPLERS[sampler](gamma_fn, eps_fn, z_1, tolerance)
    step = SAMPLERS[sampler]

    def body(i: jax.Array, carry: tuple[jax.Array, StepMemory]) -> tuple[jax.Array, StepMemory]:
        z, memory = carry
        t = (num_steps - i) / num_steps
        s = (num_steps - i - 1) / num_steps
        gamma_t, gamma_s = (
            gamma_fn(jnp.asarray(t, jnp.float32)),
            gamma_fn(jnp.asarray(s, jnp.float32)),
        )
        eps_hat = eps_fn(z, diffusion.batch_gamma(gamma_t, shape[0])).astype(jnp.float32)
        return step(jax.random.fold_in(key_steps, i), z, eps_hat, gamma_t, gamma_s, memory)

    gamma_shape = jax.eval_shape(gamma_fn, jnp.ones((), jnp.float32)).shape
    memory = StepMemory(jnp.zeros(shape, jnp.float32), jnp.zeros(gamma_shape, jnp.float32))
    z_0, _ = jax.lax.fori_loop(0, num_steps, body, (z_1, memory))
    return z_0


def decode(
    key: jax.Array, z_0: jax.Array, gamma_0: jax.Array, vocab_size: int, method: str = "argmax"
) -> jax.Array:
    """z_0 [B, ...] -> integers [B, ...] in {0..K-1} by a :data:`DECODERS` entry."""
    if method not in DECODERS:
        raise ValueError(f"unknown decoding {method!r}; allowed: {sorted(DECODERS)}")
    logits = diffusion.decoder_logits(z_0, gamma_0, vocab_size)
    return DECODERS[method](key, logits).astype(jnp.int32)


def sample(
    key: jax.Array,
    gamma_fn: schedules.GammaFn,
    eps_fn: diffusion.EpsFn,
    shape: tuple[int, ...],
    *,
    vocab_size: int,
    num_steps: int,
    sampler: str = "ancestral",
    decode_method: str = "argmax",
    tolerance: float = 1e-5,
) -> jax.Array:
    """Integer samples [B, ...] in {0..K-1}: :func:`sample_latent` then :func:`decode`."""
    key_latent, key_decode = jax.random.split(key)
    z_0 = sample_latent(
        key_latent,
        gamma_fn,
        eps_fn,
        shape,
        num_steps=num_steps,
        sampler=sampler,
        tolerance=tolerance,
    )
    return decode(key_decode, z_0, gamma_fn(jnp.zeros(())), vocab_size, decode_method)
