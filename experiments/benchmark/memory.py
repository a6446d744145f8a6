"""Memory without running: the train step compiled on abstract inputs (``--memory_only``).

XLA's memory estimate of the compiled step depends on the backend (XLA:CPU's does not shrink
with ``model.remat`` or bfloat16), so next to it comes a backend-independent estimate read
off the traced program: the device's part of the train state, the parameters a split state
gathers, one copy of the gradients, and the activations the backward pass keeps
(:func:`saved_activation_bytes`), for the state replicated and split over every device
(:data:`LAYOUTS`). ``--fit_device_bytes`` adds the widest U-Net that fits a device's memory
in each layout (:func:`widest_fitting`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from experiments.benchmark import harness, parts
from vdm_jax import model, unet
from vdm_jax.runner import flops, sharding, state, train
from vdm_jax.runner.experiment import Experiment


def saved_activation_bytes(exp: Experiment, params: Any, batch: dict[str, Any]) -> int:
    """Bytes the backward pass keeps from the forward pass, for the whole batch.

    The residuals of ``jax.vjp`` of the negative ELBO with respect to the parameters, read
    off the traced program (``jax.eval_shape``: nothing is computed or allocated). They are
    what ``model.remat`` and ``model.dtype`` change, and unlike XLA:CPU's memory estimate
    they do not depend on a backend's scheduler. Parameters the backward reads again are
    counted too, so this overestimates by at most one copy of them in the compute dtype.
    The loss is the evaluation ELBO, without dropout: a model trained with dropout also
    keeps its masks (one byte per masked activation).

    Args:
      exp: the experiment (its VDM and objective).
      params: the parameters (arrays or ``jax.ShapeDtypeStruct`` s).
      batch: ``{"image": int32 [B, H, W, C], "label": int32 [B] (if conditioned)}``
        (arrays or ``jax.ShapeDtypeStruct`` s).
    """

    def residuals(p: Any, b: dict[str, Any]) -> Any:
        def loss(p_: Any) -> jax.Array:
            terms = model.vdm_terms(exp.vdm, p_, b, jax.random.key(0), exp.loss)
            return jnp.mean(sum(terms.values()))

        return jax.vjp(loss, p)[1]

    return state.num_bytes(jax.eval_shape(residuals, params, batch))


# The two layouts of the train state every ``--memory_only`` point reports: replicated (data
# parallelism) and split over every device of the mesh (``sharding.fsdp=-1``).
LAYOUTS = {"replicated": 1, "fsdp": -1}
# ``--fit_device_bytes`` searches ``model.channels`` in multiples of this.
WIDTH_STEP = 64


@dataclasses.dataclass(frozen=True)
class ResidualEstimate:
    """One device's memory at the train step's peak, in bytes, backend-independent.

    The working set of the one block being differentiated comes on top.

    Attributes:
      train_state_bytes: the device's part of the parameters, EMA and optimizer state (all
        of it when replicated; its shards when split).
      gathered_param_bytes: the whole parameters a split state gathers to compute with
        (0 when replicated: the state's own copy is used).
      gradient_bytes: one whole copy of the gradients (before a split state's reduce-scatter
        leaves each device its shard; an upper bound).
      saved_activation_bytes: the device's share of :func:`saved_activation_bytes` (the
        batch is sharded).
    """

    train_state_bytes: int
    gathered_param_bytes: int
    gradient_bytes: int
    saved_activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return (
            self.train_state_bytes
            + self.gathered_param_bytes
            + self.gradient_bytes
            + self.saved_activation_bytes
        )

    def to_json(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "total_bytes": self.total_bytes}


def with_fsdp(exp: Experiment, fsdp: int) -> Experiment:
    """The experiment on the same devices with ``sharding.fsdp=fsdp`` (a new mesh)."""
    devices = list(exp.mesh.devices.reshape(-1))
    return exp.replace(
        mesh=sharding.make_mesh(devices, fsdp),
        sharding=dataclasses.replace(exp.sharding, fsdp=fsdp),
    )


def residual_estimate(
    exp: Experiment, shapes: state.TrainState, activation_bytes: int
) -> ResidualEstimate:
    """:class:`ResidualEstimate` of the train step in ``exp``'s layout.

    Args:
      exp: the experiment (its mesh and ``sharding`` section give the layout).
      shapes: :func:`vdm_jax.runner.state.state_shapes` of ``exp``.
      activation_bytes: :func:`saved_activation_bytes` of the global batch.
    """
    laid_out = state.abstract_train_state(exp, shapes)
    gathered = [  # Split over "fsdp" (an ensemble's members split over "data" stay split).
        p for p in jax.tree.leaves(laid_out.params) if sharding.FSDP_AXIS in p.sharding.spec
    ]
    return ResidualEstimate(
        train_state_bytes=sharding.bytes_per_device(laid_out),
        gathered_param_bytes=state.num_bytes(gathered),
        gradient_bytes=state.num_bytes(shapes.params),
        saved_activation_bytes=activation_bytes // exp.mesh.size,
    )


def layout_estimates(
    exp: Experiment, shapes: state.TrainState, activation_bytes: int
) -> dict[str, ResidualEstimate]:
    """:class:`ResidualEstimate` of each of :data:`LAYOUTS` on ``exp``'s devices."""
    return {
        name: residual_estimate(with_fsdp(exp, fsdp), shapes, activation_bytes)
        for name, fsdp in LAYOUTS.items()
    }


