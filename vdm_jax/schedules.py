"""Noise schedules gamma(t) and the variance-preserving quantities derived from them.

A schedule maps time ``t`` in [0, 1] to ``gamma_t``, the log noise-to-signal ratio, with
``sigma_t^2 = sigmoid(gamma_t)``, ``alpha_t^2 = sigmoid(-gamma_t)`` and
``SNR(t) = exp(-gamma_t)``. Every schedule here is strictly increasing in ``t`` for any
parameter values, so SNR decreases monotonically from t = 0 to t = 1 (one exception:
``reference_net``, the reference code's network, is non-decreasing for any parameters and
strictly increasing unless its kernels are all zero, as in that code).

Schedules are Flax modules (they hold parameters) acting elementwise on ``t`` of any shape,
except :class:`PerDimensionSchedule`, which gives one gamma per data dimension (``t`` [] or
[B] -> an array of the data's rank; the per-dimension kind of :mod:`vdm_jax.diffusion`).
The learned ones expose their endpoints as the parameters ``gamma_min`` (= gamma(0)) and
``log_gamma_range`` (gamma(1) = gamma_min + exp(log_gamma_range)); every other parameter
shapes only the interior. ``reference_net`` (for checkpoints of the reference code) has no
such split: train it with ELBO gradients only.

:data:`SCHEDULES` registers each schedule as a :class:`ScheduleKind`: its module, the
settings record it reads from ``config.model`` (a :class:`ScheduleSettings`, which checks
its own values), which of its parameters are endpoints and which the variance gradient
trains, and whether it is per dimension. Adding a schedule is its module, its entry (and a
settings record for a hyperparameter of its own, with that field in ``configs/base.py``).

The helper functions take ``gamma`` arrays and use sigmoid / log-sigmoid forms, which stay
accurate in float32 far outside the paper's range [-13.3, 5].
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm_jax.settings import Settings, is_int, is_number, out_of_range, unknown_name

GammaFn = Callable[[jax.Array], jax.Array]

# The learned endpoints (:class:`_LearnedEndpoints`): gamma(0) and log(gamma(1) - gamma(0)).
LEARNED_ENDPOINTS = frozenset({"gamma_min", "log_gamma_range"})


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


class LearnedCosineSchedule(_LearnedEndpoints):
    """Learned endpoints and the cosine schedule's shape between them (Nichol & Dhariwal 2021).

    Improved DDPM's ``alpha_bar(tau) = cos^2(((tau + s) / (1 + s)) pi / 2) / cos^2((s / (1 +
    s)) pi / 2)`` gives ``gamma_cos(tau) = log((1 - alpha_bar) / alpha_bar)``
    (:func:`cosine_gamma`), which runs from -inf to +inf. This schedule takes its piece
    from ``gamma_min`` to ``gamma_max`` (the settings: ``tau`` in ``[tau_0, tau_1]``,
    :func:`cosine_time`) and puts it between the learned endpoints:
    ``gamma(t) = gamma_0 + exp(log_gamma_range) * (G(t) - G(0)) / (G(1) - G(0))`` with
    ``G(t) = gamma_cos(tau_0 + (tau_1 - tau_0) t)``. At initialisation it is Improved DDPM's
    log-SNR on that range, exactly (up to float32 rounding); ``s`` is its offset (0.008
    there). Parameters: ``gamma_min``, ``log_gamma_range`` (endpoints); no interior ones.
    """

    s: float = 0.008

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        gamma_0, gamma_range = self.endpoints()
        tau_0, tau_1 = cosine_time(self.gamma_min, self.s), cosine_time(self.gamma_max, self.s)

        def g(u: jax.Array) -> jax.Array:  # 1 - tau from (1 - tau_1) + ..., no cancellation
            return cosine_gamma(
                tau_0 + (tau_1 - tau_0) * u, self.s, (1.0 - tau_1) + (tau_1 - tau_0) * (1.0 - u)
            )

        g_0, g_1 = g(jnp.zeros(())), g(jnp.ones(()))
        return gamma_0 + gamma_range * (g(t) - g_0) / (g_1 - g_0)


def cosine_gamma(tau: jax.Array, s: float, one_minus_tau: jax.Array | None = None) -> jax.Array:
    """Improved DDPM's cosine schedule as gamma = -log SNR, for tau in (0, 1), any shape.

    ``alpha_bar = cos^2(a (tau + s)) / cos^2(a s)`` with ``a = pi / (2 (1 + s))``, so
    ``gamma = log(sin^2(a (tau + s)) - sin^2(a s)) - log cos^2(a (tau + s))``
    ``= log sin(a tau) + log sin(a (tau + 2 s)) - 2 log sin(a (1 - tau))``: the last form has
    no difference of nearby numbers at either end. ``one_minus_tau`` may give ``1 - tau``
    more accurately than float32 ``1 - tau`` near 1.
    """
    a = math.pi / (2.0 * (1.0 + s))
    one_minus_tau = 1.0 - tau if one_minus_tau is None else one_minus_tau
    return (
        jnp.log(jnp.sin(a * tau))
        + jnp.log(jnp.sin(a * (tau + 2.0 * s)))
        - 2.0 * jnp.log(jnp.sin(a * one_minus_tau))
    )


def cosine_time(gamma: float, s: float) -> float:
    """The tau in (0, 1) where :func:`cosine_gamma` equals ``gamma`` (float64 on the host).

    ``cos^2(u) = cos^2(a s) sigmoid(-gamma)`` and ``sin^2(u) = sin^2(a s) + cos^2(a s)
    sigmoid(gamma)`` at ``u = a (tau + s)``; ``atan2`` of their roots is exact at both ends.
    """
    a = math.pi / (2.0 * (1.0 + s))
    cos2_0 = math.cos(a * s) ** 2
    sig = 1.0 / (1.0 + math.exp(-gamma)) if gamma > -700 else 0.0
    sig_neg = 1.0 / (1.0 + math.exp(gamma)) if gamma < 700 else 0.0
    u = math.atan2(math.sqrt(math.sin(a * s) ** 2 + cos2_0 * sig), math.sqrt(cos2_0 * sig_neg))
    return u / a - s


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
    (its entry declares none), so use ``schedule_grad="elbo"`` with it.
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


def _sigmoid_rise(u: jax.Array, w2: jax.Array, b2: jax.Array) -> jax.Array:
    """``sigmoid(w2 (2u - 1) + b2) - sigmoid(b2 - w2)``, [N] -> [N, width]: each hidden unit's
    rise since t = 0, as a difference of sigmoids (no cancellation of their sums near 0)."""
    return jax.nn.sigmoid(w2 * (2.0 * u[:, None] - 1.0) + b2) - jax.nn.sigmoid(b2 - w2)


class PerDimensionSchedule(nn.Module):
    """One strictly increasing ``gamma_i(t)`` per data dimension, optionally input-adaptive.

    ``gamma_i(t) = gamma_min_i + exp(log_gamma_range_i) s_i(t)``: learned per-dimension
    endpoints and an interior ``s_i`` rising from 0 to 1. Every per-dimension quantity is a
    shared value plus a per-dimension offset that starts at zero (``gamma_min`` [] +
    ``gamma_min_offset`` [D], ``log_gamma_range`` [] + ``log_gamma_range_offset`` [D], all
    :data:`PER_DIMENSION_ENDPOINTS`; ``interior`` [k] + ``interior_offset`` [D, k]): the shared part
    gets the gradient of every dimension, so it learns as fast as a scalar schedule's (on
    digits, per-pixel endpoints alone moved a quarter as far in 4,500 steps).

    * ``interior="monotone"`` (ours): ``s_i = (h_i(t) - h_i(0)) / (h_i(1) - h_i(0))`` with
      ``h_i(t) = w1_i t + mean_j w3_ij sigmoid(w2_j (2t - 1) + b_j)``: one shared basis of
      ``width`` sigmoids, per-dimension positive mixing weights (softplus), as
      :class:`MonotoneNetSchedule` per dimension. ``h_i' >= w1_i > 0``.
    * ``interior="polynomial"`` (MuLAN, Sahoo et al. 2024): ``s_i = P_i(t) / P_i(1)`` with
      ``P_i' = (a_i t^2 + b_i t + c_i)^2 + delta (a_i^2 + b_i^2 + c_i^2)``, ``c_i`` a
      softplus, so ``P_i`` is a closed-form quintic. MuLAN has no ``delta`` term; ours
      (``delta`` = 1e-3, relative to the coefficients' scale) keeps ``s_i' >= delta / 3``, so
      ``gamma_i`` is strictly increasing, in float32 too, even where the quadratic has a root.

    ``gamma_i(t) = path_i(u(t))``: a shared time warp ``u`` (:data:`TIME_WARP`, the
    identity at initialisation) sets the speed along every dimension's path. The ELBO in
    continuous time depends on the paths, not on the speed, so ``schedule_grad="variance"``
    trains the warp on the variance of the loss estimate and everything else on the ELBO: for
    a per-dimension schedule that is the paper's split, exactly.

    The interior's per-dimension offsets are parameters (the same for every input) or, given
    a ``context`` [B, C] (an input-adaptive schedule, whose context is the auxiliary latent
    of :class:`vdm_jax.latents.LatentEncoder`), the output of a small MLP of it whose last
    layer starts at zero, so that the schedule starts input-independent. All dimensions
    start with the same interior, close to linear: the scalar schedule is the starting point.

    Shapes: ``t`` [] or [B] -> ``[1 or B, *event_shape]`` (``[B, ...]`` with a context):
    always the data's rank, the per-dimension kind of :mod:`vdm_jax.diffusion`.
    ``event_shape`` is the data's ``(H, W, C)`` or any shape that broadcasts to it, e.g.
    ``(1, 1, C)`` for one schedule per channel.
    """

    event_shape: tuple[int, ...]
    gamma_min: float = -13.3
    gamma_max: float = 5.0
    width: int = 16
    interior: str = "monotone"
    context_hidden: int = 64

    def _coefficients(self, context: jax.Array | None, dims: int, k: int, init) -> jax.Array:
        """A shared row ``interior`` [k] (``init(k)``) plus per-dimension offsets: parameters
        ``interior_offset`` [D, k], or from the context, [B, D, k]; both start at zero."""
        shared = self.param("interior", lambda _, shape: init(shape[0]), (k,))
        if context is None:
            offset = self.param("interior_offset", nn.initializers.zeros, (dims, k))[None]
        else:
            h = nn.swish(nn.Dense(self.context_hidden, name="context_0")(context))
            h = nn.swish(nn.Dense(self.context_hidden, name="context_1")(h))
            offset = nn.Dense(dims * k, kernel_init=nn.initializers.zeros, name="context_out")(h)
            offset = offset.reshape(-1, dims, k)
        return shared + offset

    def _time_warp(self, t: jax.Array) -> jax.Array:
        """u(t) [N]: one strictly increasing map of [0, 1] onto itself, shared by every
        dimension (:data:`TIME_WARP`), ``(h(t) - h(0)) / (h(1) - h(0))`` with ``h`` as in
        :class:`MonotoneNetSchedule` (width 16), the identity at initialisation. It moves
        every dimension along its path at a common speed, so it cannot change the
        continuous-time ELBO, only its estimate's variance."""
        init_linear = nn.initializers.constant(_inverse_softplus(1.0))
        w1 = nn.softplus(self.param("warp_linear", init_linear, ()))
        w2 = nn.softplus(self.param("warp_hidden_kernel", nn.initializers.normal(1.0), (16,)))
        b2 = self.param("warp_hidden_bias", nn.initializers.normal(1.0), (16,))
        w3 = nn.softplus(self.param("warp_output_kernel", nn.initializers.constant(-8.0), (16,)))

        def rise(u: jax.Array) -> jax.Array:  # h(u) - h(0)
            return w1 * u + jnp.mean(w3 * _sigmoid_rise(u, w2, b2), axis=-1)

        return rise(t) / rise(jnp.ones((1,)))

    def _shape_monotone(self, t: jax.Array, coef: jax.Array) -> jax.Array:
        """s(t) [N, D] for times [N] (or [1])."""
        w2 = nn.softplus(self.param("hidden_kernel", nn.initializers.normal(1.0), (self.width,)))
        b2 = self.param("hidden_bias", nn.initializers.normal(1.0), (self.width,))
        w1, w3 = nn.softplus(coef[..., 0]), nn.softplus(coef[..., 1:])  # [n, D], [n, D, width]

        def rise(u: jax.Array) -> jax.Array:  # h(u) - h(0), [N] -> [N, D]
            hidden = _sigmoid_rise(u, w2, b2)  # [N, width]
            if w3.shape[0] == 1:  # the same interior for every input: one matmul
                mix = hidden @ w3[0].T
            else:
                hidden = jnp.broadcast_to(hidden, (w3.shape[0], self.width))
                mix = jnp.einsum("nw,ndw->nd", hidden, w3)
            return w1 * u[:, None] + mix / self.width

        # Differences of sigmoids rather than of their sums: no cancellation near t = 0.
        return rise(t) / rise(jnp.ones((1,)))

    @staticmethod
    def _shape_polynomial(t: jax.Array, coef: jax.Array) -> jax.Array:
        """s(t) [N, D] for times [N] (or [1])."""
        a, b, c = coef[..., 0], coef[..., 1], nn.softplus(coef[..., 2])

        floor = _POLYNOMIAL_DELTA * (a * a + b * b + c * c)

        def p(u: jax.Array) -> jax.Array:  # integral_0^u (a s^2 + b s + c)^2 + floor ds
            u = u[:, None]
            return (
                a * a * u**5 / 5.0
                + a * b * u**4 / 2.0
                + (b * b + 2.0 * a * c) * u**3 / 3.0
                + b * c * u**2
                + (c * c + floor) * u
            )

        return p(t) / p(jnp.ones((1,)))

    @nn.compact
    def __call__(self, t: jax.Array, context: jax.Array | None = None) -> jax.Array:
        if not self.gamma_max > self.gamma_min:
            raise ValueError(
                f"schedule needs gamma_max > gamma_min, got {self.gamma_min}, {self.gamma_max}"
            )
        if self.interior not in PER_DIMENSION_INTERIORS:
            raise ValueError(
                f"interior must be one of {PER_DIMENSION_INTERIORS}, got {self.interior!r}"
            )
        dims = math.prod(self.event_shape)
        zeros = nn.initializers.zeros
        gamma_0 = self.param("gamma_min", nn.initializers.constant(self.gamma_min), ())
        gamma_0 = gamma_0 + self.param("gamma_min_offset", zeros, (dims,))
        log_range = self.param(
            "log_gamma_range",
            nn.initializers.constant(math.log(self.gamma_max - self.gamma_min)),
            (),
        )
        log_range = log_range + self.param("log_gamma_range_offset", zeros, (dims,))
        times = jnp.reshape(jnp.asarray(t, jnp.float32), (-1,))  # [N]: N = 1 or B
        times = self._time_warp(times)
        if self.interior == "monotone":
            init = lambda k: jnp.concatenate(  # noqa: E731
                [jnp.full((1,), _inverse_softplus(1.0)), jnp.full((k - 1,), -2.0)]
            )
            coef = self._coefficients(context, dims, 1 + self.width, init)
            shape = self._shape_monotone(times, coef)
        else:
            init = lambda k: jnp.array([0.0, 0.0, _inverse_softplus(1.0)])  # noqa: E731
            coef = self._coefficients(context, dims, 3, init)
            shape = self._shape_polynomial(times, coef)
        gamma = gamma_0 + jnp.exp(log_range) * shape  # [N or B, D]
        return gamma.reshape((gamma.shape[0], *self.event_shape))


PER_DIMENSION_INTERIORS = ("monotone", "polynomial")
# The per-dimension schedules' endpoints: shared values plus per-dimension offsets.
PER_DIMENSION_ENDPOINTS = LEARNED_ENDPOINTS | {"gamma_min_offset", "log_gamma_range_offset"}
# The per-dimension schedules' shared time warp: its parameters move each dimension along its
# own path, not the paths themselves, so ``schedule_grad="variance"`` trains them (alone) on
# the variance of the loss estimate.
TIME_WARP = frozenset(
    {"warp_linear", "warp_hidden_kernel", "warp_hidden_bias", "warp_output_kernel"}
)
_POLYNOMIAL_DELTA = 1e-3


@dataclasses.dataclass(frozen=True)
class ScheduleSettings(Settings):
    """What every schedule reads from ``config.model``: gamma(0), gamma(1) at initialisation
    (for good, for a fixed schedule)."""

    gamma_min: float = -13.3
    gamma_max: float = 5.0

    def problems(self) -> list[str]:
        if is_number(self.gamma_min) and is_number(self.gamma_max):
            if self.gamma_min < self.gamma_max:
                return []
        return [
            f"config.model.gamma_min={self.gamma_min!r} must be below "
            f"config.model.gamma_max={self.gamma_max!r}"
        ]

    def module_fields(self) -> dict[str, Any]:
        """The schedule module's fields these settings give."""
        return {"gamma_min": self.gamma_min, "gamma_max": self.gamma_max}


@dataclasses.dataclass(frozen=True)
class NetworkSettings(ScheduleSettings):
    """A schedule with a hidden layer of ``config.model.schedule_width`` units."""

    schedule_width: int = 1024

    def problems(self) -> list[str]:
        width = self.schedule_width
        ok = is_int(width) and width >= 1
        return super().problems() + out_of_range(
            "model.schedule_width", width, ok, "an integer >= 1"
        )

    def module_fields(self) -> dict[str, Any]:
        return {**super().module_fields(), "width": self.schedule_width}


@dataclasses.dataclass(frozen=True)
class PerDimensionSettings(ScheduleSettings):
    """A per-dimension schedule: one gamma per data ``"dimension"`` or per ``"channel"``
    (``config.model.schedule_per``)."""

    schedule_per: str = "dimension"

    def problems(self) -> list[str]:
        per = unknown_name("model.schedule_per", self.schedule_per, ("dimension", "channel"))
        return super().problems() + per

    def event_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of each example's gamma: the data's (H, W, C), or (1, 1, C)."""
        if self.schedule_per == "channel":
            return (1,) * (len(image_shape) - 1) + tuple(image_shape[-1:])
        return tuple(image_shape)


@dataclasses.dataclass(frozen=True)
class PerDimensionNetworkSettings(PerDimensionSettings, NetworkSettings):
    """A per-dimension schedule with a hidden width."""


@dataclasses.dataclass(frozen=True)
class CosineSettings(ScheduleSettings):
    """The cosine schedule's offset ``s`` (``config.model.cosine_s``; Improved DDPM: 0.008)."""

    cosine_s: float = 0.008

    def problems(self) -> list[str]:
        s = self.cosine_s
        ok = is_number(s) and 0.0 <= s <= 1.0
        return super().problems() + out_of_range("model.cosine_s", s, ok, "a number in [0, 1]")

    def module_fields(self) -> dict[str, Any]:
        return {**super().module_fields(), "s": self.cosine_s}


@dataclasses.dataclass(frozen=True)
class ScheduleKind:
    """A registered schedule: its module, its settings, and what training needs to know.

    Attributes:
      module: builds the Flax module from :meth:`ScheduleSettings.module_fields` (and a
        per-dimension one's ``event_shape``).
      settings: the record of the ``config.model`` fields it reads; it checks their values.
      endpoint_params: names of the parameters that set gamma(0) and gamma(1); no other
        parameter moves them. None: no such split (the endpoints are not parameters).
      variance_params: names of the parameters that ``schedule_grad="variance"`` trains on
        the variance of the loss estimate (every other one trains on the ELBO); parameters
        that cannot change the continuous-time ELBO. None: the variance gradient does not
        apply (the kind has no ``endpoint_params``).
      per_dimension: one gamma per data dimension (``t`` [] or [B] -> the data's rank),
        which may also take a context (an input-adaptive schedule); else elementwise in t.
    """

    module: Callable[..., nn.Module]
    settings: type[ScheduleSettings]
    endpoint_params: frozenset[str] | None
    variance_params: frozenset[str] | None
    per_dimension: bool = False

    def build(
        self, settings: ScheduleSettings, image_shape: tuple[int, ...] | None = None
    ) -> nn.Module:
        """The module with ``settings`` (a per-dimension one needs the data's ``image_shape``)."""
        fields = settings.module_fields()
        if self.per_dimension:
            if image_shape is None:
                raise ValueError("a per-dimension schedule needs the data's image_shape")
            fields["event_shape"] = settings.event_shape(image_shape)
        return self.module(**fields)


_NO_PARAMS: frozenset[str] = frozenset()
SCHEDULES: dict[str, ScheduleKind] = {
    "fixed_linear": ScheduleKind(FixedLinearSchedule, ScheduleSettings, _NO_PARAMS, _NO_PARAMS),
    "learned_linear": ScheduleKind(
        LearnedLinearSchedule, ScheduleSettings, LEARNED_ENDPOINTS, _NO_PARAMS
    ),
    "learned_cosine": ScheduleKind(
        LearnedCosineSchedule, CosineSettings, LEARNED_ENDPOINTS, _NO_PARAMS
    ),
    "monotone_net": ScheduleKind(
        MonotoneNetSchedule,
        NetworkSettings,
        LEARNED_ENDPOINTS,
        frozenset({"linear", "hidden_kernel", "hidden_bias", "output_kernel"}),
    ),
    "reference_net": ScheduleKind(ReferenceNetSchedule, NetworkSettings, None, None),
    "per_dim_monotone": ScheduleKind(
        functools.partial(PerDimensionSchedule, interior="monotone"),
        PerDimensionNetworkSettings,
        PER_DIMENSION_ENDPOINTS,
        TIME_WARP,
        per_dimension=True,
    ),
    "per_dim_polynomial": ScheduleKind(
        functools.partial(PerDimensionSchedule, interior="polynomial"),
        PerDimensionSettings,
        PER_DIMENSION_ENDPOINTS,
        TIME_WARP,
        per_dimension=True,
    ),
}


def make_schedule(name: str, **kwargs) -> nn.Module:
    """Builds a schedule by name: one of :data:`SCHEDULES`, with its module's fields."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; allowed: {sorted(SCHEDULES)}")
    return SCHEDULES[name].module(**kwargs)
