"""One typed experiment, built once from a validated config: what train, eval, sample and
the benchmark take.

:func:`build` checks the config (:mod:`vdm_jax.runner.config_validation`), turns each section into a
frozen dataclass whose fields are the section's keys (``OptimizerSpec(**config.optimizer)``,
as big_vision passes ``config.model`` to its model), and assembles the parts a run needs:
the dataset's facts, the device mesh, the VDM, the objective and the conditioning. Nothing
below an :class:`Experiment` reads a ``ConfigDict``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from vdm_jax import model
from vdm_jax.runner import conditioning, config_validation, data, sharding, specs
from vdm_jax.runner.specs import (
    DataSpec,
    EvalSpec,
    ModelSpec,
    OptimizerSpec,
    SampleSpec,
    ShardingSpec,
    TrainingSpec,
)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything a run is made of, typed and built once.

    Attributes:
      seed: one seed for initialisation, training, data order, eval and sampling.
      data: the data section.
      info: the dataset's facts (shape, K, classes, split sizes).
      mesh: the device mesh ``("data", "fsdp")`` over every device of every host
        (:func:`vdm_jax.runner.sharding.make_mesh`).
      model: the model section, as given (the VDM is :attr:`vdm`).
      vdm: the schedule and score network.
      loss: what the objective needs (vocabulary, timesteps, time sampling, schedule grads).
      conditioning: the :data:`vdm_jax.runner.conditioning.CONDITIONINGS` entry.
      optimizer: the optimizer section.
      training: the training section.
      eval: the eval section.
      sample: the sample section.
      sharding: the sharding section (how the train state is laid out over the mesh).
    """

    seed: int
    data: DataSpec
    info: data.DatasetInfo
    mesh: Mesh
    model: ModelSpec
    vdm: model.VDM
    loss: model.LossConfig
    conditioning: conditioning.Conditioning
    optimizer: OptimizerSpec
    training: TrainingSpec
    eval: EvalSpec
    sample: SampleSpec
    sharding: ShardingSpec

    @property
    def num_classes(self) -> int:
        """Labels the score network embeds (0: unconditional)."""
        return self.conditioning.num_classes(self.info)

    def replace(self, **changes: Any) -> Experiment:
        """A copy with some sections replaced (e.g. another ``training`` for a benchmark)."""
        return dataclasses.replace(self, **changes)


def build(
    config: ml_collections.ConfigDict,
    devices: Sequence[jax.Device] | None = None,
    *,
    info: data.DatasetInfo | None = None,
) -> Experiment:
    """Validates ``config`` and builds its :class:`Experiment`.

    Args:
      config: an experiment config (``configs/base.py`` lists the fields).
      devices: the mesh's devices (default: every device of every host).
      info: the dataset's facts, if already known (default: opened from ``config.data``;
        the benchmark passes the registered facts to avoid reading any data).

    Raises:
      config_validation.ConfigError: naming every invalid field, before any work.
    """
    devices = jax.devices() if devices is None else list(devices)
    if info is None:
        info = data.get_info(config.data.name, config.data.data_dir)
    config_validation.validate(
        config, num_devices=len(devices), process_count=jax.process_count(), info=info
    )
    sharding_spec = specs.from_section(ShardingSpec, config.sharding)
    mesh = sharding.make_mesh(devices, fsdp=sharding_spec.fsdp)
    model_spec = specs.from_section(ModelSpec, config.model)
    cond = conditioning.CONDITIONINGS[model_spec.conditioning]
    return Experiment(
        seed=config.seed,
        data=specs.from_section(DataSpec, config.data),
        info=info,
        mesh=mesh,
        model=model_spec,
        vdm=model_spec.build(cond.num_classes(info), info.shape, info.vocab_size),
        loss=model.LossConfig(
            vocab_size=info.vocab_size,
            timesteps=model_spec.timesteps,
            antithetic_time=model_spec.antithetic_time,
            schedule_grad=model_spec.schedule_grad,
            weighting=model_spec.weighting,
            weighting_bias=model_spec.weighting_bias,
            adaptive_time=model_spec.adaptive_time,
        ),
        conditioning=cond,
        optimizer=specs.from_section(OptimizerSpec, config.optimizer),
        training=specs.from_section(TrainingSpec, config.training),
        eval=specs.from_section(EvalSpec, config.eval),
        sample=specs.from_section(SampleSpec, config.sample),
        sharding=sharding_spec,
    )
