"""Two of the fourth digits default's models at its batches of 64, averaged: 1.69 test bpd.

Launch (the three modes in turn, as ``make digits`` does for the default; on a CPU host with
``XLA_FLAGS=--xla_force_host_platform_device_count=2`` for two simulated devices)::

  python -m experiments.main --config=configs/digits_ensemble.py \
      --workdir=workdir/digits_ensemble --mode=train   # then --mode=eval, --mode=sample

Measured on 2 CPU cores, on two simulated devices (each trains one member on the whole
batch): **1.6913 +- 0.0137 test bpd** (Monte Carlo 0.0040, 128 times per image), against
1.699 to 1.706 for one model; training 9.4 min at about 5.5 steps/s, evaluation 52 s and
sampling 21 s, 10 min 38 s for the three modes (one model, ``configs/digits_v4.py``: 5 min
6 s on the same host). The same two members trained for 2,000 steps read 1.7122: each member
needs its whole training. The default (``configs/digits.py``) trains its two members on
batches of 48, to fit its 10-minute budget.
"""

from __future__ import annotations

import ml_collections

from configs import digits_v4


def get_config() -> ml_collections.ConfigDict:
    """The fourth default with ``model.ensemble_size=2``: two score networks from their own
    initialisations, each trained on its own times and noise (the same batches), under one
    learned schedule; evaluation and sampling use the mean of their eps_hat."""
    config = digits_v4.get_config()
    config.model.ensemble_size = 2
    return config
