"""The sections of an experiment config as typed, frozen records.

Each dataclass's fields are exactly the keys of its config section (``configs/base.py``
documents them), so ``OptimizerSpec(**config.optimizer)`` is the whole conversion, as
big_vision passes ``config.model`` to its model. :func:`vdm_jax.runner.experiment.build` makes them
once, after the config checks.

The registry entries a section names own their settings: each has a record of the fields it
reads (:class:`vdm_jax.schedules.ScheduleSettings`,
:class:`vdm_jax.runner.eval_methods.EvalSettings`), which checks their values; a field that
only one entry reads (``model.cosine_s``, ``eval.ode_rtol``) is in that record, not here.
:func:`vdm_jax.runner.config_validation.validate` looks each name up once.

Fields marked :func:`may_change` may differ between a workdir's recorded config and a run
that resumes, evaluates or samples it (lengths, intervals, evaluation and sampling settings,
the compute dtype, rematerialisation, the optimizer's step sizes); every other field defines
the model, the objective or the data order, and a change is refused (:mod:`vdm_jax.runner.workdir`).
Fields marked :func:`added` came later; a record without one is read as its former value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

import flax.linen as nn
import jax.numpy as jnp

from vdm_jax import latents, model, parameterizations, unet


def may_change() -> Any:
    """Marks a field that a resumed, evaluated or sampled run may set differently."""
    return dataclasses.field(metadata={"may_change": True})


def added(before: Any) -> Any:
    """Marks a field added after workdirs were written: a workdir whose config record lacks
    it ran as if it held ``before`` (what the code did then), and is compared so."""
    return dataclasses.field(metadata={"before": before})


# Compute dtypes by name (``model.dtype``); parameters stay float32.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """``config.data``: which dataset, where, and whether to augment (see ``configs/base.py``)."""

    name: str
    vocab_size: int
    data_dir: str | None = may_change()
    augment: bool


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """``config.model``: the schedule, the objective and the score U-Net.

    ``schedule_width``, ``gamma_min``, ``gamma_max`` and ``schedule_per`` are read and checked
    by the schedule's settings record (the score network reads ``gamma_min``, ``gamma_max``
    too); they are here so that a workdir compares them as before.
    """

    schedule: str
    schedule_width: int
    gamma_min: float
    gamma_max: float
    schedule_grad: str
    timesteps: int
    antithetic_time: bool
    conditioning: str
    num_blocks: int
    channels: int
    dropout_rate: float
    attention: str
    fourier_features: bool
    fourier_min_exp: int
    fourier_max_exp: int
    num_groups: int
    dtype: str = may_change()
    remat: bool = may_change()
    label_input: str
    min_group_size: int
    add_z_to_eps: bool
    parameterization: str = added("eps")
    weighting: str = added("elbo")
    weighting_bias: float = added(0.0)
    adaptive_time: bool = added(False)
    schedule_per: str = added("dimension")
    latent_dim: int = added(0)
    latent_channels: int = added(32)
    ensemble_size: int = added(1)

    def build(self, schedule: nn.Module, num_classes: int, vocab_size: int = 0) -> model.VDM:
        """The VDM with this ``schedule`` module (built from the schedule's entry,
        :meth:`vdm_jax.schedules.ScheduleKind.build`), embedding ``num_classes`` labels (0:
        none); ``vocab_size`` (K) is read by the parameterisations on the data's grid.
        """
        param = parameterizations.PARAMETERIZATIONS[self.parameterization]
        if param.needs_vocab and vocab_size < 2:
            raise ValueError(
                f"parameterization {self.parameterization!r} reads the data's grid of values "
                f"and needs the vocabulary size (got {vocab_size})"
            )
        encoder = None
        if self.latent_dim > 0:
            encoder = latents.LatentEncoder(self.latent_dim, self.latent_channels)
        score_net = unet.ScoreUNet(
            num_blocks=self.num_blocks,
            channels=self.channels,
            dropout_rate=self.dropout_rate,
            attention=self.attention,
            fourier_features=self.fourier_features,
            fourier_min_exp=self.fourier_min_exp,
            fourier_max_exp=self.fourier_max_exp,
            gamma_min=self.gamma_min,
            gamma_max=self.gamma_max,
            num_classes=num_classes,
            num_groups=self.num_groups,
            dtype=DTYPES[self.dtype],
            remat=self.remat,
            label_input=self.label_input,
            min_group_size=self.min_group_size,
            add_z_to_eps=self.add_z_to_eps,
            outputs_per_channel=param.outputs_per_channel(vocab_size),
        )
        return model.VDM(
            schedule, score_net, self.parameterization, encoder, vocab_size, self.ensemble_size
        )


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """``config.optimizer``: AdamW with linear warmup, optional cosine decay, global-norm
    clipping (0: none), EMA."""

    learning_rate: float = may_change()
    warmup_steps: int = may_change()
    decay_steps: int = may_change()
    b1: float = may_change()
    b2: float = may_change()
    eps: float = may_change()
    weight_decay: float = may_change()
    grad_clip_norm: float
    ema_rate: float = may_change()


@dataclasses.dataclass(frozen=True)
class TrainingSpec:
    """``config.training``: global batch, length, and intervals (in steps) of each action."""

    batch_size: int
    num_steps: int = may_change()
    log_every: int = may_change()
    eval_every: int = may_change()
    sample_every: int = may_change()
    checkpoint_every: int = may_change()
    max_to_keep: int = may_change()


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """``config.eval``: the estimator (a :data:`vdm_jax.runner.eval_methods.EVAL_METHODS` key)
    and the batch. The estimator's own settings (``num_time_samples``, ``ode_*``, ...) are its
    entry's record."""

    method: str = may_change()
    batch_size: int = may_change()


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """``config.sample``: how many samples, in which batches, and the sampler's settings."""

    num_samples: int = may_change()
    batch_size: int = may_change()
    num_steps: int = may_change()
    sampler: str = may_change()
    decode: str = may_change()
    ode_tolerance: float = may_change()


@dataclasses.dataclass(frozen=True)
class ShardingSpec:
    """``config.sharding``: over how many devices the train state is split (FSDP).

    ``fsdp``: devices per copy of the state (1: replicated, plain data parallelism; -1:
    every device); arrays smaller than ``min_shard_bytes`` stay replicated. A checkpoint
    restores onto any layout, so both may change between runs of a workdir.
    """

    fsdp: int = may_change()
    min_shard_bytes: int = may_change()


SECTIONS: dict[str, type] = {
    "data": DataSpec,
    "model": ModelSpec,
    "optimizer": OptimizerSpec,
    "training": TrainingSpec,
    "eval": EvalSpec,
    "sample": SampleSpec,
    "sharding": ShardingSpec,
}
_Spec = TypeVar("_Spec")


def from_section(cls: type[_Spec], section: Mapping[str, Any]) -> _Spec:
    """The record ``cls`` of a config section (whose keys the config checks matched)."""
    return cls(**{f.name: section[f.name] for f in dataclasses.fields(cls)})
