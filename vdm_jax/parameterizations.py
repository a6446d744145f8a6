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
* ``discretized_logistic``: as ``categorical``, but the ``K`` logits are the log-probabilities
  of a logistic distribution discretised to the ``K`` bins, from two outputs per data
  dimension, its location ``mu`` and log-scale ``log s`` (PixelCNN++'s output distribution,
  Salimans et al. 2017, "PixelCNN++"): ``f_ik = log(CDF(v_k + 1/K) - CDF(v_k - 1/K))`` with
  ``CDF(y) = sigmoid((y - mu) / s)``, the outer bins reaching to -inf and +inf. The prior
  over the values is then unimodal and ordered: neighbouring values share probability,
  which the free logits must learn value by value. Zero outputs are the logistic
  ``mu = 0, s = 1``: on 17 values it puts 29% on each outer value and 2-3% on each inner one.

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
    return _eps_from_grid_logits(logits.reshape((*z.shape, vocab_size)), z, gamma, vocab_size)


def _eps_from_grid_logits(
    logits: jax.Array, z: jax.Array, gamma: jax.Array, vocab_size: int
) -> jax.Array:
    """Logits [B, ..., C, K] of ``p(x_i = v_k | z_{-i})``, up to a constant in ``k`` -> eps_hat.

    Adds each value's likelihood of ``z_i`` and reads ``x_hat`` as the posterior mean.
    """
    logits = logits + grid_log_likelihood(z, gamma, vocab_size)
    levels = diffusion.encode(jnp.arange(vocab_size), vocab_size)
    x_hat = jnp.sum(jax.nn.softmax(logits, axis=-1) * levels, axis=-1)
    return _eps_from_x(x_hat, z, gamma)


def discretized_logistic_log_probs(
    mu: jax.Array, log_scale: jax.Array, vocab_size: int
) -> jax.Array:
    """``log P(x = v_k)`` of a logistic(``mu``, ``exp(log_scale)``) discretised to the ``K`` bins.

    Bin ``k`` covers ``[v_k - 1/K, v_k + 1/K]`` around :func:`vdm_jax.diffusion.encode`'s
    centre ``v_k``; bin 0 reaches down to -inf and bin ``K - 1`` up to +inf, so the ``K``
    probabilities sum to 1. Each is formed in log space without a difference of
    probabilities: with ``a, b`` the bin's standardised edges, ``sigmoid(b) - sigmoid(a) =
    sigmoid(b) sigmoid(-a) (1 - exp(a - b))``, exact however far the bin lies in a tail.

    Args:
      mu: [...] locations, in the data's units (-1, 1).
      log_scale: [...] log-scales.
      vocab_size: K >= 2.

    Returns:
      [..., K] float32 log-probabilities.
    """
    # The K - 1 edges between neighbouring bins, 2k / K - 1, each shared by the two bins
    # it separates so that their probabilities meet exactly; standardised: [..., K - 1].
    edges = 2.0 * jnp.arange(1, vocab_size) / vocab_size - 1.0
    inv_scale = jnp.exp(-log_scale)[..., None]
    standard = (edges - mu[..., None]) * inv_scale
    # An inner bin's width in standard units is 2 / (K s); log(1 - exp(-width)).
    log_width = jnp.log(-jnp.expm1(-2.0 / vocab_size * inv_scale))
    inner = (
        jax.nn.log_sigmoid(standard[..., 1:]) + jax.nn.log_sigmoid(-standard[..., :-1]) + log_width
    )
    first = jax.nn.log_sigmoid(standard[..., :1])
    last = jax.nn.log_sigmoid(-standard[..., -1:])
    return jnp.concatenate([first, inner, last], axis=-1)


def _eps_from_logistic(
    out: jax.Array, z: jax.Array, gamma: jax.Array, vocab_size: int = 0
) -> jax.Array:
    """``out`` [B, ..., 2 C] (``mu``, ``log s`` per channel, channel-major) -> eps_hat."""
    if vocab_size < 2 or out.shape[-1] != 2 * z.shape[-1]:
        raise ValueError(
            f"the discretized_logistic parameterization needs vocab_size K >= 2 (got "
            f"{vocab_size}) and 2 C output channels for z's C = {z.shape[-1]} (got "
            f"{out.shape[-1]})"
        )
    out = out.reshape((*z.shape, 2))
    log_probs = discretized_logistic_log_probs(out[..., 0], out[..., 1], vocab_size)
    return _eps_from_grid_logits(log_probs, z, gamma, vocab_size)


@dataclasses.dataclass(frozen=True)
class Parameterization:
    """A registered meaning of the network's output.

    Attributes:
      to_eps: ``(output, z_t, gamma_t, K) -> eps_hat``, float32 [B, ...].
      from_eps: ``(eps, z_t, gamma_t, K) -> output``: what the network should output for that
        noise (its regression target, and the inverse of ``to_eps``); None if many outputs
        give one ``eps_hat``.
      outputs_per_channel: ``K -> n``: the network outputs ``n`` channels per data channel.
      needs_vocab: ``to_eps`` reads the data's grid of ``K`` values, so the model needs ``K``.
    """

    to_eps: Convert
    from_eps: Convert | None
    outputs_per_channel: Callable[[int], int] = lambda vocab_size: 1
    needs_vocab: bool = False


PARAMETERIZATIONS: dict[str, Parameterization] = {
    "eps": Parameterization(to_eps=_same, from_eps=_same),
    "x": Parameterization(to_eps=_eps_from_x, from_eps=_x_from_eps),
    "v": Parameterization(to_eps=_eps_from_v, from_eps=_v_from_eps),
    "categorical": Parameterization(
        to_eps=_eps_from_logits,
        from_eps=None,
        outputs_per_channel=lambda vocab_size: vocab_size,
        needs_vocab=True,
    ),
    "discretized_logistic": Parameterization(
        to_eps=_eps_from_logistic,
        from_eps=None,
        outputs_per_channel=lambda vocab_size: 2,
        needs_vocab=True,
    ),
}
