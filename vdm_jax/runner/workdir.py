"""A run's workdir: checked before any work, and the record of the config that made it.

``{workdir}/config.json`` holds the resolved config of the experiment that wrote the
workdir's checkpoints (every section's fields and the seed), written with the first
checkpoint. A run that resumes, evaluates or samples the workdir compares its own config
with it: a change to a field that defines the model, the objective or the data order is
refused, naming each such field with its old and new values; fields marked
:func:`vdm_jax.runner.specs.may_change` (lengths, intervals, evaluation and sampling settings, the
compute dtype, rematerialisation, the optimizer's step sizes) may change and are logged.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import tempfile
from typing import Any

import jax
from absl import logging

from vdm_jax.runner.config_validation import ConfigError
from vdm_jax.runner.experiment import Experiment

RECORD = "config.json"


class WorkdirError(OSError):
    """The workdir cannot hold a run's outputs (not a directory, not writable)."""


def prepare(workdir: str, *, create: bool) -> None:
    """Checks that ``workdir`` can take a run's outputs, before any work.

    Args:
      workdir: the run's directory.
      create: make it if it does not exist (training); otherwise it must exist.

    Raises:
      WorkdirError: if it is a file, is missing (``create=False``) or is not writable.
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"workdir {workdir!r} is a file, not a directory")
    if create:
        try:
            os.makedirs(workdir, exist_ok=True)
        except OSError as e:
            raise WorkdirError(f"cannot create workdir {workdir!r}: {e}") from e
    elif not os.path.isdir(workdir):
        raise WorkdirError(f"workdir {workdir!r} does not exist; run --mode=train first")
    try:
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise WorkdirError(f"workdir {workdir!r} is not writable: {e}") from e


def check_free_space(workdir: str, checkpoint_bytes: int) -> None:
    """Refuses to start when the workdir's disk cannot take one more checkpoint.

    Raises:
      WorkdirError: (errno ENOSPC) naming the free and the needed space.
    """
    free = shutil.disk_usage(workdir).free
    if free < checkpoint_bytes:
        raise WorkdirError(
            errno.ENOSPC,
            f"No space left on device: {workdir} has {free / 2**20:.2f} MiB free, and a "
            f"checkpoint of this model takes about {checkpoint_bytes / 2**20:.2f} MiB",
        )


def config_record(exp: Experiment) -> dict[str, Any]:
    """The experiment's config as JSON values: ``{"seed", "data", "model", ...}``."""
    record: dict[str, Any] = {"seed": exp.seed}
    for section, records in exp.section_records().items():
        record[section] = {k: v for r in records for k, v in dataclasses.asdict(r).items()}
    return json.loads(json.dumps(record))  # As it reads back (tuples as lists).


def write_config_record(exp: Experiment, workdir: str) -> None:
    """Writes ``{workdir}/config.json`` (process 0) unless the workdir has one already."""
    path = os.path.join(workdir, RECORD)
    if jax.process_index() != 0 or os.path.exists(path):
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(config_record(exp), f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def check_config_record(exp: Experiment, workdir: str) -> None:
    """Compares the experiment's config with the one that wrote ``workdir``.

    Nothing to compare when the workdir has no record, or when the experiment evaluates a
    released reference checkpoint (whose model is not the workdir's).

    Raises:
      ConfigError: naming every changed field that must not change, old and new values.
    """
    path = os.path.join(workdir, RECORD)
    if exp.eval.reference_checkpoint or not os.path.exists(path):
        return
    with open(path) as f:
        recorded = json.load(f)
    current = config_record(exp)
    refused, allowed = [], []
    if recorded.get("seed") != current["seed"]:
        refused.append(f"config.seed: {recorded.get('seed')!r} -> {current['seed']!r}")
    for section, records in exp.section_records().items():
        fields = {f.name: f for r in reversed(records) for f in dataclasses.fields(r)}
        for field in fields.values():  # a field that several records read: the spec's
            before = field.metadata.get("before", "<not recorded>")
            old = recorded.get(section, {}).get(field.name, before)
            new = current[section][field.name]
            if old != new:
                change = f"config.{section}.{field.name}: {old!r} -> {new!r}"
                (allowed if field.metadata.get("may_change") else refused).append(change)
    if refused:
        raise ConfigError(
            f"the config differs from the one that wrote {workdir} ({path}) in fields that "
            "define the model, the objective or the data order:\n  "
            + "\n  ".join(refused)
            + "\nUse a new workdir for a different experiment."
        )
    if allowed:
        logging.info("Config changes against %s (allowed): %s", path, "; ".join(allowed))
