"""The accelerator check: its profile parser and finiteness check, and a tiny CPU run."""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys

import pytest
from runner_helpers import REPO, subprocess_env

from experiments import accelerator_check


def write_trace(root: str, events: list[dict]) -> None:
    folder = os.path.join(root, "plugins", "profile", "run")
    os.makedirs(folder)
    with gzip.open(os.path.join(folder, "host.trace.json.gz"), "wt") as f:
        json.dump({"traceEvents": events}, f)


def op(pid: int, name: str, dur: float, module: str = "jit_step") -> dict:
    args = {"hlo_op": name, "hlo_module": module}
    return {"ph": "X", "pid": pid, "tid": 1, "name": name, "dur": dur, "args": args}


def process(pid: int, name: str) -> dict:
    return {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}


def test_profile_sums_the_step_programs_ops_on_device_lanes(tmp_path):
    write_trace(
        str(tmp_path),
        [
            process(1, "/host:CPU"),
            process(2, "/device:GPU:0"),
            op(1, "fusion.1", 900.0),  # host-side launch of a device op: not counted
            op(2, "fusion.1", 300.0),
            op(2, "fusion.2", 100.0),
            op(2, "convolution.7", 600.0),
            op(2, "fusion.9", 5000.0, module="jit_other"),  # another program
            {"ph": "X", "pid": 2, "tid": 1, "name": "memcpy", "dur": 50.0},  # untagged
        ],
    )
    p = accelerator_check.profile_summary(str(tmp_path), steps=2, top=2)
    assert p["available"] and p["source"] == "hlo_op events on device lanes"
    assert p["hlo_module"] == "jit_other"  # The program that took the most time.
    ops = [op(2, "fusion.1", 300.0), op(2, "fusion.2", 100.0), op(2, "convolution.7", 600.0)]
    write_trace(str(tmp_path / "b"), [process(2, "/device:GPU:0"), *ops])
    p = accelerator_check.profile_summary(str(tmp_path / "b"), steps=2, top=2)
    assert p["op_s_per_step"] == pytest.approx(500e-6) and p["num_ops"] == 3
    assert [(r["op"], r["share"]) for r in p["top_ops"]] == [
        ("convolution.7", 0.6),
        ("fusion.1", 0.3),
    ]
    assert [(r["kind"], r["s_per_step"]) for r in p["top_kinds"]] == [
        ("convolution", pytest.approx(300e-6)),
        ("fusion", pytest.approx(200e-6)),
    ]


def test_profile_without_operation_events_says_so(tmp_path):
    write_trace(
        str(tmp_path), [process(1, "/host:CPU"), {"ph": "X", "pid": 1, "name": "x", "dur": 1}]
    )
    p = accelerator_check.profile_summary(str(tmp_path), steps=1)
    assert not p["available"] and str(tmp_path) in p["reason"]


def test_nonfinite_names_every_bad_number():
    summary = {"a": 1.0, "b": {"c": math.nan, "d": [2, math.inf]}, "e": None, "f": True}
    assert accelerator_check.nonfinite(summary) == ["b.c", "b.d[1]"]
    assert accelerator_check.nonfinite({"a": 0.0, "b": [1, 2]}) == []


@pytest.mark.slow
def test_tiny_cpu_run_reports_finite_figures(tmp_path):
    """The whole command at --size=tiny on one CPU device for 3 steps (~40 s here)."""
    out = tmp_path / "check.json"
    env = subprocess_env()
    env.pop("XLA_FLAGS", None)  # One device, as a user's CPU run.
    result = subprocess.run(
        [
            *(sys.executable, "-m", "experiments.accelerator_check", "--size=tiny"),
            *("--steps=3", "--warmup=1", "--profile_steps=2", f"--json={out}"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    s = report["summary"]
    assert report["nonfinite"] == [] and s["dtype"] == "bfloat16" and s["batch_size"] == 8
    assert s["platform"] == "cpu" and s["num_devices"] == 1 and s["steps_timed"] == 3
    assert s["images_per_s"] == pytest.approx(8 / s["step_s_median"])
    assert s["model_flops_per_s"] == pytest.approx(s["model_flops_per_step"] / s["step_s_median"])
    assert s["model_flops_utilization"] is None and "peak FLOP/s of 'cpu' unknown" in s["peak_note"]
    assert s["xla_memory_per_device"]["total_bytes"] > 0
    assert all(math.isfinite(v) for v in s["last_step_metrics"].values())
    p = report["profile"]
    assert p["available"] and p["top_ops"] and 0 < sum(r["share"] for r in p["top_ops"]) <= 1
    assert "MFU: peak unknown" in result.stdout and "top ops:" in result.stdout
