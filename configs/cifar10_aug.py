"""CIFAR-10 with random dihedral (D4) augmentations, conditioned on the augmentation index.

As in the VDM paper (Table 1: 2.49 bpd with augmentation). Each training image is flipped
and/or rotated by one of the 8 elements of D4 and the model is told which (an 8-way label
embedding); evaluation and sampling condition on the identity (index 0).

Reads TFDS ``cifar10`` 3.0.2, prepared once with ``python -m experiments.prepare_data
cifar10``; docs/reproduce.md has the whole recipe.

Launch::

  python -m experiments.main --config=configs/cifar10_aug.py --workdir=workdir/cifar10_aug \
      --mode=train

Expect about 2.49 test bpd after the paper's schedule (reference checkpoint: 2.522).
"""

from __future__ import annotations

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """CIFAR-10 with augmentation and augmentation conditioning."""
    config = base.get_config()
    config.data.name = "cifar10"
    config.data.augment = True
    config.model.conditioning = "augmentation"
    return config
