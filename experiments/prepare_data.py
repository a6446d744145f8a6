r"""Prepares a TFDS dataset once, in the ArrayRecord files that training reads.

  python -m experiments.prepare_data cifar10 --data_dir=$HOME/tensorflow_datasets

``DATASET`` is a name of :data:`vdm_jax.runner.data.DATASETS` (what ``config.data.name``
says); ``--data_dir`` is the TFDS data directory the run then reads through
``--config.data.data_dir`` (default: ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``).
The TFDS builder downloads its sources and writes
``{data_dir}/{tfds name}/{version}/*.array_record-*`` (``file_format="array_record"``,
which ``tfds.data_source`` reads without TensorFlow). Building needs TensorFlow and
``importlib_resources`` (``pip install -e '.[data]'``); training does not.

Sources (:data:`SOURCES`): CIFAR-10 downloads from the University of Toronto (163 MB).
The original downsampled ImageNet of van den Oord et al. (2016) is no longer served at
image-net.org/small, whence TFDS would fetch it: put ``train_32x32.tar`` and
``valid_32x32.tar`` (or the 64x64 pair) in ``--manual_dir`` and TFDS checks them against
its recorded SHA-256 sums. The re-released ImageNet of Chrabaszcz et al. (2017) needs an
image-net.org login: download ``Imagenet32_train_npz.zip`` and ``Imagenet32_val_npz.zip``
(or the three 64x64 files) into ``--manual_dir``.

Ends with one line naming the prepared dataset, its directory and its split sizes, read back
through the project's reader; any failure is one line too.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys

from absl import app, flags

from vdm_jax.runner import data

_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data directory (default: $TFDS_DATA_DIR, else ~/tensorflow_datasets)."
)
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None, "Folder holding source files downloaded by hand (ImageNet variants)."
)
_DOWNLOAD_DIR = flags.DEFINE_string(
    "download_dir", None, "Where downloads are cached (default: {data_dir}/downloads)."
)


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a dataset's source files come from.

    Attributes:
      files: the files TFDS fetches (or finds in ``--manual_dir``).
      where: how to obtain them, for the error message of a failed download.
    """

    files: tuple[str, ...]
    where: str


_IMAGENET_SMALL = (
    "image-net.org/small no longer serves the original downsampled ImageNet (van den Oord "
    "et al. 2016); put {files} in --manual_dir (TFDS checks their SHA-256)"
)
_IMAGENET_RESIZED = (
    "log in at image-net.org (Download > Downsampled ImageNet, Chrabaszcz et al. 2017) and "
    "put {files} in --manual_dir"
)

SOURCES: dict[str, Source] = {
    "cifar10": Source(
        ("cifar-10-binary.tar.gz",),
        "TFDS downloads https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz; without "
        "network, put that file in --manual_dir",
    ),
    "imagenet32": Source(("train_32x32.tar", "valid_32x32.tar"), _IMAGENET_SMALL),
    "imagenet64": Source(("train_64x64.tar", "valid_64x64.tar"), _IMAGENET_SMALL),
    "imagenet32_resized": Source(
        ("Imagenet32_train_npz.zip", "Imagenet32_val_npz.zip"), _IMAGENET_RESIZED
    ),
    "imagenet64_resized": Source(
        (
            "Imagenet64_train_part1_npz.zip",
            "Imagenet64_train_part2_npz.zip",
            "Imagenet64_val_npz.zip",
        ),
        _IMAGENET_RESIZED,
    ),
}

# What TFDS's builders import while building (not while reading): TensorFlow for image
# encoding and file access, importlib_resources for the builder's own files (TFDS declares
# it only for Python < 3.9, yet imports it on every version).
BUILD_MODULES = ("tensorflow", "importlib_resources")


class PrepareError(RuntimeError):
    """A dataset could not be prepared; the message is one line."""


def missing_build_modules() -> list[str]:
    """The modules of :data:`BUILD_MODULES` that cannot be imported here."""
    return [m for m in BUILD_MODULES if importlib.util.find_spec(m) is None]


def prepare(
    name: str,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    download_dir: str | None = None,
    *,
    check_modules: bool = True,
) -> data.DatasetInfo:
    """Builds dataset ``name`` as ArrayRecord files in ``data_dir`` and reads it back.

    Args:
      name: a key of :data:`vdm_jax.runner.data.DATASETS`.
      data_dir: TFDS data directory (None: TFDS's default).
      manual_dir: folder of source files obtained by hand.
      download_dir: download cache (None: ``{data_dir}/downloads``).
      check_modules: first check that :data:`BUILD_MODULES` import (a builder that needs
        neither, as the tests' does, may skip it).

    Returns:
      The dataset's facts, read back through :func:`vdm_jax.runner.data.get_info`.

    Raises:
      PrepareError: unknown or embedded name, missing build modules, or a failed build.
    """
    if name not in data.DATASETS:
        raise PrepareError(f"unknown dataset {name!r}; allowed names: {sorted(data.DATASETS)}")
    tfds_name = data.DATASETS[name].tfds_name
    if tfds_name is None:
        raise PrepareError(f"dataset {name!r} is embedded in the package: nothing to prepare")
    if check_modules and (lost := missing_build_modules()):
        raise PrepareError(
            f"building TFDS {tfds_name} needs {', '.join(lost)} (not installed here; training "
            "does not need them): pip install -e '.[data]'"
        )
    import tensorflow_datasets as tfds

    root = data.tfds_data_dir(data_dir)
    builder = tfds.builder(tfds_name, data_dir=root)
    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    try:
        builder.download_and_prepare(
            download_dir=download_dir, file_format="array_record", download_config=config
        )
    except Exception as e:  # Any failure of the build is reported in one line.
        source = SOURCES.get(name)
        hint = f"; {source.where.format(files=' and '.join(source.files))}" if source else ""
        first = (str(e).strip().splitlines() or [""])[0]
        raise PrepareError(
            f"could not prepare dataset {name!r} (TFDS {tfds_name}) in {root}: "
            f"{type(e).__name__}: {first}{hint}"
        ) from e
    try:
        return data.get_info(name, root)
    except data.DatasetNotFoundError as e:
        raise PrepareError(f"the build finished but cannot be read back: {e}") from e


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise app.UsageError(f"give one dataset, one of {sorted(SOURCES)}; got {argv[1:]}")
    name = argv[1]
    try:
        info = prepare(name, _DATA_DIR.value, _MANUAL_DIR.value, _DOWNLOAD_DIR.value)
    except PrepareError as e:
        sys.exit(f"FATAL: {e}")
    tfds_name = data.DATASETS[name].tfds_name
    assert tfds_name is not None  # prepare() raised for embedded data.
    print(
        f"prepared dataset {name!r} (TFDS {tfds_name}) in "
        f"{data.tfds_version_dir(tfds_name, _DATA_DIR.value)}: {info.num_train} train, "
        f"{info.num_eval} eval examples of {info.shape}; train with "
        f"--config.data.data_dir={data.tfds_data_dir(_DATA_DIR.value)}"
    )


if __name__ == "__main__":
    app.run(main)
