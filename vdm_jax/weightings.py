"""Weightings of the diffusion loss by log-SNR (``model.weighting``), chosen by name.

Kingma & Gao (2023), "Understanding Diffusion Objectives as the ELBO with Simple Data
Augmentation" (VDM++), write every common diffusion objective as the ELBO's diffusion term
with a weight ``w(lambda)`` on each log-SNR ``lambda = -gamma``::

    L_w(x) = 0.5 E_{t ~ U(0, 1), eps}[w(lambda_t) gamma'(t) ||eps - eps_hat(z_t, gamma_t)||^2]

``w = 1`` is the ELBO. If ``w`` does not increase with ``lambda`` (so it grows with ``t``),
integration by parts gives::

    L_w(x) = w(lambda_0) L(0; x) + integral_0^1 (dw/dt) L(t; x) dt,

with ``lambda_0 = -gamma(0)`` and ``L(t; x) = 0.5 integral_t^1 gamma' E||eps - eps_hat||^2``,
the diffusion part of the negative ELBO of the data noised to time t: a positive mix of ELBOs
of noise-augmented data, so a likelihood objective. The tests check this identity by
quadrature on Gaussian data.

Training may use any entry here; evaluation always reports the ELBO. Entries:

* ``elbo``: ``w = 1``.
* ``sigmoid``: ``w = sigmoid(b - lambda)``, monotone; about 1 below ``lambda = b`` and
  ``exp(b - lambda)`` above, so it down-weights the low noise levels. ``b`` is
  ``model.weighting_bias``.
* ``edm``: EDM's objective (Karras et al. 2022: ``log sigma ~ N(-1.2, 1.2^2)``, weight
  ``(sigma^2 + sigma_data^2) / (sigma sigma_data)^2``, ``sigma_data = 0.5``) written as a
  weighting of the eps loss, with ``sigma^2 = exp(-lambda)``:
  ``w = N(lambda; 2.4, 2.4^2) (exp(-lambda) + 0.25) / 0.25``. Not monotone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

# EDM's training distribution of log sigma and its data scale (Karras et al. 2022, table 1).
_EDM_P_MEAN, _EDM_P_STD, _EDM_SIGMA_DATA = -1.2, 1.2, 0.5


def _elbo(log_snr: jax.Array, bias: float) -> jax.Array:
    del bias
    return jnp.ones_like(log_snr)


def _sigmoid(log_snr: jax.Array, bias: float) -> jax.Array:
    return jax.nn.sigmoid(bias - log_snr)


def _edm(log_snr: jax.Array, bias: float) -> jax.Array:
    del bias
    # lambda = -2 log sigma, so lambda ~ N(-2 P_mean, (2 P_std)^2). In logs: the density alone
    # underflows float32 below lambda = -29, the weight only below -35 (both above 33).
    mean, std = -2.0 * _EDM_P_MEAN, 2.0 * _EDM_P_STD
    log_density = -0.5 * jnp.square((log_snr - mean) / std) - math.log(std * math.sqrt(2 * math.pi))
    log_s2 = 2.0 * math.log(_EDM_SIGMA_DATA)
    return jnp.exp(log_density + jnp.logaddexp(-log_snr, log_s2) - log_s2)


@dataclasses.dataclass(frozen=True)
class Weighting:
    """A registered weighting.

    Attributes:
      fn: ``(log_snr [B], bias) -> w [B]``, positive (the training gradient divides by it)
        over the log-SNR a schedule reaches.
      monotone: ``w`` does not increase with the log-SNR (the ELBO-of-augmented-data case).
    """

    fn: Callable[[jax.Array, float], jax.Array]
    monotone: bool


WEIGHTINGS: dict[str, Weighting] = {
    "elbo": Weighting(_elbo, monotone=True),
    "sigmoid": Weighting(_sigmoid, monotone=True),
    "edm": Weighting(_edm, monotone=False),
}


def weight_and_slope(name: str, bias: float, gamma: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``w(-gamma)`` and ``dw / dgamma`` elementwise, each of ``gamma``'s shape [B].

    The slope is what the variance gradient of the schedule needs: the weight moves with the
    log-SNR that a time maps to.
    """
    fn = WEIGHTINGS[name].fn
    return jax.jvp(lambda g: fn(-g, bias), (gamma,), (jnp.ones_like(gamma),))
