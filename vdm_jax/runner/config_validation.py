"""Checks an experiment config before any work: every bad value named with what is allowed.

:func:`validate` collects every problem it finds and raises one :class:`ConfigError` listing
them all, each as ``config.<field>=<value> <what is wrong> (allowed: ...)``, so a run never
starts (or fails an hour in) on a typo, a batch that does not split over the devices, or a
vocabulary that does not match the data. It looks up each registry name the config gives
once and returns the entries (:class:`Entries`); an entry's settings record checks the
fields it reads (a schedule's, an eval method's, the objective's :class:`vdm_jax.model.LossConfig`),
and the rules here are those between sections and registries, read from the entries'
declared properties, so a new entry needs no edit here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import ml_collections
import numpy as np

from vdm_jax import model, parameterizations, samplers, schedules, unet
from vdm_jax.runner import conditioning, data, eval_methods, specs
from vdm_jax.settings import ConfigError, Settings, is_int, is_number, unknown_name

__all__ = ["ConfigError", "Entries", "section_fields", "validate"]

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_Entry = TypeVar("_Entry")


def _numbers(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """``(dotted field, value)`` of every float in a nested config dict."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _numbers(value, f"{prefix}{key}.")
        elif isinstance(value, float):
            yield f"{prefix}{key}", value


@dataclasses.dataclass(frozen=True)
class Entries:
    """The registry entries a valid config names, looked up once, with their settings.

    Attributes:
      schedule: the ``model.schedule`` entry.
      schedule_settings: its record of ``config.model``.
      loss: the objective's settings (``config.model``, the vocabulary, the schedule's
        declared gradient split).
      eval_method: the ``eval.method`` entry.
      eval_settings: its record of ``config.eval``.
    """

    schedule: schedules.ScheduleKind
    schedule_settings: schedules.ScheduleSettings
    loss: model.LossConfig
    eval_method: eval_methods.EvalMethod
    eval_settings: eval_methods.EvalSettings


# The settings records of every entry of the registries whose names a section gives.
_SECTION_RECORDS: dict[str, Callable[[], list[type[Settings]]]] = {
    "model": lambda: [kind.settings for kind in schedules.SCHEDULES.values()],
    "eval": lambda: [method.settings for method in eval_methods.EVAL_METHODS.values()],
}


def section_fields(section: str) -> set[str]:
    """The keys of ``config.<section>``: its spec's fields and those of every registered
    entry's settings record (each entry reads its own)."""
    fields = {f.name for f in dataclasses.fields(specs.SECTIONS[section])}
    for record in _SECTION_RECORDS.get(section, list)():
        fields |= {f.name for f in dataclasses.fields(record)}
    return fields


