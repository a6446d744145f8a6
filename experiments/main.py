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
    one line (ml_collections raises a bare ``AttributeError: "'name'"`` for it)."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        name = str(e).strip("\"'")
        given = [a.split("=")[0] for a in argv if a.startswith("--config.")]
        fields = [g[2:] for g in given if g.split(".")[-1] == name or f".{name}." in g]
        field = fields[0] if fields else name
        sys.exit(f"FATAL: {field} is not a config field (every field is listed in configs/base.py)")


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
        MODES[_MODE.value](exp, _WORKDIR.value)
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
