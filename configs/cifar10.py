"""CIFAR-10 without augmentation, as in the VDM paper (Table 1: 2.65 bpd on the test set).

Reads TFDS ``cifar10`` 3.0.2 (50,000 train / 10,000 test images), prepared once with
``python -m experiments.prepare_data cifar10``; docs/reproduce.md has the whole recipe.

Launch::

  python -m experiments.main --config=configs/cifar10.py --workdir=workdir/cifar10 --mode=train

Expect about 2.65 test bpd after the paper's 10M steps at batch 128 (the released reference
checkpoint evaluates to 2.637). The U-Net has 30.6M parameters.
"""

from __future__ import annotations

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """The base config is the paper's CIFAR-10 setting."""
    config = base.get_config()
    config.data.name = "cifar10"
    return config
