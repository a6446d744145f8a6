"""Samplers: ancestral and deterministic (DDIM-style), jitted loops over a time grid.

Both run ``num_steps`` steps from ``t = 1`` to ``t = 0`` on the grid ``t_i = i / T`` inside a
``lax.fori_loop`` (no host round trip per step), then decode ``z_0`` to integers with the
discretized decoder. Noise for step ``i`` comes from ``fold_in(key, i)``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from vdm_jax import diffusion, schedules

# (key, z_t [B, ...], eps_hat [B, ...], gamma_t [], gamma_s []) -> z_s [B, ...].
StepFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


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


def ddim_step(
    key: jax.Array, z_t: jax.Array, eps_hat: jax.Array, gamma_t: jax.Array, gamma_s: jax.Array
) -> jax.Array:
    """Deterministic DDIM step: ``z_s = alpha_s x_hat + sigma_s eps_hat``.

    Here ``x_hat = (z_t - sigma_t eps_hat) / alpha_t``.

    ``key`` is unused; it keeps the signature of :func:`ancestral_step`.
    """
    del key
    x_hat = (z_t - jnp.sqrt(schedules.sigma2(gamma_t)) * eps_hat) * jnp.exp(
        -0.5 * schedules.log_alpha2(gamma_t)
    )
    return (
        jnp.sqrt(schedules.alpha2(gamma_s)) * x_hat + jnp.sqrt(schedules.sigma2(gamma_s)) * eps_hat
    )


# Reverse-process steps by name (``sample.sampler``).
SAMPLERS: dict[str, StepFn] = {"ancestral": ancestral_step, "ddim": ddim_step}


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
) -> jax.Array:
    """Runs the reverse process from z_1 ~ N(0, I) to z_0, [B, ...] float32.

    Args:
      key: PRNG key.
      gamma_fn: elementwise schedule ``t -> gamma``.
      eps_fn: noise predictor ``(z_t [B, ...], gamma_t [B]) -> eps_hat [B, ...]``.
      shape: ``(B, ...)`` of the samples.
      num_steps: T, steps on the grid ``i / T`` (for a discrete-time model, its own T).
      sampler: a key of :data:`SAMPLERS`.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: {sorted(SAMPLERS)}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    step = SAMPLERS[sampler]
    key_init, key_steps = jax.random.split(key)

    def body(i: jax.Array, z: jax.Array) -> jax.Array:
        t = (num_steps - i) / num_steps
        s = (num_steps - i - 1) / num_steps
        gamma_t, gamma_s = (
            gamma_fn(jnp.asarray(t, jnp.float32)),
            gamma_fn(jnp.asarray(s, jnp.float32)),
        )
        eps_hat = eps_fn(z, jnp.full((shape[0],), gamma_t)).astype(jnp.float32)
        return step(jax.random.fold_in(key_steps, i), z, eps_hat, gamma_t, gamma_s)

    z_1 = jax.random.normal(key_init, shape)
    return jax.lax.fori_loop(0, num_steps, body, z_1)


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
) -> jax.Array:
    """Integer samples [B, ...] in {0..K-1}: :func:`sample_latent` then :func:`decode`."""
    key_latent, key_decode = jax.random.split(key)
    z_0 = sample_latent(key_latent, gamma_fn, eps_fn, shape, num_steps=num_steps, sampler=sampler)
    return decode(key_decode, z_0, gamma_fn(jnp.zeros(())), vocab_size, decode_method)
