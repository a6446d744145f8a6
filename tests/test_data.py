"""Tests of the dataset registry, deterministic batching, host sharding and validation."""

from __future__ import annotations

import dataclasses
import itertools
import threading

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from vdm_jax.runner import data

DIGITS = data.DatasetInfo("digits", (8, 8, 1), 17, 10, 1500, 297)


def take(iterator, n: int) -> list[dict[str, np.ndarray]]:
    batches = list(itertools.islice(iterator, n))
    iterator.close()
    return batches


def stack(batches: list[dict[str, np.ndarray]], key: str) -> np.ndarray:
    return np.concatenate([b[key] for b in batches])


def digits_train(n: int, **kwargs) -> list[dict[str, np.ndarray]]:
    kwargs.setdefault("global_batch_size", 100)
    kwargs.setdefault("seed", 0)
    return take(data.train_iterator("digits", **kwargs), n)


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# --- digits: facts and fixed split -------------------------------------------------------


def test_digits_info():
    info = data.get_info("digits")
    assert dataclasses.replace(info, version="") == DIGITS
    # The protocol of every result names the rows: the package and the fixed split.
    assert info.eval_split == "test"
    assert "load_digits" in info.version and "test rows 1500-1796" in info.version


def test_unknown_name_lists_allowed():
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'.*cifar10.*digits"):
        data.get_info("mnist")


def test_digits_split_is_fixed():
    raw = load_digits()
    batches = list(data.eval_batches("digits", global_batch_size=297))
    assert len(batches) == 1
    np.testing.assert_array_equal(batches[0]["image"][..., 0], raw.images[1500:])
    np.testing.assert_array_equal(batches[0]["label"], raw.target[1500:])
    # Train holds exactly the first 1,500 images (in some order).
    (train,) = digits_train(1, global_batch_size=1500)
    got = sorted(row.tobytes() for row in train["image"].reshape(1500, -1))
    expect = sorted(row.tobytes() for row in raw.images[:1500].reshape(1500, -1).astype(np.int32))
    assert got == expect


def test_digits_values_are_ints_in_range():
    for batch in digits_train(3) + list(data.eval_batches("digits", global_batch_size=128)):
        assert batch["image"].dtype == np.int32 and batch["label"].dtype == np.int32
        assert batch["image"].shape[1:] == (8, 8, 1)
        assert 0 <= batch["image"].min() and batch["image"].max() < 17
        assert 0 <= batch["label"].min() and batch["label"].max() < 10


# --- determinism and resumption ----------------------------------------------------------


def test_same_seed_same_batches_different_seed_different():
    a, b, c = digits_train(4, seed=3), digits_train(4, seed=3), digits_train(4, seed=4)
    assert_same_batches(a, b)
    assert not np.array_equal(stack(a, "image"), stack(c, "image"))


@pytest.mark.parametrize("augment", [False, True])
def test_start_step_resumes_exactly(augment):
    # 128 does not divide 1500: step 11 straddles the first epoch boundary.
    full = digits_train(14, global_batch_size=128, augment=augment)
    for s in (1, 11, 13):
        resumed = digits_train(14 - s, global_batch_size=128, start_step=s, augment=augment)
        assert_same_batches(full[s:], resumed)


