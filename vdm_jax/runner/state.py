"""The training state of an experiment: its optimizer, and the state created or laid out
over the mesh without computing it.

(Separate from ``train.py`` so that evaluation can lay out the same state to restore a
checkpoint without importing the training loop.)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from vdm_jax import model
from vdm_jax.runner import ensemble, sharding
from vdm_jax.runner.experiment import Experiment
from vdm_jax.runner.specs import OptimizerSpec

Params = Any


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue, as one pytree (checkpointed whole).

    Attributes:
      step: [] int32, number of updates applied.
      params: ``{"schedule": ..., "score_net": ...}`` (an ensemble's ``score_net`` leaves
        stack its members on a leading axis).
      ema_params: exponential moving average of ``params`` (used to evaluate and sample).
      opt_state: the optimizer's state.
      rng: [2] uint32 raw PRNG key; step ``s`` draws from ``fold_in(rng, s)``.
      time_moments: [TIME_BINS] per-bin second moments of the diffusion integrand, from
        which ``model.adaptive_time`` draws training times; None without it.
    """

    step: jax.Array
    params: Params
    ema_params: Params
    opt_state: optax.OptState
    rng: jax.Array
    time_moments: jax.Array | None = None


# Bins of the adaptive training-time proposal, and the moving average's decay per step.
TIME_BINS = 32
TIME_MOMENTS_DECAY = 0.99


def num_bytes(tree: Any) -> int:
    """Bytes of the arrays (or ``jax.ShapeDtypeStruct`` s) of a pytree."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def learning_rate_schedule(spec: OptimizerSpec) -> optax.Schedule:
    """Linear warmup to ``learning_rate`` over ``warmup_steps`` updates, then constant, or,
    with ``decay_steps`` > 0, times a cosine decay that reaches 0 at update ``decay_steps``
    (and stays there).

    The first update already uses ``learning_rate / warmup_steps`` (not 0). The decay also
    slows the learned schedule's endpoints: on digits, gamma_min stopped short of where a
    constant rate takes it, and the test bpd was worse (README's digits ablation).
    """
    peak, warmup = spec.learning_rate, spec.warmup_steps
    decay = optax.cosine_decay_schedule(1.0, spec.decay_steps) if spec.decay_steps else None

    def schedule(count: jax.Array) -> jax.Array:
        rate = jnp.asarray(peak, jnp.float32)
        if warmup:
            rate = rate * jnp.minimum(1.0, (count + 1.0) / warmup)
        if decay is not None:
            rate = rate * decay(count)
        return rate

    return schedule


def _weight_decay_mask(params: Params) -> Params:
    # Decay the score network only: decaying gamma_min / log_gamma_range would pull the
    # schedule's endpoints towards arbitrary values, which regularises nothing.
    return {
        k: jax.tree.map(lambda _, decay=(k == "score_net"): decay, v) for k, v in params.items()
    }


def create_optimizer(spec: OptimizerSpec) -> optax.GradientTransformation:
    """AdamW with warmup, after optional global-norm clipping."""
    adamw = optax.adamw(
        learning_rate_schedule(spec),
        b1=spec.b1,
        b2=spec.b2,
        eps=spec.eps,
        weight_decay=spec.weight_decay,
        mask=_weight_decay_mask,
    )
    if spec.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(spec.grad_clip_norm), adamw)
    return adamw


def dummy_inputs(
    exp: Experiment, batch_size: int = 1
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``(z [b, H, W, C], t [b], label [b] | None)`` zeros, to initialise the model."""
    label = jnp.zeros((batch_size,), jnp.int32) if exp.conditioning.conditional else None
    return jnp.zeros((batch_size, *exp.info.shape)), jnp.zeros((batch_size,)), label


def _init_fn(exp: Experiment) -> Callable[[jax.Array], TrainState]:
    optimizer = create_optimizer(exp.optimizer)

    def init(rng: jax.Array) -> TrainState:
        init_key, train_key = jax.random.split(rng)
        params = model.init_params(exp.vdm, init_key, *dummy_inputs(exp))
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=jax.tree.map(jnp.copy, params),
            opt_state=optimizer.init(params),
            rng=train_key,
            time_moments=jnp.ones((TIME_BINS,), jnp.float32) if exp.loss.adaptive_time else None,
        )

    return init


@functools.lru_cache(maxsize=16)
def state_shapes(exp: Experiment) -> TrainState:
    """Shapes and dtypes of the experiment's state (``jax.ShapeDtypeStruct`` s), traced, not
    computed. Cached per experiment (a frozen, hashable record): the train step, the save
    check, the evaluator, the sampler and the restore all lay out the same state, and
    tracing a large model's init takes seconds."""
    return jax.eval_shape(_init_fn(exp), jax.random.PRNGKey(exp.seed))


def state_shardings(exp: Experiment, shapes: TrainState | None = None) -> TrainState:
    """The state's layout over the mesh: each leaf's ``NamedSharding`` (``sharding.fsdp``:
    large arrays split over the ``"fsdp"`` axis, :func:`vdm_jax.runner.sharding.state_shardings`).
    An ensemble whose members are split over the ``"data"`` axis
    (:func:`vdm_jax.runner.ensemble.member_parallel`) keeps its networks' leaves split there too.

    ``shapes``: :func:`state_shapes`, if already traced.
    """
    shapes = state_shapes(exp) if shapes is None else shapes
    layout = sharding.state_shardings(shapes, exp.mesh, exp.sharding.min_shard_bytes)
    if not ensemble.member_parallel(exp.mesh, exp.vdm.ensemble_size):
        return layout
    # An ensemble whose members are split over the devices: each device keeps its members'
    # networks, their EMA and Adam moments (every leaf under "score_net", member-major).
    members = NamedSharding(exp.mesh, PartitionSpec(sharding.DATA_AXIS))

    def place(path: Any, leaf_sharding: NamedSharding) -> NamedSharding:
        return (
            members if any(getattr(k, "key", None) == "score_net" for k in path) else leaf_sharding
        )

    return jax.tree_util.tree_map_with_path(place, layout)


def param_layout(exp: Experiment) -> sharding.ParamLayout:
    """How the parameters (and EMA parameters) are stored, and gathered to compute with."""
    return sharding.ParamLayout.of(state_shardings(exp).params)


def create_train_state(exp: Experiment) -> TrainState:
    """A fresh state from the experiment's seed, created directly in its layout over the mesh
    (each device computes only its shards)."""
    init = _init_fn(exp)
    return jax.jit(init, out_shardings=state_shardings(exp))(jax.random.PRNGKey(exp.seed))


def abstract_train_state(exp: Experiment, shapes: TrainState | None = None) -> TrainState:
    """Shapes, dtypes and shardings of the state, without computing it (what a checkpoint
    is restored onto: any layout, whichever wrote it).

    ``shapes``: :func:`state_shapes`, if already traced (e.g. for the same model on another
    mesh).
    """
    shapes = state_shapes(exp) if shapes is None else shapes
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        shapes,
        state_shardings(exp, shapes),
    )
