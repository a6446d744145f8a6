"""Noise schedules gamma(t) and the variance-preserving quantities derived from them.

A schedule maps time ``t`` in [0, 1] to ``gamma_t``, the log noise-to-signal ratio, with
``sigma_t^2 = sigmoid(gamma_t)``, ``alpha_t^2 = sigmoid(-gamma_t)`` and
``SNR(t) = exp(-gamma_t)``. Every schedule here is strictly increasing in ``t`` for any
parameter values, so SNR decreases monotonically from t = 0 to t = 1.

Schedules are Flax modules (they hold parameters) acting elementwise on ``t`` of any shape.
The learned ones expose their endpoints as the parameters ``gamma_min`` (= gamma(0)) and
``log_gamma_range`` (gamma(1) = gamma_min + exp(log_gamma_range)); every other parameter
shapes only the interior. :data:`ENDPOINT_PARAMS` names them so that training can give the
endpoints ELBO gradients and the interior variance-minimising ones.

The helper functions take ``gamma`` arrays and use sigmoid / log-sigmoid forms, which stay
accurate in float32 far outside the paper's range [-13.3, 5].
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

GammaFn = Callable[[jax.Array], jax.Array]

# Parameter names that set gamma(0) and gamma(1); all other schedule parameters are interior.
ENDPOINT_PARAMS = frozenset({"gamma_min", "log_gamma_range"})


def sigma2(gamma: jax.Array) -> jax.Array:
    """Noise variance sigma_t^2 = sigmoid(gamma_t)."""
    return jax.nn.sigmoid(gamma)


def alpha2(gamma: jax.Array) -> jax.Array:
    """Signal variance alpha_t^2 = sigmoid(-gamma_t) (never computed as 1 - sigma^2)."""
    return jax.nn.sigmoid(-gamma)


def log_sigma2(gamma: jax.Array) -> jax.Array:
    """log sigma_t^2 = log sigmoid(gamma_t)."""
    return jax.nn.log_sigmoid(gamma)


def log_alpha2(gamma: jax.Array) -> jax.Array:
    """log alpha_t^2 = log sigmoid(-gamma_t)."""
    return jax.nn.log_sigmoid(-gamma)


def snr(gamma: jax.Array) -> jax.Array:
    """Signal-to-noise ratio alpha_t^2 / sigma_t^2 = exp(-gamma_t)."""
    return jnp.exp(-gamma)


def log_snr(gamma: jax.Array) -> jax.Array:
    """log SNR(t) = -gamma_t."""
    return -gamma


def gamma_and_derivative(gamma_fn: GammaFn, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """gamma(t) and d gamma / dt by forward-mode autodiff.

    Args:
      gamma_fn: an elementwise schedule, ``t -> gamma`` of the same shape.
      t: times, any shape.

    Returns:
      ``(gamma_t, dgamma_dt)``, both of ``t``'s shape.
    """
    return jax.jvp(gamma_fn, (t,), (jnp.ones_like(t),))


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class FixedLinearSchedule(nn.Module):
    """gamma(t) = gamma_min + (gamma_max - gamma_min) t, with no parameters."""

    gamma_min: float = -13.3
    gamma_max: float = 5.0

    def __post_init__(self) -> None:
        if not self.gamma_max > self.gamma_min:
            raise ValueError(
                f"schedule needs gamma_max > gamma_min, got {self.gamma_min}, {self.gamma_max}"
            )
        super().__post_init__()

    def __call__(self, t: jax.Array) -> jax.Array:
        return self.gamma_min + (self.gamma_max - self.gamma_min) * t


class _LearnedEndpoints(nn.Module):
    """Shared endpoint parameters: gamma(0) = gamma_min, gamma(1) = gamma_min + range."""

    gamma_min: float = -13.3
    gamma_max: float = 5.0

    def endpoints(self) -> tuple[jax.Array, jax.Array]:
        if not self.gamma_max > self.gamma_min:
            raise ValueError(
                f"schedule needs gamma_max > gamma_min, got {self.gamma_min}, {self.gamma_max}"
            )
        gamma_0 = self.param("gamma_min", nn.initializers.constant(self.gamma_min), ())
        log_range = self.param(
            "log_gamma_range",
            nn.initializers.constant(math.log(self.gamma_max - self.gamma_min)),
            (),
        )
        return gamma_0, jnp.exp(log_range)


class LearnedLinearSchedule(_LearnedEndpoints):
    """Linear in t between two learned endpoints (parameters ``gamma_min``, ``log_gamma_range``)."""

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        gamma_0, gamma_range = self.endpoints()
        return gamma_0 + gamma_range * t


class MonotoneNetSchedule(_LearnedEndpoints):
    """Learned endpoints and a monotone network for the interior.

    ``gamma(t) = gamma_min + exp(log_gamma_range) * (h(t) - h(0)) / (h(1) - h(0))`` with
    ``h(t) = w1 t + mean_j w3_j sigmoid(w2_j (2t - 1) + b_j)`` and every ``w`` the softplus of
    an unconstrained parameter, so ``h`` and hence ``gamma`` are strictly increasing for any
    parameter values, and ``gamma(0)``, ``gamma(1)`` are exactly the endpoint parameters.

    Parameters: ``gamma_min``, ``log_gamma_range`` (endpoints); ``linear`` [] (w1),
    ``hidden_kernel`` [width], ``hidden_bias`` [width], ``output_kernel`` [width] (interior).
    At initialisation the schedule is close to linear.
    """

    width: int = 1024

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        gamma_0, gamma_range = self.endpoints()
        w1 = nn.softplus(self.param("linear", nn.initializers.constant(_inverse_softplus(1.0)), ()))
        w2 = nn.softplus(self.param("hidden_kernel", nn.initializers.normal(1.0), (self.width,)))
        b2 = self.param("hidden_bias", nn.initializers.normal(1.0), (self.width,))
        w3 = nn.softplus(self.param("output_kernel", nn.initializers.normal(0.1), (self.width,)))

        def h(u: jax.Array) -> jax.Array:
            hidden = jax.nn.sigmoid(w2 * (2.0 * u[..., None] - 1.0) + b2)
            return w1 * u + jnp.mean(w3 * hidden, axis=-1)

        h_0, h_1 = h(jnp.zeros(())), h(jnp.ones(()))
        shape = (h(t) - h_0) / (h_1 - h_0)
        return gamma_0 + gamma_range * shape


SCHEDULES: dict[str, type[nn.Module]] = {
    "fixed_linear": FixedLinearSchedule,
    "learned_linear": LearnedLinearSchedule,
    "monotone_net": MonotoneNetSchedule,
}


def make_schedule(name: str, **kwargs) -> nn.Module:
    """Builds a schedule by name: ``fixed_linear``, ``learned_linear`` or ``monotone_net``."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; allowed: {sorted(SCHEDULES)}")
    return SCHEDULES[name](**kwargs)