def test_each_epoch_visits_every_train_index_once(monkeypatch):
    # Replace the digits by images that spell their own index in base 17, then count visits
    # over two epochs of 25 steps (batch 60 divides 1500).
    index = np.arange(1797)
    index_images = np.zeros((1797, 8, 8, 1), np.int32)
    index_images[:, 0, :3, 0] = np.stack([index % 17, index // 17 % 17, index // 289], axis=1)
    labels = np.zeros(1797, np.int32)
    monkeypatch.setattr(data, "_digits_arrays", lambda: (index_images, labels))
    img = stack(digits_train(50, global_batch_size=60), "image")
    idx = img[:, 0, 0, 0] + 17 * img[:, 0, 1, 0] + 289 * img[:, 0, 2, 0]
    epochs = idx.reshape(2, 1500)
    for epoch in epochs:
        np.testing.assert_array_equal(np.bincount(epoch, minlength=1500), np.ones(1500))
    assert not np.array_equal(epochs[0], np.arange(1500))  # shuffled
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch


# --- host sharding -----------------------------------------------------------------------


@pytest.mark.parametrize("augment", [False, True])
def test_train_host_shards_union_is_global_batch(augment):
    kwargs = {"global_batch_size": 128, "seed": 7, "start_step": 5, "augment": augment}
    whole = digits_train(3, **kwargs)
    hosts = [digits_train(3, process_index=p, process_count=2, **kwargs) for p in range(2)]
    for s in range(3):
        for key in ("image", "label"):
            assert hosts[0][s][key].shape[0] == 64
            joined = np.concatenate([hosts[0][s][key], hosts[1][s][key]])
            np.testing.assert_array_equal(joined, whole[s][key])


def test_eval_host_shards_union_is_global_batch():
    whole = list(data.eval_batches("digits", global_batch_size=40))
    hosts = [
        list(data.eval_batches("digits", global_batch_size=40, process_index=p, process_count=4))
        for p in range(4)
    ]
    assert [len(h) for h in hosts] == [len(whole)] * 4 == [data.num_eval_batches(DIGITS, 40)] * 4
    for k, batch in enumerate(whole):
        for key in ("image", "label", "mask"):
            joined = np.concatenate([h[k][key] for h in hosts])
            np.testing.assert_array_equal(joined, batch[key])


# --- eval coverage and padding -----------------------------------------------------------


def test_eval_covers_split_once_with_padding():
    batches = list(data.eval_batches("digits", global_batch_size=64))  # 297 = 4 * 64 + 41
    assert len(batches) == data.num_eval_batches(DIGITS, 64) == 5
    mask = stack(batches, "mask")
    assert mask.dtype == np.bool_ and mask.sum() == 297
    np.testing.assert_array_equal(batches[-1]["mask"], np.arange(64) < 41)
    assert all(b["mask"].all() for b in batches[:-1])
    raw = load_digits()
    np.testing.assert_array_equal(stack(batches, "image")[mask][..., 0], raw.images[1500:])
    np.testing.assert_array_equal(stack(batches, "label")[mask], raw.target[1500:])
    assert (batches[-1]["image"][41:] == 0).all()


# --- augmentation ------------------------------------------------------------------------


def test_d4_transform_is_the_dihedral_group():
    x = np.random.default_rng(0).integers(0, 256, (1, 5, 5, 3))
    group = [np.rot90(x, r, axes=(1, 2)) for r in range(4)]
    group += [np.rot90(np.flip(x, axis=2), r, axes=(1, 2)) for r in range(4)]
    group += [np.flip(x, axis=1)]  # a vertical flip is in D4 too: must be found among them
    outs = [data.d4_transform(x, np.array([k])) for k in range(8)]
    np.testing.assert_array_equal(outs[0], x)
    assert len({o.tobytes() for o in outs}) == 8
    for o in outs:
        assert any(np.array_equal(o, g) for g in group[:8])
    assert any(np.array_equal(group[8], o) for o in outs)
    # Batched: each row gets its own element.
    xs = np.repeat(x, 8, axis=0)
    np.testing.assert_array_equal(data.d4_transform(xs, np.arange(8)), np.concatenate(outs))


def test_augmented_batches_label_is_transform_index():
    plain = digits_train(2, seed=5)
    aug = digits_train(2, seed=5, augment=True)
    for p, a in zip(plain, aug, strict=True):
        assert a["label"].min() >= 0 and a["label"].max() < data.NUM_AUGMENTATIONS
        np.testing.assert_array_equal(a["image"], data.d4_transform(p["image"], a["label"]))
    labels = stack(aug, "label")
    assert len(np.unique(labels)) == 8  # all elements used over 200 rows
    ident = labels == 0
    np.testing.assert_array_equal(stack(aug, "image")[ident], stack(plain, "image")[ident])


# --- validation --------------------------------------------------------------------------


def test_validate_images_accepts_and_converts():
    out = data.validate_images(np.full((2, 8, 8, 1), 16, np.uint8), DIGITS)
    assert out.dtype == np.int32


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (np.full((2, 8, 8, 1), 17), r"'digits'.*'image'.*\[0, 17\).*max 17"),
        (np.full((2, 8, 8, 1), -1), r"'digits'.*'image'.*\[0, 17\).*min -1"),
        (np.zeros((2, 8, 8, 1), np.float32), r"'digits'.*'image'.*integer dtype"),
        (np.zeros((2, 8, 8), int), r"'digits'.*'image'.*shape"),
        (np.zeros((2, 8, 8, 3), int), r"'digits'.*'image'.*shape \[batch, \*\(8, 8, 1\)\]"),
    ],
)
def test_validate_images_rejects(images, match):
    with pytest.raises(ValueError, match=match):
        data.validate_images(images, DIGITS)


