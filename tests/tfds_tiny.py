"""A tiny TFDS dataset built into real ArrayRecord files, for tests of the TFDS data path.

:class:`VdmJaxTinyDigits` is a ``tfds.core.GeneratorBasedBuilder`` (registered with TFDS as
``vdm_jax_tiny_digits``) holding the first :data:`NUM_TRAIN` scikit-learn digits as train
and the next :data:`NUM_TEST` as test, stored as PNG bytes (encoded with Pillow, so building
needs no TensorFlow). :func:`register` adds it to the project's dataset registry under
:data:`NAME`, so ``prepare_data``, the reader and the runner treat it as they treat CIFAR-10.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from vdm_jax.runner import data

NAME = "tiny_tfds"  # The project's registry name.
TFDS_NAME = "vdm_jax_tiny_digits"  # TFDS's name of the builder below.
NUM_TRAIN = 40
NUM_TEST = 12


class VdmJaxTinyDigits(tfds.core.GeneratorBasedBuilder):
    """Digits 8x8x1 (values 0..16) with labels, as a TFDS dataset with train / test."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # Nothing to download: the digits ship with scikit-learn.
        return {
            "train": self._generate_examples(0, NUM_TRAIN),
            "test": self._generate_examples(NUM_TRAIN, NUM_TRAIN + NUM_TEST),
        }

    def _generate_examples(self, start: int = 0, stop: int = 0):
        images, labels = source_digits()
        for i in range(start, stop):
            png = io.BytesIO()
            Image.fromarray(images[i, ..., 0].astype(np.uint8)).save(png, format="png")
            yield i, {"image": png.getvalue(), "label": int(labels[i])}


def source_digits() -> tuple[np.ndarray, np.ndarray]:
    """The digits the builder writes: images [N, 8, 8, 1] and labels [N], N = train + test."""
    images, labels = data.read_split("digits", "train", count=NUM_TRAIN + NUM_TEST)
    return images, labels


def register(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, int, int] = (8, 8, 1), name: str = NAME
) -> None:
    """Adds the tiny dataset to :data:`vdm_jax.runner.data.DATASETS` for one test (``shape``
    other than its real one makes the reader's shape check fire)."""
    spec = data._tfds_spec(TFDS_NAME, "test", shape, num_classes=10, vocab_size=17)
    monkeypatch.setitem(data.DATASETS, name, spec)


def build(root: str) -> data.DatasetInfo:
    """Prepares the tiny dataset in data_dir ``root`` through ``experiments.prepare_data``."""
    from experiments import prepare_data

    with pytest.MonkeyPatch.context() as mp:
        register(mp)
        return prepare_data.prepare(NAME, root, check_modules=False)
