"""The benchmark's report: its JSON layout, a text table of it, and writing it to a file.

Everything here reads the JSON-able report (as :func:`build_report` makes it, or as loaded
from a file), never the typed records.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from experiments.benchmark.options import Options

SCHEMA_VERSION = 1
FLOP_COUNTING = (
    "flops.analytic: closed-form conv/matmul FLOPs of the U-Net (2 per multiply-add; 3x the "
    "forward for a train step, num_time_samples x for eval, 1x per sampler step; elementwise "
    "ops not counted). flops.jaxpr: conv_general_dilated and dot_general FLOPs counted in the "
    "traced program (includes rematerialised forwards). flops.xla: compiled.cost_analysis() "
    "['flops'] x devices (all ops). ratio_vs_conv_stack: analytic (and xla) FLOP/s of the "
    "part over the conv stack's in the same timing round (same batch, devices, dtype and "
    "process), median over rounds."
)
_MIB = 2**20
_COLUMNS = (
    "part", "dev", "batch", "compile s", "s/step", "[p25, p75]", "img/s", "GFLOP/step",
    "GFLOP/s", "MFU", "vs conv", "cpu/wall", "peak MiB", "XLA MiB", "est MiB", "split est MiB",
)  # fmt: skip
_LEGEND = (
    "s/step: median over the timed steps; img/s at the median. GFLOP: analytic "
    "conv/matmul count (train = 3x forward). MFU: analytic FLOP/s over the devices' peak "
    "(--peak_flops, or the chip's dense bfloat16 peak where known). vs conv: analytic "
    "FLOP/s over the conv stack's (its depth in parentheses) within each round, median "
    "over rounds. "
    "cpu/wall: this process's CPU seconds per wall second while stepping (about the "
    "core count when it had the host to itself). "
    "XLA MiB: compiled.memory_analysis() per device (arguments + outputs - aliased + "
    "temporaries). est MiB (--memory_only): the device's train state + gathered "
    "parameters + gradients + saved activations, from the traced program, in the run's "
    "layout; split est MiB: the same with the state split over every device. peak MiB: "
)


def build_report(
    environment: dict[str, Any],
    config: ml_collections.ConfigDict,
    options: Options,
    results: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """The whole JSON-able report.

    Args:
      environment: versions, devices and host (:func:`experiments.benchmark.sweep.environment`).
      config: the experiment config.
      options: the benchmark's options.
      results: the JSON records of every result and error, in order.
    """
    return {
        "schema_version": SCHEMA_VERSION,
        "environment": environment,
        "config": config.to_dict(),
        "options": options.to_json(),
        "flop_counting": FLOP_COUNTING,
        "results": list(results),
        "train_vs_train_scalar": train_vs_scalar(results),
    }


def train_vs_scalar(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The config's train step over the scalar schedule's (the ``train_scalar`` part), per
    (devices, batch): the median and quartiles over rounds of the two steps' time ratio, each
    round timing both, so that a change of the host's load moves both alike."""
    steps = {
        (r["part"], r["num_devices"], r["batch_size"]): r["step_s"]["all"]
        for r in results
        if r["part"] in ("train", "train_scalar") and "step_s" in r
    }
    out = []
    for (part, devices, batch), own in steps.items():
        scalar = steps.get(("train_scalar", devices, batch))
        if part != "train" or scalar is None:
            continue
        ratios = np.asarray(own) / np.asarray(scalar)
        p25, median, p75 = np.percentile(ratios, [25, 50, 75])
        out.append(dict(num_devices=devices, batch_size=batch, median=median, p25=p25, p75=p75))
    return out


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value / scale, spec)


def _row(r: dict[str, Any]) -> list[str]:
    """One result's table cells, in :data:`_COLUMNS` order."""
    step = r.get("step_s", {})
    mem = r.get("memory", {})
    name = r["part"] + (f"({r['depth']})" if r["part"] == "conv_stack" else "")
    return [
        name,
        str(r.get("num_devices", "-")),
        str(r.get("batch_size", "-")),
        _fmt(r.get("compile_s"), ".2f"),
        _fmt(step.get("median"), ".4g"),
        f"[{step['p25']:.4g}, {step['p75']:.4g}]" if step else "compile only",
        _fmt(r.get("images_per_s"), ".4g"),
        _fmt(r["flops"].get("analytic") or None, ".4g", 1e9),
        _fmt(r.get("flops_per_s", {}).get("analytic"), ".4g", 1e9),
        _fmt(r.get("model_flops_utilization"), ".1%"),
        _fmt(r.get("ratio_vs_conv_stack", {}).get("analytic"), ".3f"),
        _fmt(r.get("process_cpu_per_wall"), ".2f"),
        _fmt(mem.get("peak_bytes"), ".0f", _MIB),
        _fmt(mem.get("memory_analysis_per_device", {}).get("total_bytes"), ".0f", _MIB),
        _fmt(mem.get("residual_estimate_per_device", {}).get("total_bytes"), ".0f", _MIB),
        _fmt(
            mem.get("residual_estimate_per_device_by_layout", {})
            .get("fsdp", {})
            .get("total_bytes"),
            ".0f",
            _MIB,
        ),
    ]


def _fit_lines(r: dict[str, Any]) -> list[str]:
    """The ``--fit_device_bytes`` result of a record, one line per layout."""
    fits = r.get("memory", {}).get("widest_fitting", {})
    return [
        f"widest fitting ({layout}, {r['num_devices']} devices, batch {r['batch_size']}): "
        f"{fit['channels']} channels, {fit['num_params'] / 1e6:.1f}M parameters, "
        f"est {fit['residual_estimate_per_device']['total_bytes'] / 2**30:.1f} GiB per device"
        for layout, fit in fits.items()
    ]


def _error_line(r: dict[str, Any]) -> str:
    return (
        f"error: {r.get('num_devices', '-')} devices, batch {r.get('batch_size', '-')}: "
        f"{r['error']}"
    )


def _aligned(rows: list[list[str]]) -> list[str]:
    """The rows as lines: the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]


def _heading(env: dict[str, Any]) -> str:
    return (
        f"jax {env['jax_version']} on {env['backend']} ({env['device_kind']}, "
        f"{env['num_devices']} visible devices, {env['host_cpu_count']} host CPUs; "
        f"1-min load average {_fmt(env.get('load_average_1min_at_start'), '.1f')} at start, "
        f"{_fmt(env.get('load_average_1min'), '.1f')} at end)"
    )


def format_table(report: dict[str, Any]) -> str:
    """The results as a fixed-width text table, with a line on what the columns mean."""
    results = report["results"]
    errors = [_error_line(r) for r in results if r["part"] == "error"]
    fits = [line for r in results for line in _fit_lines(r)]
    rows = [list(_COLUMNS)] + [_row(r) for r in results if r["part"] != "error"]
    header, *body = _aligned(rows)
    sources = {r["memory"]["peak_source"] for r in results if "peak_source" in r.get("memory", {})}
    legend = _LEGEND + ("; ".join(sorted(sources)) or "not measured") + "."
    costs = [
        f"train / train_scalar ({c['num_devices']} devices, batch {c['batch_size']}): "
        f"{c['median']:.3f} [{c['p25']:.3f}, {c['p75']:.3f}] (median over rounds)"
        for c in report.get("train_vs_train_scalar", [])
    ]
    return "\n".join(
        [
            _heading(report["environment"]),
            header,
            "-" * len(header),
            *body,
            *fits,
            *errors,
            *costs,
            legend,
        ]
    )


def write_json(report: dict[str, Any], path: str) -> None:
    """Writes the report to ``path`` (creating its directory), keys sorted."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
