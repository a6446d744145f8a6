"""The sweep: every batch size on a mesh, every device count in turn, and the environment.

:func:`run` measures each device count of the options on a mesh of this process's devices
(:func:`run_on_mesh`) or, for other CPU device counts, in a child process with that many
simulated devices (:func:`run_in_child`), and returns the JSON-able report. A point that
fails becomes an error record; the others are kept.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax
import jax
import ml_collections

from experiments.benchmark import harness, memory, parts, report
from experiments.benchmark.options import Options
from vdm_jax.runner import data, experiment
from vdm_jax.runner.experiment import Experiment

REPO_ROOT = Path(__file__).resolve().parents[2]
# The flags a child's command line sets itself.
_CHILD_FLAGS = ("--device_counts", "--json", "--device_count_mode", "--profile_dir")


@dataclasses.dataclass(frozen=True)
class ErrorRecord:
    """A point (or device count) that failed, in place of its results.

    Attributes:
      num_devices: the device count.
      error: ``"ExceptionType: message"``, or what went wrong.
      batch_size: the batch size, where the failure was at one.
      device_kind: the devices' kind, where they were found.
      platform: their platform, where they were found.
    """

    num_devices: int
    error: str
    batch_size: int | None = None
    device_kind: str | None = None
    platform: str | None = None

    @classmethod
    def at(cls, placement: harness.Placement, error: Exception) -> ErrorRecord:
        """The record of ``error`` raised while measuring at ``placement``."""
        return cls(
            num_devices=placement.num_devices,
            error=f"{type(error).__name__}: {error}",
            batch_size=placement.batch_size,
            device_kind=placement.device_kind,
            platform=placement.platform,
        )

    def to_json(self) -> dict[str, Any]:
        """``{"part": "error", ...}`` with the fields that are set."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return {"part": "error", **fields}


Record = harness.PartResult | memory.MemoryOnlyResult | ErrorRecord


def dataset_info(config: ml_collections.ConfigDict) -> data.DatasetInfo:
    """The dataset's registered facts (shape, K, classes) without opening any data."""
    name = config.data.name
    if name not in data.DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed names: {sorted(data.DATASETS)}")
    spec = data.DATASETS[name]
    return data.DatasetInfo(name, spec.shape, spec.vocab_size, spec.num_classes, 0, 0)


def build_experiment(
    config: ml_collections.ConfigDict,
    batch_size: int,
    devices: Sequence[jax.Device],
    info: data.DatasetInfo,
) -> Experiment:
    """``config`` with ``batch_size`` for training, eval and sampling, built on ``devices``.

    Raises:
      vdm_jax.runner.config_validation.ConfigError: if that config is invalid on these devices.
    """
    config = copy.deepcopy(config)
    config.training.batch_size = batch_size
    config.eval.batch_size = batch_size
    config.sample.batch_size = batch_size
    return experiment.build(config, devices, info=info)


def run_on_mesh(
    config: ml_collections.ConfigDict,
    options: Options,
    devices: Sequence[jax.Device],
) -> list[Record]:
    """Every batch size of ``options`` on a mesh over ``devices``; a record per part or error.

    One train state serves every batch size (it does not depend on the batch); the profiler
    traces the first batch size only.
    """
    info = dataset_info(config)
    probe = harness.MemoryProbe(devices)
    context: parts.Context | None = None
    records: list[Record] = []
    for batch_size in options.batch_sizes or (config.training.batch_size,):
        device = devices[0]
        placement = harness.Placement(
            batch_size,
            len(devices),
            device.device_kind,
            device.platform,
            options.peak_flops or harness.peak_bf16_flops(device.device_kind),
        )
        try:
            exp = build_experiment(config, batch_size, devices, info)
            if options.memory_only:
                point = memory.memory_only_point(exp, placement, options.fit_device_bytes)
                records.append(point)
            else:
                if context is None:
                    context = parts.Context.create(exp)
                records.extend(parts.benchmark_point(exp, options, context, probe, placement))
                options = dataclasses.replace(options, profile_dir=None)  # One trace is enough.
        except Exception as e:  # One failed point must not lose the others.
            traceback.print_exc()
            records.append(ErrorRecord.at(placement, e))
    return records