def test_validate_labels_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"'digits'.*'label'.*\[0, 10\)"):
        data.validate_labels(np.array([3, 10]), DIGITS)


def test_out_of_range_data_raises_through_iterator(monkeypatch):
    images, labels = data._digits_arrays()
    bad = np.array(images)
    bad[:] = 17
    monkeypatch.setattr(data, "_digits_arrays", lambda: (bad, labels))
    with pytest.raises(ValueError, match=r"'digits'.*values must lie in \[0, 17\)"):
        next(data.train_iterator("digits", global_batch_size=10, seed=0))
    with pytest.raises(ValueError, match=r"'digits'.*values must lie in \[0, 17\)"):
        next(data.eval_batches("digits", global_batch_size=10, prefetch=0))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"global_batch_size": 0}, "global_batch_size must be a positive multiple"),
        ({"global_batch_size": 9, "process_count": 2}, "positive multiple of process_count=2"),
        ({"process_index": 2, "process_count": 2}, "process_index must be in"),
        ({"seed": -1}, "seed must be in"),
        ({"start_step": -1}, "start_step must be >= 0"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    kwargs = {"global_batch_size": 10, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=rf"'digits'.*{match}"):
        data.train_iterator("digits", **kwargs)


# --- prefetching -------------------------------------------------------------------------


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "vdm_jax-data-prefetch"]


def test_prefetch_thread_stops_on_close_and_exhaustion():
    before = len(prefetch_threads())
    it = data.train_iterator("digits", global_batch_size=10, seed=0, prefetch=3)
    next(it)
    it.close()
    with pytest.raises(StopIteration):
        next(it)
    batches = list(data.eval_batches("digits", global_batch_size=100))
    assert len(batches) == 3
    for t in prefetch_threads()[before:]:
        t.join(timeout=5)
    assert len(prefetch_threads()) == before


def test_prefetch_matches_synchronous():
    assert_same_batches(digits_train(5, prefetch=2), digits_train(5, prefetch=0))


# --- TFDS path (mock data, no network) ---------------------------------------------------


def test_cifar10_mock_shapes_and_counts():
    with tfds.testing.mock_data(num_examples=20):
        info = data.get_info("cifar10")
        assert dataclasses.replace(info, version="") == data.DatasetInfo(
            "cifar10", (32, 32, 3), 256, 10, 20, 20
        )
        version = tfds.builder("cifar10").info.version
        assert info.eval_split == "test" and info.version == f"tfds cifar10:{version}"
        train = take(data.train_iterator("cifar10", global_batch_size=8, seed=0, augment=True), 6)
        for batch in train:
            assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.int32
            assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
            assert batch["label"].max() < data.NUM_AUGMENTATIONS
        host1 = take(
            data.train_iterator(
                "cifar10",
                global_batch_size=8,
                seed=0,
                augment=True,
                process_index=1,
                process_count=2,
                start_step=2,
            ),
            1,
        )
        np.testing.assert_array_equal(host1[0]["image"], train[2]["image"][4:])
        evals = list(data.eval_batches("cifar10", global_batch_size=6))
        assert len(evals) == data.num_eval_batches(info, 6) == 4
        assert stack(evals, "mask").sum() == 20
        assert evals[0]["image"].shape == (6, 32, 32, 3) and evals[0]["mask"].dtype == np.bool_


def test_imagenet_mock_info_and_shape_error():
    with tfds.testing.mock_data(num_examples=5):
        info = data.get_info("imagenet64")
        assert (info.shape, info.vocab_size, info.num_classes) == ((64, 64, 3), 256, 0)
        assert (info.num_train, info.num_eval) == (5, 5)
        # Mock images have random shapes: the iterator must say so clearly.
        with pytest.raises(ValueError, match=r"'imagenet32'.*'image'.*shape \(32, 32, 3\)"):
            next(data.eval_batches("imagenet32", global_batch_size=5))


def test_read_split_reads_the_first_examples_or_all():
    images, labels = data.read_split("digits", "eval")
    assert images.shape == (297, 8, 8, 1) and labels.shape == (297,)
    first, first_labels = data.read_split("digits", "train", count=5)
    train, train_labels = data.read_split("digits", "train")
    np.testing.assert_array_equal(first, train[:5])
    np.testing.assert_array_equal(first_labels, train_labels[:5])
    assert len(data.read_split("digits", "eval", count=10_000)[0]) == 297
