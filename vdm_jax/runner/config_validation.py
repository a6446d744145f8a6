"""Checks an experiment config before any work: every bad value named with what is allowed.

:func:`validate` collects every problem it finds and raises one :class:`ConfigError` listing
them all, each as ``config.<field>=<value> <what is wrong> (allowed: ...)``, so a run never
starts (or fails an hour in) on a typo, a batch that does not split over the devices, or a
vocabulary that does not match the data. Allowed names and the rules between fields come
from the registries' declared properties (schedules, conditionings, eval methods, samplers,
ODE solvers' settings), so a new entry needs no edit here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np

from vdm_jax import model, ode_likelihood, parameterizations, samplers, schedules, unet, weightings
from vdm_jax.runner import conditioning, data, eval_methods, specs

_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _numbers(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """``(dotted field, value)`` of every float in a nested config dict."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _numbers(value, f"{prefix}{key}.")
        elif isinstance(value, float):
            yield f"{prefix}{key}", value


class ConfigError(ValueError):
    """A config value that cannot run; the message names every bad field."""


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
    value = _get(config, field)
    _check(
        problems,
        value in allowed,
        f"config.{field}={value!r} is not a known name (allowed: {sorted(allowed)})",
    )


def _range(
    problems: list[str],
    config: ml_collections.ConfigDict,
    field: str,
    test: Callable[[Any], bool],
    allowed: str,
) -> None:
    value = _get(config, field)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and test(value)
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
) -> None:
    """Raises :class:`ConfigError` naming every invalid field of ``config``.

    Args:
      config: an experiment config (see ``configs/base.py``).
      num_devices: devices of the mesh the run uses, over all hosts.
      process_count: number of hosts (JAX processes).
      info: the dataset's facts, to check the vocabulary and labels against; None skips
        those checks (and the dataset's name is still checked).

    Raises:
      ConfigError: listing each bad field, its value and the allowed values.
    """
    problems: list[str] = []
    positive = "an integer >= 1"
    for section, spec in specs.SECTIONS.items():
        fields = {f.name for f in dataclasses.fields(spec)}
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
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))

    _range(problems, config, "seed", lambda v: isinstance(v, int) and 0 <= v < data.MAX_SEED,
           "an integer in [0, 2**32)")  # fmt: skip

    # Names chosen from registries.
    registries: dict[str, Any] = {
        "data.name": data.DATASETS,
        "model.schedule": schedules.SCHEDULES,
        "model.schedule_grad": model.SCHEDULE_GRADS,
        "model.attention": unet.ATTENTION_MODES,
        "model.dtype": specs.DTYPES,
        "model.conditioning": conditioning.CONDITIONINGS,
        "model.label_input": unet.LABEL_INPUTS,
        "model.parameterization": parameterizations.PARAMETERIZATIONS,
        "model.weighting": weightings.WEIGHTINGS,
        "eval.method": eval_methods.EVAL_METHODS,
        "eval.ode_divergence": ode_likelihood.DIVERGENCES,
        "eval.ode_dequantization": ode_likelihood.DEQUANTIZATIONS,
        "sample.sampler": samplers.SAMPLER_NAMES,
        "sample.decode": samplers.DECODERS,
    }
    for field, registry in registries.items():
        _choice(problems, config, field, list(registry))
    known = {field: _get(config, field) in registry for field, registry in registries.items()}

    if known["model.schedule"]:
        kind = schedules.SCHEDULES[config.model.schedule]
        _check(
            problems,
            kind.splits_endpoints or config.model.schedule_grad != "variance",
            "config.model.schedule_grad='variance' needs a schedule with endpoint parameters; "
            f"config.model.schedule={config.model.schedule!r} has none (allowed: 'elbo')",
        )
        per_dim = kind.per_dimension
        _check(
            problems,
            not per_dim or config.model.weighting == "elbo",
            f"config.model.weighting={config.model.weighting!r}: a per-dimension schedule's "
            f"paths change the bound, so config.model.schedule={config.model.schedule!r} "
            "trains on the ELBO (allowed: 'elbo')",
        )
        latent_dim = config.model.latent_dim
        _range(problems, config, "model.latent_dim", lambda v: isinstance(v, int) and v >= 0,
               "an integer >= 0 (0: no auxiliary latent)")  # fmt: skip
        per_dim_names = sorted(k for k, v in schedules.SCHEDULES.items() if v.per_dimension)
        _check(
            problems,
            not (isinstance(latent_dim, int) and latent_dim > 0) or per_dim,
            f"config.model.latent_dim={latent_dim!r} adapts the schedule to the input, which "
            f"only a per-dimension schedule can use; config.model.schedule="
            f"{config.model.schedule!r} is scalar (allowed: {per_dim_names})",
        )
    _choice(problems, config, "model.schedule_per", list(specs.SCHEDULE_PER))
    if known["model.parameterization"]:
        param = parameterizations.PARAMETERIZATIONS[config.model.parameterization]
        _check(
            problems,
            not (param.needs_vocab and config.model.add_z_to_eps),
            f"config.model.parameterization={config.model.parameterization!r} outputs a "
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
        "eval.num_time_samples",
        "eval.ode_dequant_samples",
        "model.min_group_size",
        "sample.num_samples",
        "sample.num_steps",
        "model.schedule_width",
        "model.num_blocks",
        "model.channels",
        "model.num_groups",
    ):
        _range(problems, config, field, lambda v: isinstance(v, int) and v >= 1, positive)
    _range(problems, config, "model.timesteps", lambda v: isinstance(v, int) and v >= 0,
           "0 (continuous time) or an integer T >= 1")  # fmt: skip
    timesteps, sample_steps = config.model.timesteps, config.sample.num_steps
    _check(
        problems,
        not (config.model.adaptive_time and isinstance(timesteps, int) and timesteps > 0),
        f"config.model.adaptive_time=True needs continuous time, and config.model.timesteps="
        f"{timesteps} (allowed: timesteps 0, or adaptive_time False)",
    )
    _check(
        problems,
        not (isinstance(timesteps, int) and timesteps > 0) or sample_steps == timesteps,
        f"config.sample.num_steps={sample_steps!r} must equal config.model.timesteps="
        f"{timesteps} for a discrete-time model (allowed: {timesteps})",
    )

    if known["eval.method"]:
        method = eval_methods.EVAL_METHODS[config.eval.method]
        methods = eval_methods.EVAL_METHODS
        discrete_ok = sorted(k for k, m in methods.items() if not m.continuous_only)
        _check(
            problems,
            not (method.continuous_only and timesteps),
            f"config.eval.method={config.eval.method!r} needs a continuous-time model, and "
            f"config.model.timesteps={timesteps} (allowed: {discrete_ok})",
        )
        counts = (config.eval.num_time_samples, config.eval.ode_dequant_samples)
        if all(isinstance(v, int) for v in counts):
            settings = specs.from_section(specs.EvalSpec, config.eval)
            problems.extend(method.check(settings))
            _check(
                problems,
                not (config.model.latent_dim and not method.per_example_fns(settings)),
                f"config.eval.method={config.eval.method!r} with these settings evaluates "
                f"copies of each image, and an input-adaptive model (config.model.latent_dim="
                f"{config.model.latent_dim}) draws one latent per image: use one draw "
                "(config.eval.ode_dequant_samples=1) or an ELBO method",
            )
    for field in ("eval.ode_rtol", "eval.ode_atol"):
        _range(problems, config, field, lambda v: v > 0, "a number > 0")

    # Model and optimizer values.
    _check(
        problems,
        config.model.gamma_min < config.model.gamma_max,
        f"config.model.gamma_min={config.model.gamma_min!r} must be below "
        f"config.model.gamma_max={config.model.gamma_max!r}",
    )
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
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
