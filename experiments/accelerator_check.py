r"""Accelerator check: does this host train the CIFAR-10 model, how fast, and where time goes.

  python -m experiments.accelerator_check --json=accelerator_check.json            # GPU/TPU
  python -m experiments.accelerator_check --size=tiny --steps=20 --json=/tmp/ac.json  # CPU

On every device JAX finds, it trains ``configs/cifar10.py`` (``--size=paper``: the paper's
32-block, 128-channel U-Net at batch 128; ``--size=tiny``: 2 blocks of 32 channels at batch
8, for a CPU) in ``bfloat16`` compute (``model.dtype``) on a fixed batch of random images
(no dataset needed) for ``--steps`` timed steps after ``--warmup`` untimed ones, with the
runner's own jitted train step (the benchmark's ``train`` part:
:func:`experiments.benchmark.parts.train_part`, timed by
:func:`experiments.benchmark.harness.time_parts`). It reports:

* the median step time and images/s;
* model FLOP/s (the U-Net's convolutions and matrix products, 3x the forward per step:
  :mod:`vdm_jax.runner.flops`) and model-FLOP utilisation against the chip's dense bfloat16
  peak (:data:`experiments.benchmark.harness.PEAK_BF16_FLOPS`; ``--peak_flops`` for a chip
  not in the table, which is otherwise reported as "peak unknown");
* XLA's memory estimate of the compiled step (``compiled.memory_analysis()``) and the
  measured peak;
* a profile: ``--profile_steps`` further steps under ``jax.profiler.trace``, whose trace
  (kept in ``--profile_dir``, viewable in Perfetto or TensorBoard) is parsed for the time of
  each XLA operation of the step (events tagged ``hlo_op``; on a GPU/TPU host the device
  lanes), listing the top operations and operation kinds by share of the step.

Everything is written to ``--json``, with the environment (versions, devices, host). If any
reported number or the step's loss is not finite, it says so loudly on stderr and exits 1
(the JSON is still written, for inspection).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import math
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from experiments.benchmark import harness, parts, sweep

# Model size: config overrides, and the batch size when --batch_size is 0.
SIZES: dict[str, tuple[dict[str, Any], int]] = {
    "paper": ({}, 0),  # The config's own model and batch (128).
    "tiny": (
        {
            "model.num_blocks": 2,
            "model.channels": 32,
            "model.num_groups": 8,
            "model.schedule_width": 64,
        },
        8,
    ),
}


def check_config(
    config: ml_collections.ConfigDict, size: str, batch_size: int, dtype: str
) -> ml_collections.ConfigDict:
    """``config`` at model ``size`` (:data:`SIZES`), compute ``dtype`` and training batch
    ``batch_size`` (0: the size's default, else the config's)."""
    overrides, size_batch = SIZES[size]
    config = config.copy_and_resolve_references()
    for field, value in overrides.items():
        section, name = field.split(".")
        config[section][name] = value
    config.model.dtype = dtype
    config.training.batch_size = batch_size or size_batch or config.training.batch_size
    return config


def _events(trace_dir: str) -> tuple[list[dict[str, Any]], dict[int, str]]:
    """The complete ("X") events of the newest perfetto trace under ``trace_dir`` and the
    process names by pid."""
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
    if not paths:
        return [], {}
    with gzip.open(max(paths, key=os.path.getmtime), "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {
        e["pid"]: e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    return [e for e in events if e.get("ph") == "X" and "dur" in e], names


def op_kind(op: str) -> str:
    """An XLA operation's kind: its name without the instance number (``fusion.12`` ->
    ``fusion``, ``convolution.3`` -> ``convolution``)."""
    return re.sub(r"[.:]\d+$", "", op)


def profile_summary(trace_dir: str, steps: int, top: int = 10) -> dict[str, Any]:
    """Where a profiled step's time goes, from a ``jax.profiler`` trace of ``steps`` steps.

    Sums the durations of the events tagged with an ``hlo_op`` (XLA's per-operation events:
    the CPU runtime's thunks, the GPU's kernels), on the device lanes where there are any
    (``/device:...``) else the host's, in the program (``hlo_module``) that took the most
    time; a backend whose trace has no ``hlo_op`` tags falls back to the device lanes'
    events by name. Returns ``{"available": False, "reason": ...}`` when neither is found.
    """
    events, process = _events(trace_dir)
    tagged = [e for e in events if "hlo_op" in e.get("args", {})]
    device = [e for e in tagged if process.get(e["pid"], "").startswith("/device:")]
    chosen = device or tagged
    source = "hlo_op events on device lanes" if device else "hlo_op events on host lanes"
    if chosen:
        per_module: collections.Counter[str] = collections.Counter()
        for e in chosen:
            per_module[e["args"].get("hlo_module", "")] += e["dur"]
        module = per_module.most_common(1)[0][0]
        chosen = [e for e in chosen if e["args"].get("hlo_module", "") == module]
        name_of = lambda e: e["args"]["hlo_op"]  # noqa: E731
    else:
        module = None
        chosen = [e for e in events if process.get(e["pid"], "").startswith("/device:")]
        source = "device lane events by name"
        name_of = lambda e: e["name"]  # noqa: E731
    if not chosen:
        return {"available": False, "reason": f"no operation events in the trace in {trace_dir}"}
    per_op: collections.Counter[str] = collections.Counter()
    for e in chosen:
        per_op[name_of(e)] += e["dur"] * 1e-6  # Trace durations are in microseconds.
    total = sum(per_op.values())
    per_kind: collections.Counter[str] = collections.Counter()
    for op, seconds in per_op.items():
        per_kind[op_kind(op)] += seconds

    def rows(counter: collections.Counter[str], key: str) -> list[dict[str, Any]]:
        return [
            {key: name, "s_per_step": s / steps, "share": s / total}
            for name, s in counter.most_common(top)
        ]

    return {
        "available": True,
        "source": source,
        "hlo_module": module,
        "trace_dir": trace_dir,
        "profiled_steps": steps,
        "op_s_per_step": total / steps,
        "num_ops": len(per_op),
        "top_ops": rows(per_op, "op"),
        "top_kinds": rows(per_kind, "kind"),
    }


def _numbers(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (dotted path, number) in a JSON-like tree."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        yield path, value


def nonfinite(summary: dict[str, Any]) -> list[str]:
    """The dotted paths of the numbers in ``summary`` that are NaN or infinite."""
    return [path for path, v in _numbers(summary) if not math.isfinite(float(v))]


def run_check(
    config: ml_collections.ConfigDict,
    *,
    steps: int,
    warmup: int,
    profile_steps: int,
    profile_dir: str,
    peak_flops: float = 0.0,
) -> dict[str, Any]:
    """Trains ``config`` on random batches on every device and returns the report.

    Returns:
      ``{"summary": ..., "benchmark": ..., "profile": ..., "environment": ...}``: the summary
      holds the headline figures (see the module docstring), ``benchmark`` the harness's full
      record of the train part.
    """
    devices = jax.devices()
    batch_size = config.training.batch_size
    exp = sweep.build_experiment(config, batch_size, devices, sweep.dataset_info(config))
    context = parts.Context.create(exp)
    part = parts.train_part(exp, batch_size, None, context)  # type: ignore[arg-type]
    probe = harness.MemoryProbe(devices)
    (timing,) = harness.time_parts([part], steps=steps, warmup=warmup, probe=probe)
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
        for _ in range(profile_steps):
            jax.block_until_ready(part.call())
    _, metrics = jax.block_until_ready(part.call())
    device = devices[0]
    peak = peak_flops or harness.peak_bf16_flops(device.device_kind)
    placement = harness.Placement(
        batch_size, len(devices), device.device_kind, device.platform, peak
    )
    (result,) = harness.results([part], [timing], placement)
    record = result.to_json()
    flops_per_s = record["flops_per_s"].get("analytic")
    summary = {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "num_devices": len(devices),
        "dtype": config.model.dtype,
        "batch_size": batch_size,
        "parameters": int(sum(np.size(p) for p in jax.tree.leaves(context.train_state.params))),
        "steps_timed": steps,
        "step_s_median": record["step_s"]["median"],
        "step_s_quartiles": [record["step_s"]["p25"], record["step_s"]["p75"]],
        "images_per_s": record["images_per_s"],
        "model_flops_per_step": record["flops"]["analytic"],
        "model_flops_per_s": flops_per_s,
        "peak_flops_per_device": peak,
        "model_flops_utilization": record["model_flops_utilization"],
        "compile_s": record["compile_s"],
        "xla_memory_per_device": record["memory"].get("memory_analysis_per_device"),
        "measured_peak_bytes": record["memory"]["peak_bytes"],
        "measured_peak_source": record["memory"]["peak_source"],
        "last_step_metrics": {k: float(np.asarray(v)) for k, v in metrics.items()},
    }
    if peak is None:
        summary["peak_note"] = (
            f"peak FLOP/s of {device.device_kind!r} unknown: model FLOP/s reported, no "
            "utilisation (give --peak_flops)"
        )
    return {
        "summary": summary,
        "benchmark": record,
        "profile": profile_summary(profile_dir, profile_steps),
        "environment": sweep.environment(),
    }


def format_summary(report: dict[str, Any]) -> str:
    """The report's headline figures and top operations as a few lines of text."""
    s, p = report["summary"], report["profile"]
    mfu = s["model_flops_utilization"]
    memory = s["xla_memory_per_device"] or {}
    lines = [
        f"{s['num_devices']} x {s['device_kind']} ({s['platform']}), {s['dtype']}, "
        f"batch {s['batch_size']}, {s['parameters'] / 1e6:.2f}M parameters",
        f"step {s['step_s_median'] * 1e3:.2f} ms (median of {s['steps_timed']}), "
        f"{s['images_per_s']:.1f} images/s, {s['model_flops_per_s'] / 1e12:.3f} TFLOP/s model, "
        + (f"MFU {mfu:.1%}" if mfu is not None else "MFU: peak unknown"),
        f"XLA memory estimate {memory.get('total_bytes', 0) / 2**20:.1f} MiB per device "
        f"(temp {memory.get('temp_bytes', 0) / 2**20:.1f} MiB); measured peak "
        f"{s['measured_peak_bytes'] / 2**20:.1f} MiB ({s['measured_peak_source']})",
    ]
    if p.get("available"):
        kinds = ", ".join(f"{r['kind']} {r['share']:.0%}" for r in p["top_kinds"][:5])
        ops = ", ".join(f"{r['op']} {r['share']:.0%}" for r in p["top_ops"][:5])
        lines += [f"time by op kind: {kinds}", f"top ops: {ops}"]
    else:
        lines.append(f"profile: {p.get('reason')}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    config = check_config(f.config, f.size, f.batch_size, f.dtype)
    json_path = os.path.abspath(f.json)
    profile_dir = f.profile_dir or os.path.splitext(json_path)[0] + "_profile"
    report = run_check(
        config,
        steps=f.steps,
        warmup=f.warmup,
        profile_steps=f.profile_steps,
        profile_dir=profile_dir,
        peak_flops=f.peak_flops,
    )
    bad = nonfinite({"summary": report["summary"], "profile": report["profile"]})
    report["nonfinite"] = bad
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    with open(json_path, "w") as out:
        json.dump(report, out, indent=1, default=float)
    print(format_summary(report))
    print(f"wrote {json_path}")
    if bad:
        sys.stderr.write(f"ACCELERATOR CHECK FAILED: non-finite {', '.join(bad)} ({json_path})\n")
        sys.exit(1)


def define_flags() -> None:
    """The command's flags."""
    # Defined only when run as a program, so that tests may import this module beside
    # experiments.main (which defines --config too).
    config_flags.DEFINE_config_file("config", "configs/cifar10.py", "Config to train.")
    flags.DEFINE_enum("size", "paper", list(SIZES), "Model size: the config's, or tiny (CPU).")
    flags.DEFINE_integer("batch_size", 0, "Global batch (0: 128 for paper, 8 for tiny).")
    flags.DEFINE_string("dtype", "bfloat16", "Compute dtype (model.dtype).")
    flags.DEFINE_integer("steps", 300, "Timed steps.")
    flags.DEFINE_integer("warmup", 5, "Untimed steps before (compilation is not timed).")
    flags.DEFINE_integer("profile_steps", 5, "Steps traced by jax.profiler after timing.")
    flags.DEFINE_string("profile_dir", None, "Trace directory (default: next to --json).")
    flags.DEFINE_float("peak_flops", 0.0, "One chip's peak FLOP/s (0: from the table).")
    flags.DEFINE_string("json", "accelerator_check.json", "Where to write the report.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
