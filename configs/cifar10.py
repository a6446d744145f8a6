"""CIFAR-10 without augmentation, as in the VDM paper (Table 1: 2.65 bpd on the test set).

Reads TFDS ``cifar10`` 3.0.2 (50,000 train / 10,000 test images), prepared once with
``python -m experiments.prepare_data cifar10``; docs/reproduce.md has the whole recipe.

Launch::

  python -m experiments.main --config=configs/cifar10.py --workdir=workdir/cifar10 --mode=train

Expect about 2.65 test bpd after the paper's 10M steps at batch 128. The U-Net has 30.6M
parameters.

The variant ``configs/cifar10.py:reference`` is the model of the checkpoint released with
google-research/vdm (the reference's layout: its flag input, GroupNorm groups and
``eps_hat = net(z) + z``; a learned linear schedule). Import it once, then evaluate it
(reported: 2.637 bpd)::

  python -m experiments.import_reference ckpt/vdm_cifar10 workdir/ref_cifar10 \\
      --config=configs/cifar10.py:reference
  python -m experiments.main --config=configs/cifar10.py:reference \\
      --workdir=workdir/ref_cifar10 --mode=eval
"""

from __future__ import annotations

import ml_collections

from configs import base

# The released checkpoint's model (the reference's configs/cifar10.py), beyond the base's.
REFERENCE_MODEL = {
    "schedule": "learned_linear",
    "label_input": "flag",
    "min_group_size": 1,
    "add_z_to_eps": True,
}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The base config is the paper's CIFAR-10 setting; ``"reference"``: the released
    reference checkpoint's model."""
    if variant not in ("", "reference"):
        raise ValueError(f"unknown variant {variant!r}; allowed: 'reference'")
    config = base.get_config()
    config.data.name = "cifar10"
    if variant == "reference":
        config.model.update(REFERENCE_MODEL)
    return config
