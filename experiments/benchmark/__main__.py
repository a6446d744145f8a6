"""``python -m experiments.benchmark``: the command line (see the package's docstring)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import jax
from absl import app, flags
from ml_collections import config_flags

from experiments.benchmark import options, report, sweep
from experiments.benchmark.parts import DEFAULT_PARTS, PARTS
from vdm_jax.runner import sharding

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, not on import)."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file.")
    flags.DEFINE_string("json", None, "Write the results to this JSON file.")
    flags.DEFINE_integer("steps", 10, "Timed steps per measurement.")
    flags.DEFINE_integer(
        "warmup",
        2,
        "Untimed steps of each part before the timed ones (>= 1; peak memory is taken over them).",
    )
    flags.DEFINE_list(
        "batch_sizes", [], "Global batch sizes to sweep (default: config.training.batch_size)."
    )
    flags.DEFINE_list(
        "device_counts", [], "Device counts to sweep (default: every device JAX sees)."
    )
    flags.DEFINE_enum(
        "device_count_mode",
        "auto",
        list(options.DEVICE_COUNT_MODES),
        "How to run a device count: 'subprocess' (CPU: a child with that many simulated "
        "devices), 'submesh' (the first N devices of this process); 'auto': subprocess on CPU "
        "when N differs from the devices this process sees, submesh otherwise.",
    )
    flags.DEFINE_list(
        "parts",
        list(DEFAULT_PARTS),
        f"What to measure, of {tuple(PARTS)} ('train_scalar': the train step with the base "
        "scalar schedule instead of the config's, timed in the same rounds).",
    )
    flags.DEFINE_boolean(
        "memory_only", False, "Only compile the train step on abstract inputs: memory and FLOPs."
    )
    flags.DEFINE_float(
        "fit_device_bytes",
        0.0,
        "With --memory_only: also find the widest U-Net (model.channels) whose estimate fits "
        "this many bytes per device, replicated and split (e.g. 80e9).",
    )
    flags.DEFINE_float(
        "peak_flops",
        0.0,
        "One device's peak FLOP/s for the model-FLOP utilisation column (default: the chip's "
        "dense bfloat16 peak where the device kind is known, e.g. H100, A100, TPU v4/v5/v6).",
    )
    flags.DEFINE_integer(
        "conv_stack_depth", 0, "3x3 convs in the baseline stack (0: match the model's conv FLOPs)."
    )
    flags.DEFINE_integer("sample_steps", 1, "Sampler steps per timed call.")
    flags.DEFINE_string(
        "profile_dir",
        None,
        "Write a jax.profiler trace (and Perfetto JSON) of the first batch size's timed steps.",
    )


def _parse_ints(values: Sequence[str], name: str) -> list[int]:
    """A comma-separated list flag's positive integers."""
    try:
        out = [int(v) for v in values if str(v).strip()]
    except ValueError as e:
        raise app.UsageError(f"--{name} must be comma-separated integers, got {values}") from e
    if any(v < 1 for v in out):
        raise app.UsageError(f"--{name} must be positive, got {out}")
    return out


def _options_from_flags() -> options.Options:
    return options.make_options(
        steps=FLAGS.steps,
        warmup=FLAGS.warmup,
        batch_sizes=_parse_ints(FLAGS.batch_sizes, "batch_sizes"),
        device_counts=_parse_ints(FLAGS.device_counts, "device_counts"),
        device_count_mode=FLAGS.device_count_mode,
        parts=list(FLAGS.parts),
        memory_only=FLAGS.memory_only,
        fit_device_bytes=FLAGS.fit_device_bytes,
        peak_flops=FLAGS.peak_flops,
        conv_stack_depth=FLAGS.conv_stack_depth,
        sample_steps=FLAGS.sample_steps,
        profile_dir=FLAGS.profile_dir,
    )


def main(argv: list[str]) -> None:
    """Runs the benchmark, prints its table, writes ``--json``; exits 1 if a point failed."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config is None:
        raise app.UsageError("--config is required")
    benchmark_options = _options_from_flags()
    sharding.initialize_distributed()  # Joins a multi-host run; nothing for one process.
    result = sweep.run(FLAGS.config, benchmark_options, argv=sys.argv)
    if jax.process_index() != 0:
        return
    print(report.format_table(result), flush=True)
    if FLAGS.json:
        report.write_json(result, FLAGS.json)
        print(f"Wrote {FLAGS.json}")
    if any(r["part"] == "error" for r in result["results"]):
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
