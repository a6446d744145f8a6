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

# (output or eps [B, ...], z_t [B, ...], gamma_t [B] or []) -> [B, ...]
Convert = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _alpha_sigma(z: jax.Array, gamma: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``alpha`` and ``sigma`` of ``gamma`` [B] or [], broadcast against ``z`` [B, ...]."""
    gamma = diffusion.broadcast_batch(jnp.asarray(gamma, jnp.float32), z)
    return jnp.sqrt(schedules.alpha2(gamma)), jnp.sqrt(schedules.sigma2(gamma))


def _same(out: jax.Array, z: jax.Array, gamma: jax.Array) -> jax.Array:
    del z, gamma
    return out


def _eps_from_x(x_hat: jax.Array, z: jax.Array, gamma: jax.Array) -> jax.Array:
    alpha, sigma = _alpha_sigma(z, gamma)
    return (z - alpha * x_hat) / sigma


def _x_from_eps(eps: jax.Array, z: jax.Array, gamma: jax.Array) -> jax.Array:
    alpha, sigma = _alpha_sigma(z, gamma)
    return (z - sigma * eps) / alpha


def _eps_from_v(v_hat: jax.Array, z: jax.Array, gamma: jax.Array) -> jax.Array:
    alpha, sigma = _alpha_sigma(z, gamma)
    return alpha * v_hat + sigma * z


def _v_from_eps(eps: jax.Array, z: jax.Array, gamma: jax.Array) -> jax.Array:
    alpha, sigma = _alpha_sigma(z, gamma)
    return (eps - sigma * z) / alpha


@dataclasses.dataclass(frozen=True)
class Parameterization:
    """A registered meaning of the network's output.

    Attributes:
      to_eps: ``(output, z_t, gamma_t) -> eps_hat``, float32 [B, ...].
      from_eps: ``(eps, z_t, gamma_t) -> output``: what the network should output for that
        noise (its regression target, and the inverse of ``to_eps``).
    """

    to_eps: Convert
    from_eps: Convert


PARAMETERIZATIONS: dict[str, Parameterization] = {
    "eps": Parameterization(to_eps=_same, from_eps=_same),
    "x": Parameterization(to_eps=_eps_from_x, from_eps=_x_from_eps),
    "v": Parameterization(to_eps=_eps_from_v, from_eps=_v_from_eps),
}
