"""Downsampled ImageNet 32x32 (VDM paper, Table 1: 3.72 bpd on the validation set).

Reads TFDS ``downsampled_imagenet/32x32`` (data name ``imagenet32``): the original
downsampled ImageNet of van den Oord et al. (2016), 1,281,149 train / 49,999 validation
images, which VDM's 3.72 and MuLAN's ImageNet 32 figure are measured on. That set is no
longer served by image-net.org; later papers report on the re-release of Chrabaszcz et al.
(2017), which ``configs/imagenet32.py:resized`` reads (data name ``imagenet32_resized``,
TFDS ``imagenet_resized/32x32``, 1,281,167 / 50,000 images). Numbers on the two are not
comparable: i-DODE (Zheng et al. 2023) reads 3.69 on the original and 3.43 on the re-release
for one model. docs/reproduce.md has both preparations.

Launch (after ``python -m experiments.prepare_data imagenet32 --manual_dir=DIR``)::

  python -m experiments.main --config=configs/imagenet32.py --workdir=workdir/imagenet32 \
      --mode=train

Expect about 3.72 validation bpd after a paper-length run (no public checkpoint). Same
U-Net as CIFAR-10, without dropout (ImageNet is large enough not to overfit).

Variants:
  resized: the Chrabaszcz et al. (2017) re-release (``imagenet32_resized``); compare with
    papers that report on it, not with VDM's 3.72 bpd.
"""

from __future__ import annotations

import ml_collections

from configs import base

# Variants (``--config=configs/imagenet32.py:VARIANT``): the dataset each reads.
VARIANTS = {"": "imagenet32", "resized": "imagenet32_resized"}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The CIFAR-10 model on ImageNet 32x32, without dropout; ``variant`` "resized" reads
    the Chrabaszcz et al. (2017) re-release instead of the original set."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of imagenet32; allowed: {list(VARIANTS)}")
    config = base.get_config()
    config.data.name = VARIANTS[variant]
    config.model.dropout_rate = 0.0
    config.eval.batch_size = 512
    return config
