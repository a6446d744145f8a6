"""What the score network is conditioned on (``model.conditioning``), chosen by name.

Each :data:`CONDITIONINGS` entry says how many classes the network embeds, which label a
training, evaluation or sampling batch carries, and what it needs from the data; the config
checks read those properties, and the runner asks the entry instead of testing the name.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax.runner import data

LabelFn = Callable[[np.ndarray], np.ndarray]


def _keep(labels: np.ndarray) -> np.ndarray:
    return labels


def _identity_element(labels: np.ndarray) -> np.ndarray:
    return np.zeros_like(labels)


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """A registered conditioning.

    Attributes:
      conditional: the network takes a label (otherwise no batch carries one).
      num_classes: ``DatasetInfo ->`` size of the label space the network embeds (0 when
        not ``conditional``).
      train_label: the label a training batch carries, from the data's ``label`` [b].
      eval_label: the same for evaluation batches.
      sample_labels: ``(batch_size, num_classes) -> int32 [batch_size]``, the labels the
        sampler draws with.
      needs_dataset_labels: the dataset must have classes.
      augment: the value ``data.augment`` must have; None: either.
      label_nats: ``DatasetInfo ->`` nats per image that turn the evaluated bound on
        ``-log P(x | label)`` into one on ``-log P(x)``: ``-log P(label)`` under the label's
        prior, since ``P(x) >= P(label) P(x | label)``. 0 when the evaluation label is not
        drawn from data (unconditional, or the augmentation identity: the paper's augmented
        CIFAR-10 figure is ``-log P(x | identity)``).
    """

    conditional: bool
    num_classes: Callable[[data.DatasetInfo], int]
    train_label: LabelFn
    eval_label: LabelFn
    sample_labels: Callable[[int, int], jax.Array]
    needs_dataset_labels: bool
    augment: bool | None
    label_nats: Callable[[data.DatasetInfo], float]

    def model_batch(self, batch: Mapping[str, np.ndarray], *, train: bool) -> dict[str, np.ndarray]:
        """The parts of a data batch the model takes: ``{"image"}`` (+ ``"label"`` [b]).

        Args:
          batch: ``{"image": int [b, H, W, C], "label": int [b], ...}`` from
            :mod:`vdm_jax.runner.data`.
          train: whether this is a training batch.
        """
        if not self.conditional:
            return {"image": batch["image"]}
        label_fn = self.train_label if train else self.eval_label
        return {"image": batch["image"], "label": label_fn(batch["label"])}


def _no_classes(info: data.DatasetInfo) -> int:
    del info
    return 0


def _dataset_classes(info: data.DatasetInfo) -> int:
    return info.num_classes


def _no_label_cost(info: data.DatasetInfo) -> float:
    del info
    return 0.0


def _uniform_label_cost(info: data.DatasetInfo) -> float:
    """``log C``: the true class under a uniform prior over the dataset's C classes."""
    return math.log(info.num_classes)


def _augmentation_classes(info: data.DatasetInfo) -> int:
    del info
    return data.NUM_AUGMENTATIONS


def _cycle_classes(batch_size: int, num_classes: int) -> jax.Array:
    return jnp.arange(batch_size, dtype=jnp.int32) % num_classes


def _identity_labels(batch_size: int, num_classes: int) -> jax.Array:
    del num_classes
    return jnp.zeros((batch_size,), jnp.int32)


CONDITIONINGS: dict[str, Conditioning] = {
    # Unconditional: labels are dropped.
    "none": Conditioning(
        conditional=False,
        num_classes=_no_classes,
        train_label=_keep,
        eval_label=_keep,
        sample_labels=_identity_labels,
        needs_dataset_labels=False,
        augment=None,
        label_nats=_no_label_cost,
    ),
    # Class-conditional: the dataset's label; samples cycle through the classes. Evaluation
    # adds -log P(label) under a uniform prior, bounding -log P(x), not -log P(x | label).
    "label": Conditioning(
        conditional=True,
        num_classes=_dataset_classes,
        train_label=_keep,
        eval_label=_keep,
        sample_labels=_cycle_classes,
        needs_dataset_labels=True,
        augment=False,
        label_nats=_uniform_label_cost,
    ),
    # The D4 augmentation index (the paper's augmented CIFAR-10): evaluation and sampling
    # use the identity, 0.
    "augmentation": Conditioning(
        conditional=True,
        num_classes=_augmentation_classes,
        train_label=_keep,
        eval_label=_identity_element,
        sample_labels=_identity_labels,
        needs_dataset_labels=False,
        augment=True,
        label_nats=_no_label_cost,
    ),
}
