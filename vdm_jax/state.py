"""From a config to a model, an optimizer and a replicated training state.

This is the typed boundary between the experiment config and the library: the functions
here read the config and hand the model, loss and optimizer only the values they need.
(Separate from ``train.py`` so that ``evaluate.py`` can build the same state to restore a
checkpoint without importing the training loop.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from vdm_jax import config_validation, data, model, schedules, sharding, unet

Params = Any
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def setup(
    config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> tuple[Mesh, data.DatasetInfo]:
    """The mesh and the dataset's facts of a run, once the config is validated against them.

    Args:
      config: the experiment config.
      devices: the mesh's devices (default: every device of every host).

    Raises:
      config_validation.ConfigError: naming every invalid field, before any work.
    """
    mesh = sharding.make_mesh(devices)
    info = data.get_info(config.data.name, config.data.data_dir)
    config_validation.validate(
        config, num_devices=mesh.size, process_count=jax.process_count(), info=info
    )
    return mesh, info


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue, as one pytree (checkpointed whole).

    Attributes:
      step: [] int32, number of updates applied.
      params: ``{"schedule": ..., "score_net": ...}``.
      ema_params: exponential moving average of ``params`` (used to evaluate and sample).
      opt_state: the optimizer's state.
      rng: [2] uint32 raw PRNG key; step ``s`` draws from ``fold_in(rng, s)``.
    """

    step: jax.Array
    params: Params
    ema_params: Params
    opt_state: optax.OptState
    rng: jax.Array


def num_classes(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> int:
    """Size of the label space the score network is conditioned on (0: unconditional)."""
    return {
        "none": 0,
        "label": info.num_classes,
        "augmentation": data.NUM_AUGMENTATIONS,
    }[config.model.conditioning]


def create_model(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> model.VDM:
    """The VDM (schedule and score U-Net) that ``config.model`` describes, for ``info``'s data."""
    m = config.model
    schedule_kwargs: dict[str, Any] = {"gamma_min": m.gamma_min, "gamma_max": m.gamma_max}
    if m.schedule in ("monotone_net", "reference_net"):
        schedule_kwargs["width"] = m.schedule_width
    score_net = unet.ScoreUNet(
        num_blocks=m.num_blocks,
        channels=m.channels,
        dropout_rate=m.dropout_rate,
        attention=m.attention,
        fourier_features=m.fourier_features,
        fourier_min_exp=m.fourier_min_exp,
        fourier_max_exp=m.fourier_max_exp,
        gamma_min=m.gamma_min,
        gamma_max=m.gamma_max,
        num_classes=num_classes(config, info),
        num_groups=m.num_groups,
        dtype=DTYPES[m.dtype],
        remat=m.remat,
        label_input=m.label_input,
        min_group_size=m.min_group_size,
        add_z_to_eps=m.add_z_to_eps,
    )
    return model.VDM(schedules.make_schedule(m.schedule, **schedule_kwargs), score_net)


def loss_config(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> model.LossConfig:
    """What the objective needs from ``config.model`` and the data."""
    return model.LossConfig(
        vocab_size=info.vocab_size,
        timesteps=config.model.timesteps,
        antithetic_time=config.model.antithetic_time,
        schedule_grad=config.model.schedule_grad,
    )


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup to ``learning_rate`` over ``warmup_steps`` updates, then constant.

    The first update already uses ``learning_rate / warmup_steps`` (not 0).
    """
    peak, warmup = config.optimizer.learning_rate, config.optimizer.warmup_steps

    def schedule(count: jax.Array) -> jax.Array:
        if warmup == 0:
            return jnp.asarray(peak, jnp.float32)
        return peak * jnp.minimum(1.0, (count + 1.0) / warmup)

    return schedule


def _weight_decay_mask(params: Params) -> Params:
    # Decay the score network only: decaying gamma_min / log_gamma_range would pull the
    # schedule's endpoints towards arbitrary values, which regularises nothing.
    return {
        k: jax.tree.map(lambda _, decay=(k == "score_net"): decay, v) for k, v in params.items()
    }


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with warmup (``config.optimizer``), after optional global-norm clipping."""
    o = config.optimizer
    adamw = optax.adamw(
        learning_rate_schedule(config),
        b1=o.b1,
        b2=o.b2,
        eps=o.eps,
        weight_decay=o.weight_decay,
        mask=_weight_decay_mask,
    )
    if o.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), adamw)
    return adamw


def dummy_inputs(
    config: ml_collections.ConfigDict, info: data.DatasetInfo, batch_size: int = 1
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``(z [b, H, W, C], t [b], label [b] | None)`` zeros, to initialise the model."""
    label = jnp.zeros((batch_size,), jnp.int32) if num_classes(config, info) else None
    return jnp.zeros((batch_size, *info.shape)), jnp.zeros((batch_size,)), label


def _init_fn(
    config: ml_collections.ConfigDict,
    info: data.DatasetInfo,
    vdm: model.VDM,
    optimizer: optax.GradientTransformation,
) -> Callable[[jax.Array], TrainState]:
    def init(rng: jax.Array) -> TrainState:
        init_key, train_key = jax.random.split(rng)
        params = vdm.init({"params": init_key}, *dummy_inputs(config, info))["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=jax.tree.map(jnp.copy, params),
            opt_state=optimizer.init(params),
            rng=train_key,
        )

    return init


def create_train_state(
    config: ml_collections.ConfigDict,
    info: data.DatasetInfo,
    vdm: model.VDM,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
) -> TrainState:
    """A fresh state from ``config.seed``, created directly replicated over ``mesh``."""
    init = _init_fn(config, info, vdm, optimizer)
    rng = jax.random.PRNGKey(config.seed)
    return jax.jit(init, out_shardings=sharding.replicated(mesh))(rng)


def abstract_train_state(
    config: ml_collections.ConfigDict,
    info: data.DatasetInfo,
    vdm: model.VDM,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
) -> TrainState:
    """Shapes, dtypes and (replicated) shardings of the state, without computing it."""
    init = _init_fn(config, info, vdm, optimizer)
    shapes = jax.eval_shape(init, jax.random.PRNGKey(config.seed))
    replicated = sharding.replicated(mesh)
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes
    )
