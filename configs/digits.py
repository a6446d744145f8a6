"""The embedded default job: scikit-learn's 8x8 handwritten digits (K = 17), any machine.

Launch (no data to download; the three modes in turn, as ``make digits`` does)::

  python -m experiments.main --config=configs/digits.py --workdir=workdir/digits --mode=train
  python -m experiments.main --config=configs/digits.py --workdir=workdir/digits --mode=eval
  python -m experiments.main --config=configs/digits.py --workdir=workdir/digits --mode=sample

Expect TBD test bpd on the 297 held-out digits (an independent per-pixel categorical model
scores about 2.42, a full-covariance Gaussian about 2.94).
"""

from __future__ import annotations

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """A small U-Net trained for a few thousand steps on the digits."""
    config = base.get_config()
    config.data.name = "digits"
    config.data.vocab_size = 17
    config.model.schedule_width = 256
    config.model.num_blocks = 8
    config.model.channels = 64
    config.model.dropout_rate = 0.1
    config.model.fourier_min_exp = 2
    config.model.fourier_max_exp = 4
    config.optimizer.learning_rate = 1e-3
    config.optimizer.ema_rate = 0.999
    config.training.batch_size = 64
    config.training.num_steps = 3000
    config.training.log_every = 100
    config.training.eval_every = 1000
    config.training.sample_every = 3000
    config.training.checkpoint_every = 500
    config.eval.batch_size = 128
    config.eval.num_time_samples = 4
    config.sample.num_samples = 64
    config.sample.batch_size = 64
    config.sample.num_steps = 200
    return config
