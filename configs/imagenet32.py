"""Downsampled ImageNet 32x32 (VDM paper, Table 1: 3.72 bpd on the validation set).

Launch (TFDS ``downsampled_imagenet/32x32`` must be prepared in the TFDS data directory)::

  python -m experiments.main --config=configs/imagenet32.py --workdir=workdir/imagenet32 \
      --mode=train

Expect about 3.72 validation bpd after a paper-length run (no public checkpoint). Same
U-Net as CIFAR-10, without dropout (ImageNet is large enough not to overfit).
"""

from __future__ import annotations

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """The CIFAR-10 model on ImageNet 32x32, without dropout."""
    config = base.get_config()
    config.data.name = "imagenet32"
    config.model.dropout_rate = 0.0
    config.eval.batch_size = 512
    return config
