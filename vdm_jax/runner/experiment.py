"""One typed experiment, built once from a validated config: what train, eval, sample and
the benchmark take.

:func:`build` checks the config (:mod:`vdm_jax.runner.config_validation`), which looks up
the schedule and the eval method by name once and reads their settings records; turns each
section into a frozen dataclass whose fields are the section's keys
(``OptimizerSpec(**config.optimizer)``, as big_vision passes ``config.model`` to its model);
and assembles the parts a run needs: the dataset's facts, the device mesh, the VDM, the
objective and the conditioning. Nothing below an :class:`Experiment` reads a
``ConfigDict`` or looks up a schedule or an eval method by its name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from vdm_jax import model, schedules
from vdm_jax.runner import conditioning, config_validation, data, eval_methods, sharding, specs
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
      schedule: the ``model.schedule`` entry (its declared properties).
      schedule_settings: its settings record (of ``config.model``).
      vdm: the schedule and score network.
      loss: what the objective needs (vocabulary, timesteps, time sampling, schedule grads).
      conditioning: the :data:`vdm_jax.runner.conditioning.CONDITIONINGS` entry.
      optimizer: the optimizer section.
      training: the training section.
      eval: the eval section.
      eval_method: the ``eval.method`` entry.
      eval_settings: its settings record (of ``config.eval``), what its estimator reads.
      sample: the sample section.
      sharding: the sharding section (how the train state is laid out over the mesh).
    """

    seed: int
    data: DataSpec
    info: data.DatasetInfo
    mesh: Mesh
    model: ModelSpec
    schedule: schedules.ScheduleKind
    schedule_settings: schedules.ScheduleSettings
    vdm: model.VDM
    loss: model.LossConfig
    conditioning: conditioning.Conditioning
    optimizer: OptimizerSpec
    training: TrainingSpec
    eval: EvalSpec
    eval_method: eval_methods.EvalMethod
    eval_settings: eval_methods.EvalSettings
    sample: SampleSpec
    sharding: ShardingSpec

    @property
    def num_classes(self) -> int:
        """Labels the score network embeds (0: unconditional)."""
        return self.conditioning.num_classes(self.info)

    def section_records(self) -> dict[str, tuple[Any, ...]]:
        """Each config section's typed records: its spec and the settings of the entries it
        names (whose fields, such as ``model.cosine_s``, are keys of the section too)."""
        records: dict[str, tuple[Any, ...]] = {s: (getattr(self, s),) for s in specs.SECTIONS}
        records["model"] += (self.schedule_settings,)
        records["eval"] += (self.eval_settings,)
        return records

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
    entries = config_validation.validate(
        config, num_devices=len(devices), process_count=jax.process_count(), info=info
    )
    sharding_spec = specs.from_section(ShardingSpec, config.sharding)
    mesh = sharding.make_mesh(devices, fsdp=sharding_spec.fsdp)
    model_spec = specs.from_section(ModelSpec, config.model)
    cond = conditioning.CONDITIONINGS[model_spec.conditioning]
    schedule = entries.schedule.build(entries.schedule_settings, info.shape)
    return Experiment(
        seed=config.seed,
        data=specs.from_section(DataSpec, config.data),
        info=info,
        mesh=mesh,
        model=model_spec,
        schedule=entries.schedule,
        schedule_settings=entries.schedule_settings,
        vdm=model_spec.build(schedule, cond.num_classes(info), info.vocab_size),
        loss=entries.loss,
        conditioning=cond,
        optimizer=specs.from_section(OptimizerSpec, config.optimizer),
        training=specs.from_section(TrainingSpec, config.training),
        eval=specs.from_section(EvalSpec, config.eval),
        eval_method=entries.eval_method,
        eval_settings=entries.eval_settings,
        sample=specs.from_section(SampleSpec, config.sample),
        sharding=sharding_spec,
    )
