"""Downsampled ImageNet 64x64 (VDM paper, Table 1: 3.40 bpd on the validation set).

Reads TFDS ``downsampled_imagenet/64x64`` (data name ``imagenet64``): the original
downsampled ImageNet of van den Oord et al. (2016), on which VDM's 3.40 is measured;
``configs/imagenet64.py:resized`` reads the Chrabaszcz et al. (2017) re-release (data name
``imagenet64_resized``, TFDS ``imagenet_resized/64x64``), on which later papers report and
whose numbers are not comparable with the original's (see ``configs/imagenet32.py``).

Launch on a multi-host GPU/TPU cluster (after ``python -m experiments.prepare_data
imagenet64 --manual_dir=DIR``)::

  python -m experiments.main --config=configs/imagenet64.py --workdir=gs://BUCKET/imagenet64 \
      --mode=train

Expect about 3.40 validation bpd after a paper-length run (no public checkpoint). The U-Net
has 64 blocks of 256 channels (237.6M parameters), no dropout; bfloat16 compute and
rematerialisation keep its activations in memory at 64x64. The train state (3.5 GiB) is
replicated; ``--config.sharding.fsdp=-1`` splits it over every device (README: memory per
device either way, and the widest U-Net that fits an 80 GB device).

Variants:
  resized: the Chrabaszcz et al. (2017) re-release (``imagenet64_resized``); compare with
    papers that report on it, not with VDM's 3.40 bpd.
"""

from __future__ import annotations

import ml_collections

from configs import base

# Variants (``--config=configs/imagenet64.py:VARIANT``): the dataset each reads.
VARIANTS = {"": "imagenet64", "resized": "imagenet64_resized"}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The paper's ImageNet 64x64 model; ``variant`` "resized" reads the Chrabaszcz et al.
    (2017) re-release instead of the original set."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of imagenet64; allowed: {list(VARIANTS)}")
    config = base.get_config()
    config.data.name = VARIANTS[variant]
    config.model.num_blocks = 64
    config.model.channels = 256
    config.model.dropout_rate = 0.0
    config.model.dtype = "bfloat16"
    config.model.remat = True
    config.eval.batch_size = 512
    return config
