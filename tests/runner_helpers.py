"""Shared helpers for the experiment-runner tests: tiny configs, subprocess runs, restores."""

from __future__ import annotations

import glob
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
from typing import Any

import jax
import ml_collections
import numpy as np
from tensorboardX.proto import event_pb2

from configs import test as test_config
from vdm_jax.runner import checkpoint, evaluate, experiment, sampling, state, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The runner tests compile the same few programs many times (a run, its resumption, its
# eval, child processes): a persistent compilation cache, shared with the children through
# the environment, turns the repeats into cache hits.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="vdm_jax_xla_cache_"))
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


def train_run(
    config: ml_collections.ConfigDict, workdir: str, devices: Any = None
) -> state.TrainState:
    """``--mode=train`` in this process: the experiment of ``config``, trained in ``workdir``."""
    return train.train_and_evaluate(experiment.build(config, devices), workdir)


def eval_run(config: ml_collections.ConfigDict, workdir: str, devices: Any = None) -> dict:
    """``--mode=eval`` in this process; returns the written record."""
    return evaluate.run_eval(experiment.build(config, devices), workdir)


def sample_run(config: ml_collections.ConfigDict, workdir: str) -> np.ndarray:
    """``--mode=sample`` in this process; returns the samples."""
    return sampling.run_sample(experiment.build(config), workdir)


def tiny_config(**overrides: Any) -> ml_collections.ConfigDict:
    """``configs/test.py`` with dotted overrides: ``tiny_config(**{"training.num_steps": 2})``."""
    config = test_config.get_config()
    for field, value in overrides.items():
        *parents, name = field.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[name] = value
    return config


def flag_overrides(**overrides: Any) -> list[str]:
    """The same overrides as command-line flags for ``experiments.main``."""
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def main_command(workdir: str, *args: str, mode: str = "train") -> list[str]:
    return [
        sys.executable,
        "-m",
        "experiments.main",
        "--config=configs/test.py",
        f"--workdir={workdir}",
        f"--mode={mode}",
        *args,
    ]


def subprocess_env(num_devices: int | None = None) -> dict[str, str]:
    """The environment for a child run: CPU only.

    Args:
      num_devices: simulated CPU devices, compiled without LLVM optimisation (several times
        faster to compile; the tiny test model runs as fast). None: the parent's XLA_FLAGS,
        so that the child compiles exactly the parent's programs.
    """
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    if num_devices is not None:
        env["XLA_FLAGS"] = (
            f"--xla_force_host_platform_device_count={num_devices} "
            "--xla_backend_optimization_level=0"
        )
    return env


def run_main(workdir: str, *args: str, mode: str = "train", timeout: float = 300) -> str:
    """Runs ``experiments.main`` to completion and returns its combined output."""
    result = subprocess.run(
        main_command(workdir, *args, mode=mode),
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def restore(config: ml_collections.ConfigDict, workdir: str) -> state.TrainState:
    """The latest checkpoint of ``workdir``, on this process's devices, as numpy arrays."""
    exp = experiment.build(config, jax.local_devices()[:1])
    restored = checkpoint.restore_latest(workdir, state.abstract_train_state(exp))
    assert restored is not None, f"no checkpoint in {workdir}"
    return jax.tree.map(np.asarray, restored)


def assert_trees_close(a: Any, b: Any, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def latest_step(workdir: str) -> int | None:
    manager = checkpoint.make_manager(workdir, read_only=True)
    try:
        return manager.latest_step()
    finally:
        manager.close()


def eval_records(workdir: str, step: int) -> list[dict[str, Any]]:
    """Every evaluation record of ``step`` in ``workdir`` (one per protocol)."""
    return [
        record
        for path in sorted(glob.glob(os.path.join(workdir, "eval", "*", f"step_{step}.json")))
        for record in [json.load(open(path))]
    ]


def eval_record(workdir: str, step: int) -> dict[str, Any] | None:
    """The one evaluation record of ``step`` (None if there is none; fails if several)."""
    found = eval_records(workdir, step)
    assert len(found) <= 1, [r["protocol_id"] for r in found]
    return found[0] if found else None


def read_events(workdir: str, run: str = "") -> dict[str, list[int]]:
    """Tag -> steps of the TensorBoard events in ``{workdir}/tensorboard/{run}`` (``run``
    may be a glob; TFRecord files: length u64, its CRC u32, the Event proto, its CRC u32)."""
    tags: dict[str, list[int]] = {}
    pattern = os.path.join(workdir, "tensorboard", run, "events.out.tfevents.*")
    for path in sorted(glob.glob(pattern)):
        with open(path, "rb") as f:
            raw = f.read()
        pos = 0
        while pos < len(raw):
            (length,) = struct.unpack("<Q", raw[pos : pos + 8])
            event = event_pb2.Event.FromString(raw[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    return tags
