r"""Entry point: train, evaluate or sample a VDM from an ml_collections config.

  python -m experiments.main --config=configs/digits.py --workdir=workdir/digits --mode=train

Any config field can be overridden, e.g. ``--config.training.batch_size=64``. ``--mode=train``
resumes from the latest checkpoint in ``--workdir``. A multi-process run joins its peers
through ``jax.distributed.initialize``: from ``--coordinator_address``, ``--num_processes``
and ``--process_id``, or from the cluster's environment (SLURM, Open MPI, TPU pods, ...).
"""

from __future__ import annotations

import logging as std_logging

from absl import app, flags, logging
from ml_collections import config_flags

from vdm_jax import evaluate, experiment, sampling, sharding, train

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


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietCheckpointing())
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    exp = experiment.build(_CONFIG.value)
    MODES[_MODE.value](exp, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
