"""The install extras of setup.cfg: accelerator builds of the pinned jax, and the
dataset-building tools kept out of the training install."""

from __future__ import annotations

import configparser
import json
import os
import subprocess
import sys

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement

from experiments import prepare_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def requirements(section: str, key: str) -> list[Requirement]:
    config = configparser.ConfigParser()
    config.read(os.path.join(REPO, "setup.cfg"))
    lines = config[section][key].strip().splitlines()
    return [Requirement(line) for line in lines if line.strip()]


def core() -> dict[str, Requirement]:
    return {r.name: r for r in requirements("options", "install_requires")}


def extra(name: str) -> list[Requirement]:
    return requirements("options.extras_require", name)


@pytest.mark.parametrize(("name", "plugin"), [("cuda12", "cuda12"), ("tpu", "tpu")])
def test_accelerator_extras_pin_the_core_jax(name, plugin):
    (req,) = extra(name)
    assert req.name == "jax" and req.extras == {plugin}
    assert req.specifier == core()["jax"].specifier and str(req.specifier)  # bounded, same


def test_training_needs_no_tensorflow_and_the_data_extra_builds():
    assert not {"tensorflow", "tensorflow-cpu", "tf-nightly"} & set(core())
    reqs = extra("data")
    platforms = {
        "x86_64": {"platform_machine": "x86_64"},
        "aarch64": {"platform_machine": "aarch64"},
        "arm64": {"platform_machine": "arm64"},
        "AMD64": {"platform_machine": "AMD64"},
    }
    for machine, env in platforms.items():
        names = {r.name for r in reqs if r.marker is None or Marker(str(r.marker)).evaluate(env)}
        tensorflows = names & {"tensorflow", "tensorflow-cpu"}
        assert len(tensorflows) == 1, (machine, names)
        # Every module prepare_data checks for comes with the extra.
        modules = {"tensorflow" if n in tensorflows else n.replace("-", "_") for n in names}
        assert set(prepare_data.BUILD_MODULES) <= modules, (machine, names)


PIP_RESOLVE = (sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed")


def pip_resolve(*requirements: str) -> subprocess.CompletedProcess:
    """pip's resolution of ``requirements`` against the package index; installs nothing."""
    return subprocess.run(
        [*PIP_RESOLVE, "--quiet", "--report", "-", *requirements],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "companion"), [("cuda12", "jax-cuda12-plugin"), ("tpu", "libtpu")]
)
def test_accelerator_extras_resolve_on_the_index(name, companion):
    """The index holds the accelerator build of the pinned jax (metadata only; ~20 s)."""
    if pip_resolve("--no-deps", "packaging").returncode != 0:
        pytest.skip("no package index reachable")
    (req,) = extra(name)
    result = pip_resolve(str(req))
    assert result.returncode == 0, result.stderr[-2000:]
    installs = {
        item["metadata"]["name"].lower(): item["metadata"]["version"]
        for item in json.loads(result.stdout)["install"]
    }
    assert req.specifier.contains(installs["jax"]) and companion in installs
    if name == "cuda12":  # The plugin is released in lockstep with jax.
        assert installs[companion] == installs["jax"]
