r"""Entry point: train, evaluate or sample a VDM from an ml_collections config.

  python -m experiments.main --config=configs/digits.py --workdir=workdir/digits --mode=train

Any config field can be overridden, e.g. ``--config.training.batch_size=64``. ``--mode=train``
resumes from the latest checkpoint in ``--workdir``. A multi-process run joins its peers
through ``jax.distributed.initialize``: from ``--coordinator_address``, ``--num_processes``
and ``--process_id``, or from the cluster's environment (SLURM, Open MPI, TPU pods, ...).
"""

from __future__ import annotations

import errno
import logging as std_logging
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from vdm_jax.runner import (
    config_validation,
    evaluate,
    experiment,
    preemption,
    sampling,
    sharding,
    train,
    workdir,
)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "What to run.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process.")
_CONFIG_RECORD = flags.DEFINE_enum(
    "config_record",
    "check",
    ["check", "rewrite"],
    "check: compare the config with the workdir's config.json and stop if that record is "
    "damaged; rewrite: a damaged record is kept as config.json.damaged and written anew "
    "from this run's config, listing the fields that can no longer be checked.",
)
flags.mark_flags_as_required(["config", "workdir"])

MODES = {
    "train": train.train_and_evaluate,
    "eval": evaluate.run_eval,
    "sample": sampling.run_sample,
}


class _QuietCheckpointing(std_logging.Filter):
    """Drops orbax's per-save INFO lines (dozens per checkpoint); keeps its warnings."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with an override of a config field that does not exist named in
    one line (ml_collections raises ``AttributeError(KeyError("'name'\\nDid you mean ..."))``
    for it, whose ``str`` is the repr of a repr: quotes escaped, the newline a literal ``\\n``).
    """
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        sys.exit(unknown_field_message(e, argv))


def unknown_field_message(error: BaseException, argv: list[str]) -> str:
    """``FATAL: config.a.b is not a config field; did you mean config.a.c? (...)``: one line.

    Args:
      error: what ml_collections raised for the override (possibly wrapping a KeyError).
      argv: the command line, to name the whole dotted field that was given.
    """
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = str(error.args[0]) if error.args else str(error)
    first, *rest = text.splitlines() or [""]
    name = first.strip("\"'")
    close = re.search(r'Did you mean "([^"]+)"', " ".join(rest))
    given = [a.split("=")[0][2:] for a in argv if a.startswith("--config.")]
    parts = next((g.split(".") for g in given if name in g.split(".")[1:]), ["config", name])
    field = ".".join(parts)
    hint = ""
    if close:
        at = parts.index(name, 1)
        hint = f"; did you mean {'.'.join([*parts[:at], close.group(1)])}?"
    return f"FATAL: {field} is not a config field{hint} (every field is listed in configs/base.py)"


# Errors whose message says everything: one line, no traceback.
CLEAR_ERRORS = (
    config_validation.ConfigError,
    workdir.WorkdirError,
    FileNotFoundError,
    FloatingPointError,
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietCheckpointing())
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    try:
        exp = experiment.build(_CONFIG.value)
        rewrite = _CONFIG_RECORD.value == "rewrite"
        MODES[_MODE.value](exp, _WORKDIR.value, rewrite_config_record=rewrite)
        if preemption.work_left_behind():  # Preempted during an evaluation's compilation.
            _leave(0)
    except preemption.Interrupted:
        logging.warning("Preempted before a new step finished; nothing written.")
        _leave(0)  # A compilation may still run in a worker thread.
    except CLEAR_ERRORS as e:
        logging.error("%s: %s", type(e).__name__, e)
        _leave(1)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        logging.error("%s", e)
        _leave(1)  # Orbax's pending writes would each print a traceback at shutdown.


def _leave(status: int) -> None:
    """Exits at once, without the interpreter's shutdown (threads may still be working)."""
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
