"""Downsampled ImageNet 64x64 (VDM paper, Table 1: 3.40 bpd on the validation set).

Launch on a multi-host GPU/TPU cluster (TFDS ``downsampled_imagenet/64x64`` prepared)::

  python -m experiments.main --config=configs/imagenet64.py --workdir=gs://BUCKET/imagenet64 \
      --mode=train

Expect about 3.40 validation bpd after a paper-length run (no public checkpoint). The U-Net
has 64 blocks of 256 channels (237.6M parameters), no dropout; bfloat16 compute and
rematerialisation keep its activations in memory at 64x64. The train state (3.5 GiB) is
replicated; ``--config.sharding.fsdp=-1`` splits it over every device (README: memory per
device either way, and the widest U-Net that fits an 80 GB device).
"""

from __future__ import annotations

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """The paper's ImageNet 64x64 model."""
    config = base.get_config()
    config.data.name = "imagenet64"
    config.model.num_blocks = 64
    config.model.channels = 256
    config.model.dropout_rate = 0.0
    config.model.dtype = "bfloat16"
    config.model.remat = True
    config.eval.batch_size = 512
    return config
