r"""Imports a released google-research/vdm checkpoint, once, into a new workdir.

  python -m experiments.import_reference CKPT WORKDIR --config=configs/cifar10.py:reference

CKPT is a reference checkpoint directory (``checkpoints-0``, copied with ``gsutil -m cp -r``),
a ``ckpt-N`` prefix or its ``.flax`` file. WORKDIR (absent or empty) then holds the config
record and an orbax checkpoint at the reference's step, parameters and EMA parameters as the
reference trained them, so that ``experiments.main`` evaluates, samples and resumes training
it like any of its own runs, given the same ``--config``::

  python -m experiments.main --config=configs/cifar10.py:reference --workdir=WORKDIR --mode=eval

Resuming training starts Adam's moments and the learning-rate warmup afresh (the reference's
optimizer state is not converted). The config's model must be the checkpoint's: if it is
not, the import names the ``--config.model`` flags that would make it so.
"""

from __future__ import annotations

import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from vdm_jax.runner import config_validation, reference, workdir

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config whose model is the checkpoint's."
)
flags.mark_flags_as_required(["config"])

# Errors whose message says everything: one line, no traceback.
CLEAR_ERRORS = (
    config_validation.ConfigError,
    workdir.WorkdirError,
    reference.ReferenceCheckpointError,
    FileNotFoundError,
)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with an override of a config field that does not exist named in
    one line (ml_collections raises a bare ``AttributeError`` for it)."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        sys.exit(f"FATAL: {e} is not a config field (every field is listed in configs/base.py)")


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        raise app.UsageError(f"expected CKPT and WORKDIR, got {argv[1:]}")
    ckpt, target = argv[1:]
    # Orbax logs each step of a save; its warnings stay.
    logging.get_absl_handler().addFilter(
        lambda record: record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname
    )
    try:
        step = reference.import_checkpoint(ckpt, _CONFIG.value, target)
    except CLEAR_ERRORS as e:
        logging.error("%s: %s", type(e).__name__, e)
        sys.exit(1)
    config_args = " ".join(a for a in sys.argv[1:] if a.startswith("--config"))
    print(
        f"Imported step {step} of {ckpt} into {target}. Evaluate it with:\n  python -m "
        f"experiments.main {config_args} --workdir={target} --mode=eval"
    )


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
