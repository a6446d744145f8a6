"""What the score network's output means (``model.parameterization``), chosen by name.

The loss, the samplers and the likelihoods all take a noise prediction ``eps_hat(z_t,
gamma_t)``. A network may instead predict the data ``x`` or the velocity ``v = alpha eps -
sigma x`` (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion
Models"; used by MuLAN and i-DODE). With ``z = alpha x + sigma eps`` and ``alpha^2 + sigma^2 =
1`` (``alpha^2 = sigmoid(-gamma)``, ``sigma^2 = sigmoid(gamma)``) each determines the others,
so each entry converts its output into ``eps_hat``, and back for tests and targets:

* ``eps``: the output is ``eps_hat`` (the VDM paper's choice).
* ``x``: ``eps_hat = (z - alpha x_hat) / sigma``; ``x_hat = (z - sigma eps) / alpha``.
* ``v``: ``eps_hat = alpha v_hat + sigma z``; ``v = (eps - sigma z) / alpha``.
* ``categorical``: the output is ``K`` logits ``f_ik`` per data dimension (the network has
  ``K`` times as many output channels), and ``x_hat`` is the posterior mean of ``x_i`` over
  the ``K`` values ``v_k`` the data can take, with the likelihood of ``z_i`` under each value
  added to the logits: ``p(x_i = v_k | z) = softmax_k(f_ik + log N(z_i; alpha v_k,
  sigma^2))``; then ``eps_hat = (z - alpha x_hat) / sigma``. This is Plaid's categorical
  reparameterisation with its output prior (Gulrajani & Hashimoto 2023, "Likelihood-Based
  Diffusion Language Models"), here on the data's own grid. For grid data the split is
  exact: ``p(x_i | z) = N(z_i; alpha x_i, sigma^2) p(x_i | z_{-i}) / p(z_i | z_{-i})``, so
  the network need only learn ``f_ik = log p(x_i = v_k | z_{-i})`` (a constant for
  independent dimensions), while the rounding of ``z_i`` to the grid, which dominates the
  bound at low noise, is computed rather than learned. Zero logits (the zero-initialised
  output layer) give the uniform prior's denoiser. It has no inverse (``from_eps`` is None):
  many logits give one ``eps_hat``.

The choice changes what the network finds easy to output (``x`` divides its error by sigma,
so a network output of 0 means ``eps_hat = z / sigma``), not the objective: the ELBO of a
given ``eps_hat`` is the same whichever output produced it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from vdm_jax import diffusion, schedules

# (output or eps [B, ...], z_t [B, ...], gamma_t [B], [] or per dimension, K) -> [B, ...]
Convert = Callable[[jax.Array, jax.Array, jax.Array, int], jax.Array]


def _alpha_sigma(z: jax.Array, gamma: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``alpha`` and ``sigma`` of ``gamma`` ([B], [] or per dimension) against ``z`` [B, ...]."""
    gamma = diffusion.broadcast_batch(jnp.asarray(gamma, jnp.float32), z)
    return jnp.sqrt(schedules.alpha2(gamma)), jnp.sqrt(schedules.sigma2(gamma))


def _same(out: jax.Array, z: jax.Array, gamma: jax.Array, vocab_size: int = 0) -> jax.Array:
    del z, gamma, vocab_size
    return out


def _eps_from_x(x_hat: jax.Array, z: jax.Array, gamma: jax.Array, vocab_size: int = 0) -> jax.Array:
    del vocab_size
    alpha, sigma = _alpha_sigma(z, gamma)
    return (z - alpha * x_hat) / sigma


def _x_from_eps(eps: jax.Array, z: jax.Array, gamma: jax.Array, vocab_size: int = 0) -> jax.Array:
    del vocab_size
    alpha, sigma = _alpha_sigma(z, gamma)
    return (z - sigma * eps) / alpha


def _eps_from_v(v_hat: jax.Array, z: jax.Array, gamma: jax.Array, vocab_size: int = 0) -> jax.Array:
    del vocab_size
    alpha, sigma = _alpha_sigma(z, gamma)
    return alpha * v_hat + sigma * z


def _v_from_eps(eps: jax.Array, z: jax.Array, gamma: jax.Array, vocab_size: int = 0) -> jax.Array:
    del vocab_size
    alpha, sigma = _alpha_sigma(z, gamma)
    return (eps - sigma * z) / alpha


def grid_log_likelihood(z: jax.Array, gamma: jax.Array, vocab_size: int) -> jax.Array:
    """``log N(z_i; alpha v_k, sigma^2)`` up to its normaliser (constant in ``k``): [B, ..., K].

    ``v_k`` are the ``K`` bin centres of :func:`vdm_jax.diffusion.encode`. The residual
    ``z_i - alpha v_k`` is formed before it is scaled, so the values that compete in a
    softmax (the levels nearest ``z_i``) keep their float32 precision at any noise level.
    """
    alpha, sigma = _alpha_sigma(z, gamma)
    levels = diffusion.encode(jnp.arange(vocab_size), vocab_size)  # [K]
    residual = (z[..., None] - alpha[..., None] * levels) / sigma[..., None]
    return -0.5 * jnp.square(residual)


def _eps_from_logits(
    logits: jax.Array, z: jax.Array, gamma: jax.Array, vocab_size: int = 0
) -> jax.Array:
    """``logits`` [B, ..., C K] (``K`` per channel, channel-major) -> eps_hat [B, ..., C]."""
    if vocab_size < 2 or logits.shape[-1] != z.shape[-1] * vocab_size:
        raise ValueError(
            f"the categorical parameterization needs vocab_size K >= 2 (got {vocab_size}) and "
            f"C K output channels for z's C = {z.shape[-1]} (got {logits.shape[-1]})"
        )
    logits = logits.reshape((*z.shape, vocab_size)) + grid_log_likelihood(z, gamma, vocab_size)
    levels = diffusion.encode(jnp.arange(vocab_size), vocab_size)
    x_hat = jnp.sum(jax.nn.softmax(logits, axis=-1) * levels, axis=-1)
    return _eps_from_x(x_hat, z, gamma)


@dataclasses.dataclass(frozen=True)
class Parameterization:
    """A registered meaning of the network's output.

    Attributes:
      to_eps: ``(output, z_t, gamma_t, K) -> eps_hat``, float32 [B, ...].
      from_eps: ``(eps, z_t, gamma_t, K) -> output``: what the network should output for that
        noise (its regression target, and the inverse of ``to_eps``); None if many outputs
        give one ``eps_hat``.
      outputs_per_value: the network outputs ``K`` channels per data channel (one per value
        the data can take) rather than one.
    """

    to_eps: Convert
    from_eps: Convert | None
    outputs_per_value: bool = False


PARAMETERIZATIONS: dict[str, Parameterization] = {
    "eps": Parameterization(to_eps=_same, from_eps=_same),
    "x": Parameterization(to_eps=_eps_from_x, from_eps=_x_from_eps),
    "v": Parameterization(to_eps=_eps_from_v, from_eps=_v_from_eps),
    "categorical": Parameterization(to_eps=_eps_from_logits, from_eps=None, outputs_per_value=True),
}
