"""A tiny config for tests and laptops: a few steps of a very small U-Net on the digits.

Launch (seconds on a CPU)::

  python -m experiments.main --config=configs/test.py --workdir=/tmp/vdm_test --mode=train

Checks plumbing only: the bpd after 4 steps is far from a trained model's.
"""

from __future__ import annotations

import ml_collections

from configs import digits_v4


def get_config() -> ml_collections.ConfigDict:
    """The fourth digits default (one network; the default trains two) shrunk to a 1-block,
    16-channel U-Net and a handful of steps. Tests that need an ensemble ask for one."""
    config = digits_v4.get_config()
    config.model.schedule_width = 16
    config.model.num_blocks = 1
    config.model.channels = 16
    config.model.num_groups = 4
    config.training.batch_size = 16
    config.training.num_steps = 4
    config.training.log_every = 2
    config.training.eval_every = 4
    config.training.sample_every = 4
    config.training.checkpoint_every = 2
    config.eval.batch_size = 64
    config.eval.num_time_samples = 16
    config.sample.num_samples = 16
    config.sample.batch_size = 16
    config.sample.num_steps = 8
    return config