def _child_argv(argv: Sequence[str], num_devices: int, json_path: str) -> list[str]:
    """This command line for one device count in a child process."""
    out, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
            continue
        if arg in _CHILD_FLAGS:
            skip = True  # "--flag value": drop the value too.
            continue
        if arg.startswith(tuple(f"{flag}=" for flag in _CHILD_FLAGS)):
            continue
        out.append(arg)
    return [
        sys.executable,
        "-m",
        "experiments.benchmark",
        *out,
        f"--device_counts={num_devices}",
        f"--json={json_path}",
        "--device_count_mode=submesh",
    ]


def _child_env(num_devices: int) -> dict[str, str]:
    """This environment with ``num_devices`` simulated CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    kept = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{kept} --xla_force_host_platform_device_count={num_devices}".strip()
    return env


def run_in_child(argv: Sequence[str], num_devices: int) -> list[dict[str, Any]]:
    """Runs this benchmark in a child process with ``num_devices`` simulated CPU devices.

    Returns:
      The child's JSON records, each with ``run_in`` naming the child's ``XLA_FLAGS``; or
      one error record if the child wrote none.
    """
    env = _child_env(num_devices)
    with tempfile.TemporaryDirectory(prefix="vdm_benchmark_") as tmp:
        path = os.path.join(tmp, "child.json")
        # The child's table goes to its stdout, kept out of ours; its log stays visible.
        result = subprocess.run(
            _child_argv(argv, num_devices, path),
            env=env,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        if not os.path.exists(path):
            print(result.stdout, file=sys.stderr)
            error = f"child process exited with {result.returncode} and no results"
            return [ErrorRecord(num_devices=num_devices, error=error).to_json()]
        with open(path) as f:
            records = json.load(f)["results"]
    run_in = f"child process, XLA_FLAGS={env['XLA_FLAGS']}"
    return [{**rec, "run_in": run_in} for rec in records]


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _jaxlib_version() -> str | None:
    try:
        import jaxlib

        return jaxlib.__version__
    except (ImportError, AttributeError):
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"model name\s*:\s*(.+)", f.read())
        return match.group(1).strip() if match else platform.processor()
    except OSError:
        return platform.processor()


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT, check=False
        ).stdout.strip()
    except OSError:
        return ""


def environment() -> dict[str, Any]:
    """Versions, devices and host of this run."""
    devices = jax.devices()
    return {
        "jax_version": jax.__version__,
        "jaxlib_version": _jaxlib_version(),
        "flax_version": flax.__version__,
        "python_version": platform.python_version(),
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "num_devices": len(devices),
        "process_count": jax.process_count(),
        "host_cpu_count": os.cpu_count(),
        "host_machine": platform.machine(),
        "host_processor": _cpu_model(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "git_commit": _git_commit(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_1min": _load_average(),
    }


def _device_count_mode(options: Options, num_devices: int) -> str:
    """``subprocess`` or ``submesh`` for ``num_devices`` (``auto``: a child on CPU when
    the count differs from this process's devices)."""
    if options.device_count_mode != "auto":
        return options.device_count_mode
    if jax.default_backend() == "cpu" and num_devices != jax.device_count():
        return "subprocess"
    return "submesh"


def _run_device_count(
    config: ml_collections.ConfigDict,
    options: Options,
    num_devices: int,
    argv: Sequence[str] | None,
) -> list[dict[str, Any]]:
    """The JSON records of every batch size at one device count."""
    if _device_count_mode(options, num_devices) == "subprocess" and argv is not None:
        return run_in_child(argv, num_devices)
    devices = jax.devices()
    if num_devices > len(devices):
        error = f"{num_devices} devices requested, {len(devices)} visible"
        return [ErrorRecord(num_devices=num_devices, error=error).to_json()]
    return [r.to_json() for r in run_on_mesh(config, options, devices[:num_devices])]


def run(
    config: ml_collections.ConfigDict,
    options: Options,
    argv: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Runs the benchmark and returns the whole JSON-able report.

    Args:
      config: the experiment config (model, dataset shape, optimizer, eval and sampler).
      options: from :func:`experiments.benchmark.options.make_options`.
      argv: this process's command line, to start children for other CPU device counts
        (None: such counts run as sub-meshes of this process's devices instead).
    """
    load_before = _load_average()
    results: list[dict[str, Any]] = []
    for num_devices in options.device_counts or (jax.device_count(),):
        results.extend(_run_device_count(config, options, num_devices, argv))
    env = environment()
    # Other processes competing for the host skew the times; the load average shows it.
    env["load_average_1min_at_start"] = load_before
    return report.build_report(env, config, options, results)
