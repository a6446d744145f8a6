"""Closed forms for data x ~ N(mu, s^2 I): the exact denoiser and the exact diffusion losses.

Independent of the code under test: written from the posterior of a Gaussian, in numpy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def exact_eps_fn(mu: float, s: float):
    """E[eps | z_t] for z_t = alpha x + sigma eps, x ~ N(mu, s^2): sigma (z - alpha mu) / var_z."""

    def eps_fn(z: jax.Array, gamma_t: jax.Array) -> jax.Array:
        g = gamma_t.reshape(gamma_t.shape + (1,) * (z.ndim - gamma_t.ndim))
        a2, s2 = jax.nn.sigmoid(-g), jax.nn.sigmoid(g)
        return jnp.sqrt(s2) * (z - jnp.sqrt(a2) * mu) / (a2 * s**2 + s2)

    return eps_fn


def exact_x_fn(mu: float, s: float):
    """E[x | z_t] for x ~ N(mu, s^2): mu + alpha s^2 (z - alpha mu) / var_z (Gaussian posterior)."""

    def x_fn(z: jax.Array, gamma_t: jax.Array) -> jax.Array:
        g = gamma_t.reshape(gamma_t.shape + (1,) * (z.ndim - gamma_t.ndim))
        a2, s2 = jax.nn.sigmoid(-g), jax.nn.sigmoid(g)
        return mu + jnp.sqrt(a2) * s**2 * (z - jnp.sqrt(a2) * mu) / (a2 * s**2 + s2)

    return x_fn


def exact_v_fn(mu: float, s: float):
    """E[v | z_t] for v = alpha eps - sigma x: alpha E[eps | z] - sigma E[x | z]."""
    eps_fn, x_fn = exact_eps_fn(mu, s), exact_x_fn(mu, s)

    def v_fn(z: jax.Array, gamma_t: jax.Array) -> jax.Array:
        g = gamma_t.reshape(gamma_t.shape + (1,) * (z.ndim - gamma_t.ndim))
        a, sig = jnp.sqrt(jax.nn.sigmoid(-g)), jnp.sqrt(jax.nn.sigmoid(g))
        return a * eps_fn(z, gamma_t) - sig * x_fn(z, gamma_t)

    return v_fn


def mmse(v: np.ndarray, s: float) -> np.ndarray:
    """E||x - E[x | z]||^2 per dimension at SNR v."""
    return s**2 / (1.0 + v * s**2)


def continuous_diffusion_loss(gamma_0: float, gamma_1: float, s: float, dims: int) -> float:
    """0.5 * integral_{SNR1}^{SNR0} mmse(v) dv = 0.5 D [log(1 + SNR0 s^2) - log(1 + SNR1 s^2)]."""
    snr0, snr1 = np.exp(-gamma_0), np.exp(-gamma_1)
    return 0.5 * dims * (np.log1p(snr0 * s**2) - np.log1p(snr1 * s**2))


def discrete_diffusion_loss(gamma_fn_np, timesteps: int, s: float, dims: int) -> float:
    """0.5 D sum_i (SNR(s_i) - SNR(t_i)) mmse(SNR(t_i)) over the grid t_i = i / T."""
    t = np.arange(1, timesteps + 1) / timesteps
    snr_t, snr_s = np.exp(-gamma_fn_np(t)), np.exp(-gamma_fn_np(t - 1.0 / timesteps))
    return 0.5 * dims * float(np.sum((snr_s - snr_t) * mmse(snr_t, s)))
