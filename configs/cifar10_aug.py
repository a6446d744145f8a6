"""CIFAR-10 with random dihedral (D4) augmentations, conditioned on the augmentation index.

As in the VDM paper (Table 1: 2.49 bpd with augmentation). Each training image is flipped
and/or rotated by one of the 8 elements of D4 and the model is told which (an 8-way label
embedding); evaluation and sampling condition on the identity (index 0).

Reads TFDS ``cifar10`` 3.0.2, prepared once with ``python -m experiments.prepare_data
cifar10``; docs/reproduce.md has the whole recipe.

Launch::

  python -m experiments.main --config=configs/cifar10_aug.py --workdir=workdir/cifar10_aug \\
      --mode=train

Expect about 2.49 test bpd after the paper's schedule.

The variant ``configs/cifar10_aug.py:reference`` is the model of the checkpoint released with
google-research/vdm (the reference's layout, 320 channels, told only whether an image was
augmented). Import it once, then evaluate it (reported: 2.522 bpd)::

  python -m experiments.import_reference ckpt/vdm_cifar10_aug workdir/ref_cifar10_aug \\
      --config=configs/cifar10_aug.py:reference
  python -m experiments.main --config=configs/cifar10_aug.py:reference \\
      --workdir=workdir/ref_cifar10_aug --mode=eval
"""

from __future__ import annotations

import ml_collections

from configs import base

# The released checkpoint's model (the reference's configs/cifar10_aug.py), beyond the base's.
REFERENCE_MODEL = {
    "schedule": "learned_linear",
    "label_input": "flag",
    "min_group_size": 1,
    "add_z_to_eps": True,
    "channels": 320,
    "dropout_rate": 0.05,
}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """CIFAR-10 with augmentation and augmentation conditioning; ``"reference"``: the
    released reference checkpoint's model."""
    if variant not in ("", "reference"):
        raise ValueError(f"unknown variant {variant!r}; allowed: 'reference'")
    config = base.get_config()
    config.data.name = "cifar10"
    config.data.augment = True
    config.model.conditioning = "augmentation"
    if variant == "reference":
        config.model.update(REFERENCE_MODEL)
    return config