def _check(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
    value = config
    for part in field.split("."):
        value = value[part]
    return value


def _choice(
    problems: list[str], config: ml_collections.ConfigDict, field: str, allowed: Sequence[str]
) -> None:
    problems.extend(unknown_name(field, _get(config, field), allowed))


def _entry(
    problems: list[str],
    config: ml_collections.ConfigDict,
    field: str,
    registry: Mapping[str, _Entry],
) -> _Entry | None:
    """The registry's entry that ``config.<field>`` names (None, and a problem, if none)."""
    _choice(problems, config, field, list(registry))
    return registry.get(_get(config, field))


def _record(problems: list[str], make: Callable[[], _Entry]) -> _Entry | None:
    """A settings record (None, and its problems, if its values are bad)."""
    try:
        return make()
    except ConfigError as e:
        problems.extend(e.problems)
        return None


def _range(
    problems: list[str],
    config: ml_collections.ConfigDict,
    field: str,
    test: Callable[[Any], bool],
    allowed: str,
) -> None:
    value = _get(config, field)
    ok = is_number(value) and test(value)
    _check(problems, ok, f"config.{field}={value!r} is out of range (allowed: {allowed})")


def _divisible(
    problems: list[str], config: ml_collections.ConfigDict, field: str, n: int, what: str
) -> None:
    value = _get(config, field)
    _check(
        problems,
        isinstance(value, int) and value > 0 and value % n == 0,
        f"config.{field}={value!r} must be a positive multiple of the {n} {what}",
    )


def validate(
    config: ml_collections.ConfigDict,
    *,
    num_devices: int,
    process_count: int,
    info: data.DatasetInfo | None = None,
) -> Entries:
    """The registry entries ``config`` names; raises :class:`ConfigError` naming every
    invalid field of it.

    Args:
      config: an experiment config (see ``configs/base.py``).
      num_devices: devices of the mesh the run uses, over all hosts.
      process_count: number of hosts (JAX processes).
      info: the dataset's facts, to check the vocabulary and labels against; None skips
        those checks (and the dataset's name is still checked).

    Returns:
      The entries and their settings records, each looked up and checked once.

    Raises:
      ConfigError: listing each bad field, its value and the allowed values.
    """
    problems: list[str] = []
    positive = "an integer >= 1"
    for section in specs.SECTIONS:
        fields = section_fields(section)
        given = set(config[section].keys()) if section in config else set()
        for field in sorted(given - fields):
            problems.append(
                f"config.{section}.{field} is not a field of config.{section} "
                f"(allowed: {sorted(fields)})"
            )
        for field in sorted(fields - given):
            problems.append(f"config.{section}.{field} is missing")
    for field, value in _numbers(config.to_dict()):
        _check(
            problems,
            math.isfinite(value) and abs(value) <= _FLOAT32_MAX,
            f"config.{field}={value!r} is not a finite float32 number (allowed: |value| <= "
            f"{_FLOAT32_MAX:.4g})",
        )
    if problems:  # Every check below reads the sections' fields.
        raise ConfigError.listing(problems)

    _range(problems, config, "seed", lambda v: isinstance(v, int) and 0 <= v < data.MAX_SEED,
           "an integer in [0, 2**32)")  # fmt: skip

    # Names chosen from registries: the schedule's and the eval method's are looked up once,
    # and their settings records check the fields they read.
    registries: dict[str, Any] = {
        "data.name": data.DATASETS,
        "model.attention": unet.ATTENTION_MODES,
        "model.dtype": specs.DTYPES,
        "model.conditioning": conditioning.CONDITIONINGS,
        "model.label_input": unet.LABEL_INPUTS,
        "model.parameterization": parameterizations.PARAMETERIZATIONS,
        "sample.sampler": samplers.SAMPLER_NAMES,
        "sample.decode": samplers.DECODERS,
    }
    for field, registry in registries.items():
        _choice(problems, config, field, list(registry))
    schedule = _entry(problems, config, "model.schedule", schedules.SCHEDULES)
    method = _entry(problems, config, "eval.method", eval_methods.EVAL_METHODS)
    m = config.model
    schedule_settings = None
    if schedule is not None:
        schedule_settings = _record(problems, lambda: schedule.settings.from_section(m))
    loss = _record(
        problems,
        lambda: model.LossConfig(
            vocab_size=config.data.vocab_size,
            timesteps=m.timesteps,
            antithetic_time=m.antithetic_time,
            schedule_grad=m.schedule_grad,
            weighting=m.weighting,
            weighting_bias=m.weighting_bias,
            adaptive_time=m.adaptive_time,
            variance_params=frozenset() if schedule is None else schedule.variance_params,
            per_dimension=schedule is not None and schedule.per_dimension,
        ),
    )
    eval_settings = None
    if method is not None:
        eval_settings = _record(problems, lambda: method.settings.from_section(config.eval))

    latent_dim = m.latent_dim
    _range(problems, config, "model.latent_dim", lambda v: is_int(v) and v >= 0,
           "an integer >= 0 (0: no auxiliary latent)")  # fmt: skip
    adaptive = is_int(latent_dim) and latent_dim > 0
    if schedule is not None:
        per_dim_names = sorted(k for k, v in schedules.SCHEDULES.items() if v.per_dimension)
        _check(
            problems,
            not adaptive or schedule.per_dimension,
            f"config.model.latent_dim={latent_dim!r} adapts the schedule to the input, which "
            f"only a per-dimension schedule can use; config.model.schedule={m.schedule!r} "
            f"is scalar (allowed: {per_dim_names})",
        )
    if known_param := parameterizations.PARAMETERIZATIONS.get(m.parameterization):
        _check(
            problems,
            not (known_param.needs_vocab and m.add_z_to_eps),
            f"config.model.parameterization={m.parameterization!r} outputs a "
            "distribution over the data's values, to which config.model.add_z_to_eps=True "
            "cannot add z (allowed: add_z_to_eps False, or parameterization 'eps', 'x' or 'v')",
        )

    # Batches split evenly over hosts and devices (devices is a multiple of hosts).
    for field in ("training.batch_size", "eval.batch_size", "sample.batch_size"):
        _divisible(problems, config, field, num_devices, "devices")
        if num_devices % process_count:
            _divisible(problems, config, field, process_count, "processes")

    # The state's layout: F devices per copy, F dividing the devices.
    fsdp = config.sharding.fsdp
    _check(
        problems,
        isinstance(fsdp, int) and (fsdp == -1 or (fsdp >= 1 and num_devices % fsdp == 0)),
        f"config.sharding.fsdp={fsdp!r} must divide the {num_devices} devices (allowed: -1 "
        f"(all), or one of {[d for d in range(1, num_devices + 1) if num_devices % d == 0]})",
    )
    _range(problems, config, "sharding.min_shard_bytes", lambda v: isinstance(v, int) and v >= 0,
           "an integer >= 0")  # fmt: skip

    # An ensemble's members train independently and side by side.
    members = config.model.ensemble_size
    _range(problems, config, "model.ensemble_size", lambda v: isinstance(v, int) and v >= 1,
           "an integer >= 1 (1: one score network)")  # fmt: skip
    if isinstance(members, int) and members > 1:
        _check(
            problems,
            fsdp == 1,
            f"config.sharding.fsdp={fsdp!r}: an ensemble (config.model.ensemble_size={members}) "
            "keeps each member whole on its devices (allowed: 1)",
        )
        _check(
            problems,
            config.optimizer.grad_clip_norm == 0,
            f"config.optimizer.grad_clip_norm={config.optimizer.grad_clip_norm!r}: a global "
            f"norm over an ensemble (config.model.ensemble_size={members}) would couple its "
            "members' updates (allowed: 0)",
        )

    # Step counts and intervals.
    for field in (
        "training.num_steps",
        "training.log_every",
        "training.eval_every",
        "training.sample_every",
        "training.checkpoint_every",
        "training.max_to_keep",
        "model.min_group_size",
        "sample.num_samples",
        "sample.num_steps",
        "model.num_blocks",
        "model.channels",
        "model.num_groups",
    ):
        _range(problems, config, field, lambda v: isinstance(v, int) and v >= 1, positive)
    timesteps, sample_steps = m.timesteps, config.sample.num_steps
    discrete = is_int(timesteps) and timesteps > 0
    _check(
        problems,
        not discrete or sample_steps == timesteps,
        f"config.sample.num_steps={sample_steps!r} must equal config.model.timesteps="
        f"{timesteps} for a discrete-time model (allowed: {timesteps})",
    )

    if method is not None:
        methods = eval_methods.EVAL_METHODS
        discrete_ok = sorted(k for k, v in methods.items() if not v.continuous_only)
        _check(
            problems,
            not (method.continuous_only and discrete),
            f"config.eval.method={config.eval.method!r} needs a continuous-time model, and "
            f"config.model.timesteps={timesteps} (allowed: {discrete_ok})",
        )
    if eval_settings is not None:
        _check(
            problems,
            not (adaptive and not eval_settings.per_example_fns()),
            f"config.eval.method={config.eval.method!r} with these settings evaluates "
            f"copies of each image, and an input-adaptive model (config.model.latent_dim="
            f"{latent_dim}) draws one latent per image: use one draw "
            "(config.eval.ode_dequant_samples=1) or an ELBO method",
        )

    # Model and optimizer values.
    _range(problems, config, "model.dropout_rate", lambda v: 0 <= v < 1, "[0, 1)")
    _check(
        problems,
        config.model.fourier_min_exp <= config.model.fourier_max_exp,
        f"config.model.fourier_min_exp={config.model.fourier_min_exp!r} must be <= "
        f"config.model.fourier_max_exp={config.model.fourier_max_exp!r}",
    )
    _range(problems, config, "sample.ode_tolerance", lambda v: v > 0, "a number > 0")
    _range(problems, config, "optimizer.learning_rate", lambda v: v > 0, "a number > 0")
    _range(problems, config, "optimizer.warmup_steps", lambda v: isinstance(v, int) and v >= 0,
           "an integer >= 0")  # fmt: skip
    _range(problems, config, "optimizer.decay_steps", lambda v: isinstance(v, int) and v >= 0,
           "an integer >= 0 (0: no decay)")  # fmt: skip
    _range(problems, config, "optimizer.b1", lambda v: 0 <= v < 1, "[0, 1)")
    _range(problems, config, "optimizer.b2", lambda v: 0 <= v < 1, "[0, 1)")
    _range(problems, config, "optimizer.eps", lambda v: v > 0, "a number > 0")
    _range(problems, config, "optimizer.weight_decay", lambda v: v >= 0, "a number >= 0")
    _range(problems, config, "optimizer.grad_clip_norm", lambda v: v >= 0,
           "a number >= 0 (0 disables clipping)")  # fmt: skip
    _range(problems, config, "optimizer.ema_rate", lambda v: 0 <= v < 1, "[0, 1)")

    # Conditioning and augmentation agree.
    name, augment = config.model.conditioning, config.data.augment
    cond = conditioning.CONDITIONINGS.get(name)
    if cond is not None:
        fitting = sorted(
            k for k, c in conditioning.CONDITIONINGS.items() if c.augment in (None, bool(augment))
        )
        _check(
            problems,
            cond.augment in (None, bool(augment)),
            f"config.model.conditioning={name!r} does not fit config.data.augment={augment} "
            f"(allowed: {fitting})",
        )

    if info is not None:
        _check(
            problems,
            config.data.vocab_size == info.vocab_size,
            f"config.data.vocab_size={config.data.vocab_size!r} does not match dataset "
            f"{info.name!r} (allowed: {info.vocab_size})",
        )
        _check(
            problems,
            cond is None or not cond.needs_dataset_labels or info.num_classes > 0,
            f"config.model.conditioning={name!r} needs labels, and dataset {info.name!r} has "
            "none (allowed: 'none')",
        )
        _check(
            problems,
            not augment or info.shape[0] == info.shape[1],
            f"config.data.augment=True needs square images, dataset {info.name!r} has "
            f"{info.shape} (allowed: False)",
        )

    if problems:
        raise ConfigError.listing(problems)
    return Entries(schedule, schedule_settings, loss, method, eval_settings)
