"""Tests of the dataset registry, deterministic batching, host sharding and validation."""

from __future__ import annotations

import dataclasses
import glob
import itertools
import os
import shutil
import threading

import numpy as np
import pytest
import tfds_tiny
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


# --- TFDS path: a tiny dataset built into real ArrayRecord files (no network) -------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    """A data_dir holding the tiny TFDS dataset, built once through ``prepare_data``."""
    root = str(tmp_path_factory.mktemp("tfds"))
    info = tfds_tiny.build(root)
    assert (info.num_train, info.num_eval) == (tfds_tiny.NUM_TRAIN, tfds_tiny.NUM_TEST)
    return root


def examples(images: np.ndarray, labels: np.ndarray) -> list[tuple[bytes, int]]:
    """(image bytes, label) pairs, sorted: a multiset that ignores the order of rows."""
    flat = images.reshape(len(images), -1).astype(np.int32)
    return sorted(zip([row.tobytes() for row in flat], labels.tolist(), strict=True))


def test_tfds_files_round_trip_through_the_reader(tiny_dir, monkeypatch):
    tfds_tiny.register(monkeypatch)
    info = data.get_info(tfds_tiny.NAME, tiny_dir)
    assert dataclasses.replace(info, version="") == data.DatasetInfo(
        tfds_tiny.NAME, (8, 8, 1), 17, 10, 40, 12
    )
    # The protocol of every result names the TFDS dataset and its version.
    assert info.eval_split == "test" and info.version == f"tfds {tfds_tiny.TFDS_NAME}:1.0.0"
    written, written_labels = tfds_tiny.source_digits()
    # TFDS orders the examples by a hash of their keys: compare (image, label) multisets.
    for split, rows in (("train", slice(0, 40)), ("eval", slice(40, 52))):
        images, labels = data.read_split(tfds_tiny.NAME, split, tiny_dir)
        assert images.shape == (len(written[rows]), 8, 8, 1)
        assert examples(images, labels) == examples(written[rows], written_labels[rows])


def test_tfds_batches_shapes_sharding_and_padding(tiny_dir, monkeypatch):
    tfds_tiny.register(monkeypatch)
    kwargs = {"global_batch_size": 8, "seed": 0, "augment": True, "data_dir": tiny_dir}
    train = take(data.train_iterator(tfds_tiny.NAME, **kwargs), 6)  # 48 > 40: a new epoch
    for batch in train:
        assert batch["image"].shape == (8, 8, 8, 1) and batch["image"].dtype == np.int32
        assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
        assert batch["label"].max() < data.NUM_AUGMENTATIONS
    host1 = take(
        data.train_iterator(
            tfds_tiny.NAME, process_index=1, process_count=2, start_step=2, **kwargs
        ),
        1,
    )
    np.testing.assert_array_equal(host1[0]["image"], train[2]["image"][4:])
    evals = list(data.eval_batches(tfds_tiny.NAME, global_batch_size=5, data_dir=tiny_dir))
    assert len(evals) == 3 and stack(evals, "mask").sum() == 12
    assert not evals[-1]["image"][~evals[-1]["mask"]].any()


def test_tfds_wrong_shape_is_named(tiny_dir, monkeypatch):
    tfds_tiny.register(monkeypatch, shape=(16, 16, 1))
    with pytest.raises(ValueError, match=r"'tiny_tfds'.*'image'.*shape \(16, 16, 1\)"):
        next(data.eval_batches(tfds_tiny.NAME, global_batch_size=5, data_dir=tiny_dir))


def test_registered_tfds_datasets_name_their_tfds_sources():
    tfds_names = {n: spec.tfds_name for n, spec in data.DATASETS.items() if spec.tfds_name}
    assert tfds_names == {
        "cifar10": "cifar10",
        "imagenet32": "downsampled_imagenet/32x32",
        "imagenet64": "downsampled_imagenet/64x64",
        "imagenet32_resized": "imagenet_resized/32x32",
        "imagenet64_resized": "imagenet_resized/64x64",
    }
    for name in ("imagenet32", "imagenet64", "imagenet32_resized", "imagenet64_resized"):
        spec = data.DATASETS[name]
        assert (spec.vocab_size, spec.num_classes, spec.shape[-1]) == (256, 0, 3)
    # The versions TFDS writes (and a run looks for), which recipes name.
    assert data.tfds_version_dir("cifar10", "/d") == "/d/cifar10/3.0.2"
    assert data.tfds_version_dir("downsampled_imagenet/32x32", "/d").endswith("32x32/2.0.0")
    assert data.tfds_version_dir("imagenet_resized/64x64", "/d").endswith("64x64/0.1.0")


def expected_missing(name: str, tfds_name: str, where: str, what: str, root: str) -> str:
    return (
        f"dataset {name!r} (TFDS {tfds_name}): {what} in {where}; prepare it with: "
        f"python -m experiments.prepare_data {name} --data_dir={root}"
    )


def test_unprepared_tfds_dataset_is_one_line_naming_the_command(tmp_path):
    root = str(tmp_path)
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.get_info("imagenet32", root)
    assert str(e.value) == expected_missing(
        "imagenet32",
        "downsampled_imagenet/32x32",
        f"{root}/downsampled_imagenet/32x32/2.0.0",
        "no prepared files (dataset_info.json)",
        root,
    )
    assert list(tmp_path.iterdir()) == []  # Nothing downloaded, nothing written.


def test_partial_tfds_builds_are_named(tiny_dir, tmp_path, monkeypatch):
    tfds_tiny.register(monkeypatch)
    root = str(tmp_path)
    shutil.copytree(os.path.join(tiny_dir, tfds_tiny.TFDS_NAME), tmp_path / tfds_tiny.TFDS_NAME)
    version_dir = f"{root}/{tfds_tiny.TFDS_NAME}/1.0.0"
    # A shard lost after the build (a partial copy).
    (shard,) = glob.glob(f"{version_dir}/*-test.array_record-*")
    os.remove(shard)
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.get_info(tfds_tiny.NAME, root)
    what = f"1 of the 1 files of split 'test' are missing ({os.path.basename(shard)}, ...)"
    assert str(e.value) == expected_missing(
        tfds_tiny.NAME, tfds_tiny.TFDS_NAME, version_dir, what, root
    )
    # A build killed before TFDS renamed its folder.
    os.rename(version_dir, f"{root}/{tfds_tiny.TFDS_NAME}/incomplete.AB12CD_1.0.0")
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.get_info(tfds_tiny.NAME, root)
    what = "only an interrupted build (incomplete.AB12CD_1.0.0) was found, no prepared files"
    assert str(e.value) == expected_missing(
        tfds_tiny.NAME, tfds_tiny.TFDS_NAME, version_dir, what, root
    )


def test_read_split_reads_the_first_examples_or_all():
    images, labels = data.read_split("digits", "eval")
    assert images.shape == (297, 8, 8, 1) and labels.shape == (297,)
    first, first_labels = data.read_split("digits", "train", count=5)
    train, train_labels = data.read_split("digits", "train")
    np.testing.assert_array_equal(first, train[:5])
    np.testing.assert_array_equal(first_labels, train_labels[:5])
    assert len(data.read_split("digits", "eval", count=10_000)[0]) == 297
