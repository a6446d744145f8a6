"""Noise schedules gamma(t) and the variance-preserving quantities derived from them.

A schedule maps time ``t`` in [0, 1] to ``gamma_t``, the log noise-to-signal ratio, with
``sigma_t^2 = sigmoid(gamma_t)``, ``alpha_t^2 = sigmoid(-gamma_t)`` and
``SNR(t) = exp(-gamma_t)``. Every schedule here is strictly increasing in ``t`` for any
parameter values, so SNR decreases monotonically from t = 0 to t = 1 (one exception:
``reference_net``, the reference code's network, is non-decreasing for any parameters and
strictly increasing unless its kernels are all zero, as in that code).

Schedules are Flax modules (they hold parameters) acting elementwise on ``t`` of any shape.
The learned ones expose their endpoints as the parameters ``gamma_min`` (= gamma(0)) and
``log_gamma_range`` (gamma(1) = gamma_min + exp(log_gamma_range)); every other parameter
shapes only the interior. :data:`ENDPOINT_PARAMS` names them so that training can give the
endpoints ELBO gradients and the interior variance-minimising ones. ``reference_net`` (for
checkpoints of the reference code) has no such split: train it with ELBO gradients only.

The helper functions take ``gamma`` arrays and use sigmoid / log-sigmoid forms, which stay
accurate in float32 far outside the paper's range [-13.3, 5].
"""

from __future__ import annotations

import dataclasses
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


class _AbsDense(nn.Module):
    """``x @ |kernel| (+ bias)``: a Dense layer that is non-decreasing in every input."""

    features: int
    kernel_init: nn.initializers.Initializer
    use_bias: bool = True
    bias_init: nn.initializers.Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        y = x @ jnp.abs(kernel)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,))
        return y


class ReferenceNetSchedule(nn.Module):
    """The monotone network of the public reference code (google-research/vdm), as it is.

    ``gamma(t) = l1(t) + l3(2 sigmoid(l2(2 t - 1)) - 1) / width``, where ``l(x) = x |W| + b``
    (``l3`` without bias). The parameter tree is the reference's ``NoiseSchedule_NNet``:
    ``l1`` {kernel [1, 1], bias [1]}, ``l2`` {kernel [1, width], bias [width]}, ``l3``
    {kernel [width, 1]}; ``width = 0`` drops ``l2``, ``l3`` (the reference's
    ``nonlinear=False``). Initialisation as there: ``l1`` gives the line from ``gamma_min``
    to ``gamma_max``, the other kernels ~ N(0, 0.01^2), ``l2``'s bias 0.

    ``d gamma / dt = |W1| + (4 / width) sum_j |W3_j| |W2_j| s_j (1 - s_j) >= 0`` (s_j the
    sigmoids), so gamma is non-decreasing for any parameters and strictly increasing unless
    all of ``|W1|`` and ``|W3_j W2_j|`` vanish; the endpoints are not parameters of their own
    (no :data:`ENDPOINT_PARAMS`), so use ``schedule_grad="elbo"`` with it.
    """

    gamma_min: float = -13.3
    gamma_max: float = 5.0
    width: int = 1024

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        t = jnp.asarray(t, jnp.float32)[..., None]  # [..., 1]
        l1 = _AbsDense(
            1,
            kernel_init=nn.initializers.constant(self.gamma_max - self.gamma_min),
            bias_init=nn.initializers.constant(self.gamma_min),
            name="l1",
        )
        h = l1(t)
        if self.width > 0:
            normal = nn.initializers.normal(0.01)
            hidden = _AbsDense(self.width, kernel_init=normal, name="l2")(2.0 * (t - 0.5))
            hidden = 2.0 * (jax.nn.sigmoid(hidden) - 0.5)
            h = h + _AbsDense(1, kernel_init=normal, use_bias=False, name="l3")(hidden) / self.width
        return h[..., 0]


@dataclasses.dataclass(frozen=True)
class ScheduleKind:
    """A registered schedule and the properties the runner and config checks read.

    Attributes:
      module: the Flax module, built with ``gamma_min``, ``gamma_max`` (and ``width``).
      takes_width: the module has a hidden ``width``.
      splits_endpoints: its parameters are :data:`ENDPOINT_PARAMS` and interior ones (or it
        has none), so the interior can be trained on the variance of the loss
        (``schedule_grad="variance"``).
    """

    module: type[nn.Module]
    takes_width: bool
    splits_endpoints: bool

    def build(self, gamma_min: float, gamma_max: float, width: int) -> nn.Module:
        """The module, with ``width`` only where the schedule takes one."""
        if self.takes_width:
            return self.module(gamma_min=gamma_min, gamma_max=gamma_max, width=width)
        return self.module(gamma_min=gamma_min, gamma_max=gamma_max)


SCHEDULES: dict[str, ScheduleKind] = {
    "fixed_linear": ScheduleKind(FixedLinearSchedule, takes_width=False, splits_endpoints=True),
    "learned_linear": ScheduleKind(LearnedLinearSchedule, takes_width=False, splits_endpoints=True),
    "monotone_net": ScheduleKind(MonotoneNetSchedule, takes_width=True, splits_endpoints=True),
    "reference_net": ScheduleKind(ReferenceNetSchedule, takes_width=True, splits_endpoints=False),
}


def make_schedule(name: str, **kwargs) -> nn.Module:
    """Builds a schedule by name: one of :data:`SCHEDULES`, with its module's fields."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; allowed: {sorted(SCHEDULES)}")
    return SCHEDULES[name].module(**kwargs)