@dataclasses.dataclass(frozen=True)
class WidthFit:
    """The widest U-Net (``model.channels``) whose estimate fits a device, in one layout."""

    channels: int
    num_params: int
    estimate: ResidualEstimate

    def to_json(self) -> dict[str, Any]:
        return {
            "channels": self.channels,
            "num_params": self.num_params,
            "residual_estimate_per_device": self.estimate.to_json(),
        }


def widest_fitting(exp: Experiment, batch_size: int, device_bytes: float) -> dict[str, WidthFit]:
    """For each of :data:`LAYOUTS`, the largest ``model.channels`` (a multiple of
    :data:`WIDTH_STEP`; depth, batch, dtype and remat as in ``exp``) whose
    :class:`ResidualEstimate` per device is at most ``device_bytes``.

    Doubles the width until nothing fits, then bisects; each try traces the model, nothing
    is compiled or allocated. A layout where even :data:`WIDTH_STEP` does not fit is absent.
    """
    cache: dict[int, tuple[int, dict[str, ResidualEstimate]]] = {}

    def estimates(k: int) -> tuple[int, dict[str, ResidualEstimate]]:
        if k not in cache:
            model_spec = dataclasses.replace(exp.model, channels=k * WIDTH_STEP)
            wide = exp.replace(
                model=model_spec,
                vdm=model_spec.build(exp.vdm.schedule, exp.num_classes, exp.info.vocab_size),
            )
            shapes = state.state_shapes(wide)
            batch = parts.abstract_batch(wide, batch_size)
            activations = saved_activation_bytes(wide, shapes.params, batch)
            num_params = int(unet.count_params(shapes.params))
            cache[k] = num_params, layout_estimates(wide, shapes, activations)
        return cache[k]

    fits: dict[str, WidthFit] = {}
    for name in LAYOUTS:

        def fit(k: int, name: str = name) -> bool:
            return estimates(k)[1][name].total_bytes <= device_bytes

        if not fit(1):
            continue
        low, high = 1, 2
        while fit(high):
            low, high = high, 2 * high
        while high - low > 1:  # fit(low), not fit(high)
            mid = (low + high) // 2
            low, high = (mid, high) if fit(mid) else (low, mid)
        num_params, by_layout = estimates(low)
        fits[name] = WidthFit(low * WIDTH_STEP, num_params, by_layout[name])
    return fits


@dataclasses.dataclass(frozen=True)
class MemoryOnlyResult:
    """The train step compiled, not run: XLA's figures, the estimates and the model's size.

    Attributes:
      estimate: :class:`ResidualEstimate` in the experiment's own layout.
      layouts: the same for each of :data:`LAYOUTS`.
      widest: :func:`widest_fitting` (empty unless ``--fit_device_bytes`` is set).
    """

    placement: harness.Placement
    compilation: harness.Compilation
    estimate: ResidualEstimate
    layouts: dict[str, ResidualEstimate]
    num_params: int
    widest: dict[str, WidthFit]

    def to_json(self) -> dict[str, Any]:
        """The result's JSON record (a ``train`` part with ``memory_only``)."""
        memory = self.compilation.xla.memory_json()
        memory["residual_estimate_per_device"] = self.estimate.to_json()
        memory["residual_estimate_per_device_by_layout"] = {
            k: v.to_json() for k, v in self.layouts.items()
        }
        if self.widest:
            memory["widest_fitting"] = {k: v.to_json() for k, v in self.widest.items()}
        return {
            "part": "train",
            "memory_only": True,
            **self.placement.to_json(),
            **self.compilation.to_json(),
            "memory": memory,
            "num_params": self.num_params,
            "state_bytes_per_device": self.estimate.train_state_bytes,
        }


def memory_only_point(
    exp: Experiment, placement: harness.Placement, fit_device_bytes: float = 0.0
) -> MemoryOnlyResult:
    """Compiles the train step at ``placement.batch_size`` on abstract inputs (nothing is
    allocated): XLA's memory estimate, FLOP counts and :class:`ResidualEstimate` in each
    layout; with ``fit_device_bytes`` > 0, also :func:`widest_fitting` that budget."""
    batch_size = placement.batch_size
    shapes = state.state_shapes(exp)
    abstract_state = state.abstract_train_state(exp, shapes)
    batch = parts.abstract_batch(exp, batch_size)
    _, compilation = harness.compile_program(
        train.make_train_step(exp),
        (abstract_state, batch),
        num_devices=exp.mesh.size,
        analytic_flops=flops.TRAIN_FLOPS_PER_FORWARD * parts.forward_flops(exp, batch_size),
        count_jaxpr_flops=flops.jaxpr_flops,
    )
    activations = saved_activation_bytes(exp, shapes.params, batch)
    widest = widest_fitting(exp, batch_size, fit_device_bytes) if fit_device_bytes > 0 else {}
    return MemoryOnlyResult(
        placement=placement,
        compilation=compilation,
        estimate=residual_estimate(exp, shapes, activations),
        layouts=layout_estimates(exp, shapes, activations),
        num_params=int(unet.count_params(shapes.params)),
        widest=widest,
    )
