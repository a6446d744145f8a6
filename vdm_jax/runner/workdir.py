"""A run's workdir: checked before any work, and the record of the config that made it.

``{workdir}/config.json`` holds the resolved config of the experiment that wrote the
workdir's checkpoints (every section's fields and the seed), written with the first
checkpoint. A run that resumes, evaluates or samples the workdir compares its own config
with it: a change to a field that defines the model, the objective or the data order is
refused, naming each such field with its old and new values; fields marked
:func:`vdm_jax.runner.specs.may_change` (lengths, intervals, evaluation and sampling settings, the
compute dtype, rematerialisation, the optimizer's step sizes) may change and are logged.

A record that cannot be read back (truncated, not JSON, not the record's shape) is never
overwritten silently: the run stops with one line naming the file and the two ways on
(restore it, or ``--config_record=rewrite``, which keeps the damaged file beside it, lists the
fields it can no longer check and writes the record anew from the run's config).
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
from jax.experimental import multihost_utils

from vdm_jax.runner.config_validation import ConfigError
from vdm_jax.runner.experiment import Experiment
from vdm_jax.runner.specs import SECTIONS

RECORD = "config.json"
# Where ``--config_record=rewrite`` keeps a damaged record.
DAMAGED_SUFFIX = ".damaged"


class WorkdirError(OSError):
    """The workdir cannot hold a run's outputs (not a directory, not writable)."""


class DamagedRecordError(WorkdirError):
    """A record the run reads back from the workdir cannot be read."""


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


def read_config_record(path: str) -> dict[str, Any]:
    """The record at ``path``, checked to be a JSON object of sections.

    Raises:
      DamagedRecordError: naming the file, what is wrong with it and the ways on.
    """
    try:
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
    except json.JSONDecodeError as e:
        if not e.doc.strip():
            problem = "empty"
        elif e.pos >= len(e.doc.rstrip()):
            problem = f"truncated: its JSON stops mid-record at byte {len(e.doc.encode())}"
        else:
            problem = f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
    except UnicodeDecodeError as e:
        problem = f"not text: {e.reason} at byte {e.start}"
    except OSError as e:
        problem = f"unreadable: {e.strerror or e}"
    else:
        if not isinstance(recorded, dict):
            problem = f"a JSON {type(recorded).__name__}, not an object"
        elif "seed" not in recorded:
            problem = "it has no seed"
        elif any(not isinstance(recorded.get(k, {}), dict) for k in SECTIONS):
            problem = "a section is not a JSON object"
        else:
            return recorded
    raise DamagedRecordError(
        f"{path} is damaged ({problem}); it records the config that wrote this workdir's "
        "checkpoints, which every run is checked against. Restore it from a copy, or run "
        "again with --config_record=rewrite to write it anew from this run's config (the "
        f"damaged file is kept as {RECORD}{DAMAGED_SUFFIX} and the fields that can no longer "
        "be checked are listed)"
    )


def _rewrite_config_record(exp: Experiment, workdir: str, error: DamagedRecordError) -> None:
    """``--config_record=rewrite``: lists what cannot be checked, keeps the damaged record
    as ``config.json.damaged`` and writes a new one from ``exp`` (process 0)."""
    path = os.path.join(workdir, RECORD)
    current = config_record(exp)
    unchecked = [f"config.seed={current['seed']!r}"]
    for section, records in exp.section_records().items():
        for record in records:
            for field in dataclasses.fields(record):
                if not field.metadata.get("may_change"):
                    value = current[section][field.name]
                    unchecked.append(f"config.{section}.{field.name}={value!r}")
    logging.warning(
        "%s\n--config_record=rewrite: these fields define the model, the objective or the "
        "data order and can no longer be checked against the run that wrote the checkpoints; "
        "they are taken from this run's config (a model that does not match the checkpoints "
        "will fail to restore them):\n  %s",
        error,
        "\n  ".join(unchecked),
    )
    if jax.process_index() == 0:
        os.replace(path, path + DAMAGED_SUFFIX)
        write_config_record(exp, workdir)
        logging.warning("Kept the damaged record as %s%s; wrote %s.", path, DAMAGED_SUFFIX, path)


def check_config_record(exp: Experiment, workdir: str, *, rewrite_damaged: bool = False) -> None:
    """Compares the experiment's config with the one that wrote ``workdir``.

    Nothing to compare when the workdir has no record.

    Args:
      exp: the experiment.
      workdir: the run's directory.
      rewrite_damaged: a damaged record is kept aside and written anew from ``exp``
        (``--config_record=rewrite``) instead of stopping the run.

    Raises:
      ConfigError: naming every changed field that must not change, old and new values.
      DamagedRecordError: the record cannot be read (and ``rewrite_damaged`` is False).
    """
    path = os.path.join(workdir, RECORD)
    if not os.path.exists(path):
        return
    try:
        recorded = read_config_record(path)
    except DamagedRecordError as e:
        if jax.process_count() > 1:  # Every process has read it before process 0 moves it.
            multihost_utils.sync_global_devices("vdm_jax read damaged config record")
        if not rewrite_damaged:
            raise
        _rewrite_config_record(exp, workdir, e)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("vdm_jax rewrote config record")
        return
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
