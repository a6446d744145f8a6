"""From prepared TFDS files to a training step, and what a run or ``prepare_data`` prints
when the data are not there: one line naming the dataset, the directory and the command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import tfds_tiny
from runner_helpers import REPO, latest_step, subprocess_env, tiny_config, train_run

from experiments import prepare_data


def output_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]


@pytest.mark.slow
def test_one_training_step_on_prepared_tfds_files(tmp_path, monkeypatch):
    root = str(tmp_path / "tfds")
    tfds_tiny.build(root)
    tfds_tiny.register(monkeypatch)
    config = tiny_config(
        **{"data.name": tfds_tiny.NAME, "data.data_dir": root, "training.num_steps": 1}
    )
    train_run(config, str(tmp_path / "workdir"))
    assert latest_step(str(tmp_path / "workdir")) == 1


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_run_on_unprepared_data_is_one_line_and_writes_nothing(tmp_path, mode):
    root, workdir = tmp_path / "empty", tmp_path / "workdir"
    root.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.main",
            "--config=configs/cifar10.py",
            f"--workdir={workdir}",
            f"--mode={mode}",
            "--config.training.batch_size=8",
            f"--config.data.data_dir={root}",
        ],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    (line,) = output_lines(result)
    assert line.endswith(
        f"DatasetNotFoundError: dataset 'cifar10' (TFDS cifar10): no prepared files "
        f"(dataset_info.json) in {root}/cifar10/3.0.2; prepare it with: "
        f"python -m experiments.prepare_data cifar10 --data_dir={root}"
    )
    assert not workdir.exists() and list(root.iterdir()) == []


def run_prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "experiments.prepare_data", *args],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("mnist", "FATAL: unknown dataset 'mnist'; allowed names: ['cifar10', 'digits', "),
        ("digits", "FATAL: dataset 'digits' is embedded in the package: nothing to prepare"),
    ],
)
def test_prepare_names_a_bad_dataset_in_one_line(tmp_path, name, message):
    result = run_prepare(name, f"--data_dir={tmp_path}")
    assert result.returncode == 1
    (line,) = output_lines(result)
    assert line.startswith(message)


def test_prepare_without_build_modules_says_what_to_install(tmp_path):
    lost = prepare_data.missing_build_modules()
    if not lost:
        pytest.skip("TensorFlow and importlib_resources are installed: a build would download")
    result = run_prepare("cifar10", f"--data_dir={tmp_path}")
    assert result.returncode == 1
    (line,) = output_lines(result)
    assert line == (
        f"FATAL: building TFDS cifar10 needs {', '.join(lost)} (not installed here; training "
        "does not need them): pip install -e '.[data]'"
    )
    assert list(tmp_path.iterdir()) == []


def test_failed_build_names_the_sources_in_one_line(tmp_path, monkeypatch):
    tfds_tiny.register(monkeypatch)
    monkeypatch.setitem(
        prepare_data.SOURCES, tfds_tiny.NAME, prepare_data.Source(("a.zip",), "fetch {files}")
    )

    def fail(*args, **kwargs):
        raise ConnectionError("Failed to establish a new connection\nsecond line")

    monkeypatch.setattr(tfds_tiny.VdmJaxTinyDigits, "_split_generators", fail)
    with pytest.raises(prepare_data.PrepareError) as e:
        prepare_data.prepare(tfds_tiny.NAME, str(tmp_path), check_modules=False)
    assert str(e.value) == (
        f"could not prepare dataset 'tiny_tfds' (TFDS vdm_jax_tiny_digits) in {tmp_path}: "
        "ConnectionError: Failed to establish a new connection; fetch a.zip"
    )
    assert not os.path.exists(tmp_path / tfds_tiny.TFDS_NAME / "1.0.0")
