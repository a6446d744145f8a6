"""Memory without running: the train step compiled on abstract inputs (``--memory_only``).

XLA's memory estimate of the compiled step depends on the backend (XLA:CPU's does not shrink
with ``model.remat`` or bfloat16), so next to it comes a backend-independent estimate read
off the traced program: the train state, one copy of the gradients, and the activations the
backward pass keeps (:func:`saved_activation_bytes`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from experiments.benchmark import harness, parts
from vdm_jax import flops, model, state, train, unet
from vdm_jax.experiment import Experiment


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


@dataclasses.dataclass(frozen=True)
class ResidualEstimate:
    """One device's memory at the train step's peak, in bytes, backend-independent.

    The working set of the one block being differentiated comes on top.

    Attributes:
      train_state_bytes: parameters, EMA and optimizer state (replicated).
      gradient_bytes: one copy of the gradients.
      saved_activation_bytes: the device's share of :func:`saved_activation_bytes` (the
        batch is sharded).
    """

    train_state_bytes: int
    gradient_bytes: int
    saved_activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.train_state_bytes + self.gradient_bytes + self.saved_activation_bytes

    def to_json(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "total_bytes": self.total_bytes}


def residual_estimate(
    exp: Experiment, abstract_state: state.TrainState, batch: dict[str, Any]
) -> ResidualEstimate:
    """:class:`ResidualEstimate` of the train step on ``batch`` (abstract inputs)."""
    state_bytes = state.num_bytes((abstract_state.params, abstract_state.ema_params))
    state_bytes += state.num_bytes(abstract_state.opt_state)
    activations = saved_activation_bytes(exp, abstract_state.params, batch)
    return ResidualEstimate(
        train_state_bytes=state_bytes,
        gradient_bytes=state.num_bytes(abstract_state.params),
        saved_activation_bytes=activations // exp.mesh.size,
    )


@dataclasses.dataclass(frozen=True)
class MemoryOnlyResult:
    """The train step compiled, not run: XLA's figures, the estimate and the model's size."""

    placement: harness.Placement
    compilation: harness.Compilation
    estimate: ResidualEstimate
    num_params: int

    def to_json(self) -> dict[str, Any]:
        """The result's JSON record (a ``train`` part with ``memory_only``)."""
        memory = self.compilation.xla.memory_json()
        memory["residual_estimate_per_device"] = self.estimate.to_json()
        return {
            "part": "train",
            "memory_only": True,
            **self.placement.to_json(),
            **self.compilation.to_json(),
            "memory": memory,
            "num_params": self.num_params,
        }


def memory_only_point(exp: Experiment, placement: harness.Placement) -> MemoryOnlyResult:
    """Compiles the train step at ``placement.batch_size`` on abstract inputs (nothing is
    allocated): XLA's memory estimate, FLOP counts and :class:`ResidualEstimate`."""
    batch_size = placement.batch_size
    abstract_state = state.abstract_train_state(exp)
    batch = parts.abstract_batch(exp, batch_size)
    _, compilation = harness.compile_program(
        train.make_train_step(exp),
        (abstract_state, batch),
        num_devices=exp.mesh.size,
        analytic_flops=flops.TRAIN_FLOPS_PER_FORWARD * parts.forward_flops(exp, batch_size),
        count_jaxpr_flops=flops.jaxpr_flops,
    )
    return MemoryOnlyResult(
        placement=placement,
        compilation=compilation,
        estimate=residual_estimate(exp, abstract_state, batch),
        num_params=int(unet.count_params(abstract_state.params)),
    )
