"""A tiny config for tests and laptops: a few steps of a very small U-Net on the digits.

Launch (seconds on a CPU)::

  python -m experiments.main --config=configs/test.py --workdir=/tmp/vdm_test --mode=train

Checks plumbing only: the bpd after 4 steps is far from a trained model's.
"""

from __future__ import annotations

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """The digits model family of ``configs/digits.py:v4`` (one discretised-logistic network,
    adaptive training times, the importance-sampled ELBO) shrunk to a 1-block, 16-channel
    U-Net and a handful of steps. Tests that need an ensemble ask for one."""
    config = base.get_config()
    config.data.name = "digits"
    config.data.vocab_size = 17

    config.model.num_blocks = 1
    config.model.channels = 16
    config.model.num_groups = 4
    config.model.dropout_rate = 0.0
    config.model.fourier_min_exp = 2
    config.model.fourier_max_exp = 4
    config.model.schedule_width = 16
    config.model.parameterization = "discretized_logistic"
    config.model.adaptive_time = True

    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 200
    config.optimizer.ema_rate = 0.998
    config.training.batch_size = 16
    config.training.num_steps = 4
    config.training.log_every = 2
    config.training.eval_every = 4
    config.training.sample_every = 4
    config.training.checkpoint_every = 2

    config.eval.method = "elbo_importance"
    config.eval.batch_size = 64
    config.eval.num_time_samples = 16
    config.sample.num_samples = 16
    config.sample.batch_size = 16
    config.sample.num_steps = 8
    return config
