r"""Benchmark: speed, FLOP rate and memory of the training, eval and sampler steps.

  python -m experiments.benchmark --config=configs/cifar10.py --batch_sizes=4 --steps=5 \
      --json=/tmp/bench.json

On whatever devices JAX sees (CPU here, GPU/TPU elsewhere) it measures, for each batch size
of ``--batch_sizes`` and each device count of ``--device_counts``:

* ``train``: the runner's own jitted step (``train.make_train_step``: batch sharded, state
  replicated and donated), on a fixed random batch (data loading is not timed);
* ``eval``: the runner's eval step (``evaluate.make_eval_step``, as ``config.eval`` sets it:
  by default the ELBO with ``eval.num_time_samples`` network evaluations per image) on the
  EMA parameters;
* ``sample``: the runner's sampler (``evaluate.make_sample_fn``) run for ``--sample_steps``
  steps; the figures are per sampler step;
* ``conv_stack``: a plain stack of 3x3 convolutions at the model's width, resolution, batch
  and compute dtype, forward + backward + SGD update (kernels donated), jitted with the same
  shardings, timed the same way in the same process. Its depth matches the model's conv
  FLOPs unless ``--conv_stack_depth`` says otherwise.

For each: compile time (trace + lower + compile); seconds per step over ``--steps`` timed
steps after ``--warmup`` untimed ones: median, quartiles, min and max; images per second (at
the median); FLOPs per step and achieved FLOP/s; peak memory; and XLA's memory estimate of
the compiled program (``compiled.memory_analysis()``). The parts' timed steps run
round-robin (train, eval, sample, conv stack, train, ...), each waited for with
``jax.block_until_ready`` before the clock stops, so that a change in the machine's load
during the run affects every part alike and their FLOP-rate ratio stays fair.

FLOPs (``vdm_jax.flops``): ``analytic`` is the closed-form count of the network's
convolutions and matrix products (3x the forward for a training step), ``jaxpr`` the same
operations counted in the traced program (a check on ``analytic``; it also counts
rematerialised forwards), ``xla`` XLA's ``cost_analysis()`` of the compiled program (all
operations, summed over devices; a loop body counts once). ``ratio_vs_conv_stack`` divides
the part's analytic FLOP/s by the conv stack's analytic FLOP/s in the same round, median over
rounds (quartiles in ``ratio_vs_conv_stack_quartiles``): the fraction of a plain conv
stack's speed the model reaches, comparable across machines.

Peak memory is the device's ``peak_bytes_in_use`` where the backend reports it (a high-water
mark over the process's life), else the process's peak resident set size over the part's
warm-up steps, reset before them (Linux ``/proc/self/clear_refs``); ``start_bytes`` is the
resident size when they began (the process's baseline and every part's buffers).
``process_cpu_per_wall`` is this process's CPU seconds (all threads) per wall second while
stepping: near the core count when the benchmark had a CPU host to itself, lower when other
processes competed (the 1-minute load average at start and end is in ``environment``).

Device counts: on CPU, each count other than the number of devices this process sees runs in
a child process started with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``, so that
every measurement sees exactly the devices it uses, as a training run would. (A sub-mesh of
a process with more simulated devices would share the process's thread pools with idle
devices.) On GPU/TPU the counts are sub-meshes of the real devices. ``--device_count_mode``
overrides the choice.

``--memory_only`` compiles the training step on abstract inputs (``jax.ShapeDtypeStruct``,
nothing allocated) and reports XLA's memory estimate and FLOP counts only, e.g. for the
ImageNet 64x64 model at batch 64::

  python -m experiments.benchmark --config=configs/imagenet64.py --batch_sizes=64 \
      --memory_only --json=/tmp/imagenet64_memory.json

Run it on the backend whose memory matters: XLA:CPU's estimate does not shrink with
``model.remat`` or ``model.dtype=bfloat16`` (its scheduler keeps rematerialised activations
live, and it computes bfloat16 in float32), while GPU and TPU compilers do. Next to it,
``residual_estimate_per_device`` ("est MiB") is backend-independent: the train state, one
copy of the gradients, and the activations the backward pass keeps (the residuals of
``jax.vjp``, read off the traced program, which ``remat`` and ``bfloat16`` do shrink).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import inspect
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from jax.sharding import Mesh
from ml_collections import config_flags

from vdm_jax import config_validation, data, evaluate, flops, model, sharding, state, train, unet

PARTS = ("train", "eval", "sample", "conv_stack")
DEVICE_COUNT_MODES = ("auto", "subprocess", "submesh")
SCHEMA_VERSION = 1
_MIB = 2**20
FLAGS = flags.FLAGS

# ----------------------------------------------------------------------------- options


def _parse_ints(values: Sequence[str], name: str) -> list[int]:
    try:
        out = [int(v) for v in values if str(v).strip()]
    except ValueError as e:
        raise app.UsageError(f"--{name} must be comma-separated integers, got {values}") from e
    if any(v < 1 for v in out):
        raise app.UsageError(f"--{name} must be positive, got {out}")
    return out


def make_options(**overrides: Any) -> dict[str, Any]:
    """The benchmark's options with their defaults, as a plain dict (also written to JSON).

    Keys: ``steps``, ``warmup``, ``batch_sizes`` (list; empty: the config's training batch),
    ``device_counts`` (list; empty: all devices), ``device_count_mode``, ``parts``,
    ``memory_only``, ``conv_stack_depth``, ``sample_steps``, ``profile_dir``.
    """
    options = {
        "steps": 10,
        "warmup": 2,
        "batch_sizes": [],
        "device_counts": [],
        "device_count_mode": "auto",
        "parts": list(PARTS),
        "memory_only": False,
        "conv_stack_depth": 0,
        "sample_steps": 1,
        "profile_dir": None,
    }
    unknown = set(overrides) - set(options)
    if unknown:
        raise ValueError(f"unknown benchmark options {sorted(unknown)}; allowed: {sorted(options)}")
    options.update(overrides)
    bad_parts = set(options["parts"]) - set(PARTS)
    if bad_parts:
        raise ValueError(f"unknown parts {sorted(bad_parts)}; allowed: {PARTS}")
    if options["device_count_mode"] not in DEVICE_COUNT_MODES:
        raise ValueError(f"device_count_mode must be one of {DEVICE_COUNT_MODES}")
    if options["steps"] < 1 or options["warmup"] < 1 or options["sample_steps"] < 1:
        raise ValueError("need steps >= 1, warmup >= 1 and sample_steps >= 1")
    return options


# ----------------------------------------------------------------------------- measuring


class MemoryProbe:
    """Peak memory over an interval: device peak where reported, else process peak RSS."""

    def __init__(self, devices: Sequence[jax.Device]):
        self.devices = list(devices)
        stats = [d.memory_stats() for d in self.devices]
        self.device_stats = all(s and "peak_bytes_in_use" in s for s in stats)
        self.source = (
            "device peak_bytes_in_use (max over devices, process lifetime)"
            if self.device_stats
            else "process peak RSS since the measurement began (VmHWM)"
        )

    def reset(self) -> None:
        """Starts the interval (resets the process's RSS high-water mark where possible)."""
        if self.device_stats:
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.source = "process peak RSS over its lifetime (ru_maxrss)"

    def peak_bytes(self) -> int:
        if self.device_stats:
            return max(int(d.memory_stats()["peak_bytes_in_use"]) for d in self.devices)
        try:
            with open("/proc/self/status") as f:
                match = re.search(r"VmHWM:\s+(\d+)\s+kB", f.read())
            if match:
                return int(match.group(1)) * 1024
        except OSError:
            pass
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def current_bytes(self) -> int | None:
        """Bytes in use now: the device's ``bytes_in_use``, else the process's RSS."""
        if self.device_stats:
            return max(int(d.memory_stats().get("bytes_in_use", 0)) for d in self.devices)
        try:
            with open("/proc/self/status") as f:
                match = re.search(r"VmRSS:\s+(\d+)\s+kB", f.read())
            return int(match.group(1)) * 1024 if match else None
        except OSError:
            return None


def summarize(seconds: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles, min, max, mean and every sample of per-step seconds."""
    s = np.asarray(seconds, np.float64)
    q25, q50, q75 = np.percentile(s, [25, 50, 75])
    return {
        "median": float(q50),
        "p25": float(q25),
        "p75": float(q75),
        "min": float(s.min()),
        "max": float(s.max()),
        "mean": float(s.mean()),
        "n": int(s.size),
        "all": [float(v) for v in s],
    }


def compile_stats(compiled: Any, num_devices: int) -> dict[str, Any]:
    """XLA's memory estimate (bytes, per device) and FLOP count of a compiled program."""
    out: dict[str, Any] = {}
    try:
        mem = compiled.memory_analysis()
    except Exception:  # A backend may not implement it.
        mem = None
    if mem is not None:
        fields = ("argument", "output", "alias", "temp", "generated_code")
        memory = {f"{f}_bytes": int(getattr(mem, f"{f}_size_in_bytes", 0)) for f in fields}
        # Live at the peak: inputs, outputs not aliased to (donated) inputs, and temporaries.
        memory["total_bytes"] = (
            memory["argument_bytes"]
            + memory["output_bytes"]
            - memory["alias_bytes"]
            + memory["temp_bytes"]
        )
        out["memory_analysis_per_device"] = memory
    try:
        cost = compiled.cost_analysis()
    except Exception:  # A backend may not implement it.
        cost = None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if cost and "flops" in cost:
        # The compiled program is one device's share of an SPMD program.
        out["xla_flops"] = float(cost["flops"]) * num_devices
        if "bytes accessed" in cost:
            out["xla_bytes_accessed"] = float(cost["bytes accessed"]) * num_devices
    return out


def compile_traced(traced: Any) -> tuple[Any, float]:
    """Lowers and compiles a ``jax.stages.Traced``; returns (compiled, seconds)."""
    start = time.perf_counter()
    compiled = traced.lower().compile()
    return compiled, time.perf_counter() - start


@dataclasses.dataclass
class Part:
    """One compiled program to time, and what its table row says about it.

    Attributes:
      name: ``train``, ``eval``, ``sample`` or ``conv_stack``.
      call: runs the compiled program once and returns its outputs (keeping any state, such
        as a donated train state, between calls).
      calls_per_step: steps one call runs (the sampler's ``--sample_steps``); a step's time
        is the call's divided by it.
      record: the row so far (compile time, FLOPs, XLA's memory estimate, extras).
    """

    name: str
    call: Callable[[], Any]
    calls_per_step: int
    record: dict[str, Any]


def prepare(
    name: str,
    jitted: Any,
    args: tuple[Any, ...],
    *,
    run: Callable[[Any], Callable[[], Any]],
    images_per_call: int,
    calls_per_step: int,
    analytic_flops: float,
    num_devices: int,
) -> Part:
    """Traces and compiles one jitted function (timed) and counts its FLOPs.

    Args:
      name: the part.
      jitted: a ``jax.jit`` function.
      args: its example arguments (compiled for them).
      run: ``compiled -> (() -> outputs)``: one call of the compiled program.
      images_per_call: images one call processes.
      calls_per_step: steps one call runs.
      analytic_flops: closed-form conv/matmul FLOPs of one call.
      num_devices: devices of the mesh.
    """
    start = time.perf_counter()
    traced = jitted.trace(*args)
    trace_s = time.perf_counter() - start
    jaxpr_count = flops.jaxpr_flops(traced.jaxpr)
    compiled, compile_s = compile_traced(traced)
    stats = compile_stats(compiled, num_devices)
    record: dict[str, Any] = {
        "part": name,
        "compile_s": trace_s + compile_s,
        "trace_s": trace_s,
        "images_per_call": images_per_call,
        "flops": {
            "analytic": float(analytic_flops) / calls_per_step,
            "jaxpr": float(jaxpr_count) / calls_per_step,
            # XLA counts a loop body once: right for one sampler step, not for the eval
            # step's loop over eval.num_time_samples.
            "xla": stats.pop("xla_flops", 0.0) / calls_per_step,
        },
        "memory": stats,
    }
    return Part(name, run(compiled), calls_per_step, record)


def time_parts(
    parts: Sequence[Part], options: dict[str, Any], probe: MemoryProbe
) -> list[dict[str, Any]]:
    """Warms each part up (measuring its peak memory), then times them round-robin.

    Each part first runs ``warmup`` (at least 1) untimed calls alone, over which its peak
    memory is taken. Then ``steps`` rounds each time one call of every part, in turn, so that
    a change in the machine's load during the run (other processes, clock changes) affects
    all parts alike and their ratio stays fair. Each call is waited for
    (``jax.block_until_ready``) before the clock stops: a time is one step's latency,
    dispatch included.

    Returns:
      The parts' finished records.
    """
    for part in parts:
        probe.reset()
        start_bytes = probe.current_bytes()
        for _ in range(max(options["warmup"], 1)):
            jax.block_until_ready(part.call())
        part.record["memory"].update(
            peak_bytes=probe.peak_bytes(), start_bytes=start_bytes, peak_source=probe.source
        )
    seconds: dict[str, list[float]] = {p.name: [] for p in parts}
    cpu_seconds: dict[str, list[float]] = {p.name: [] for p in parts}
    profile = options.get("profile_dir")
    with jax.profiler.trace(profile, create_perfetto_trace=True) if profile else _no_context():
        for _ in range(options["steps"]):
            for part in parts:
                cpu_start, start = time.process_time(), time.perf_counter()
                jax.block_until_ready(part.call())
                wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
                seconds[part.name].append(wall / part.calls_per_step)
                cpu_seconds[part.name].append(cpu / part.calls_per_step)
    records = []
    for part in parts:
        rec = part.record
        rec["step_s"] = timing = summarize(seconds[part.name])
        # This process's CPU time (all threads) per step over its wall time: about the
        # number of cores when it had the machine to itself, less when others competed.
        rec["process_cpu_per_wall"] = float(np.median(cpu_seconds[part.name]) / timing["median"])
        rec["images_per_s"] = rec.pop("images_per_call") / part.calls_per_step / timing["median"]
        rec["flops_per_s"] = {k: v / timing["median"] for k, v in rec["flops"].items() if v}
        records.append(rec)
    return records


@contextlib.contextmanager
def _no_context() -> Iterator[None]:
    yield


# ----------------------------------------------------------------------------- the parts


def dataset_info(config: ml_collections.ConfigDict) -> data.DatasetInfo:
    """The dataset's registered facts (shape, K, classes) without opening any data."""
    name = config.data.name
    if name not in data.DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed names: {sorted(data.DATASETS)}")
    spec = data.DATASETS[name]
    return data.DatasetInfo(name, spec.shape, spec.vocab_size, spec.num_classes, 0, 0)


def random_batch(
    config: ml_collections.ConfigDict,
    info: data.DatasetInfo,
    mesh: Mesh,
    batch_size: int,
    *,
    train: bool,
) -> dict[str, jax.Array]:
    """A fixed batch of random integer images (and labels), sharded as the runner does.

    ``batch_size`` is global: each process makes its own ``batch_size / process_count`` rows.
    """
    rows = batch_size // jax.process_count()
    rng = np.random.default_rng([config.seed, jax.process_index()])
    raw = {
        "image": rng.integers(0, info.vocab_size, (rows, *info.shape), dtype=np.int32),
        "label": rng.integers(0, max(info.num_classes, 1), (rows,), dtype=np.int32),
    }
    batch = evaluate.model_batch(raw, config.model.conditioning, train=train)
    return sharding.global_batch(batch, mesh)


def abstract_batch(
    config: ml_collections.ConfigDict, info: data.DatasetInfo, mesh: Mesh, batch_size: int
) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and shardings of a training batch, for compiling without data."""
    spec = sharding.batch_sharding(mesh)
    batch = {"image": jax.ShapeDtypeStruct((batch_size, *info.shape), jnp.int32, sharding=spec)}
    if config.model.conditioning != "none":
        batch["label"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=spec)
    return batch


def _eval_step(
    config: ml_collections.ConfigDict, info: data.DatasetInfo, vdm: Any, mesh: Mesh
) -> tuple[Any, tuple[Any, ...], int | None]:
    """The runner's jitted eval step, its arguments after ``(params, batch, key)``, and the
    network evaluations per image (None when adaptive: the probability-flow ODE).

    Follows ``evaluate.make_eval_step``: the config-driven step ``(params, batch, key,
    proposal)`` (``eval.method``, ``eval.time_sampling``; a uniform time proposal is passed),
    or the ELBO-only ``(params, batch, key)`` step of earlier versions.
    """
    if next(iter(inspect.signature(evaluate.make_eval_step).parameters)) == "config":
        step = evaluate.make_eval_step(config, info, vdm, mesh)
        bins = getattr(evaluate, "PROPOSAL_BINS", 1)
        proposal = jax.device_put(
            jnp.full((bins,), 1.0 / bins, jnp.float32), sharding.replicated(mesh)
        )
        extra: tuple[Any, ...] = (proposal,)
    else:
        loss_cfg = state.loss_config(config, info)
        step = evaluate.make_eval_step(vdm, loss_cfg, config.eval.num_time_samples, mesh)
        extra = ()
    adaptive = config.eval.get("method", "elbo") == "ode"
    return step, extra, None if adaptive else config.eval.num_time_samples


def conv_stack_step(mesh: Mesh, dtype: Any) -> Any:
    """A jitted SGD step of a plain stack of 3x3 convs: ``(kernels, x) -> kernels``.

    The loss is ``mean(stack(x)^2)``; kernels (float32, cast to ``dtype`` like Flax's
    ``Conv``) are replicated and donated, ``x`` [B, H, W, C] is sharded over the batch.
    """

    def loss(kernels: list[jax.Array], x: jax.Array) -> jax.Array:
        h = x.astype(dtype)
        for k in kernels:
            h = jax.lax.conv_general_dilated(
                h, k.astype(dtype), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        return jnp.mean(jnp.square(h.astype(jnp.float32)))

    def step(kernels: list[jax.Array], x: jax.Array) -> list[jax.Array]:
        grads = jax.grad(loss)(kernels, x)
        return jax.tree.map(lambda k, g: k - 1e-3 * g, kernels, grads)

    replicated = sharding.replicated(mesh)
    return jax.jit(
        step,
        in_shardings=(replicated, sharding.batch_sharding(mesh)),
        out_shardings=replicated,
        donate_argnums=0,
    )


def conv_stack_depth(vdm: Any, batch_size: int, info: data.DatasetInfo, requested: int) -> int:
    """``requested``, or the number of width->width 3x3 convs with the model's conv FLOPs."""
    if requested > 0:
        return requested
    return max(1, round(flops.equivalent_conv_layers(vdm.score_net, batch_size, info.shape)))


def _benchmark_point(
    config: ml_collections.ConfigDict,
    info: data.DatasetInfo,
    mesh: Mesh,
    vdm: Any,
    train_state: Any,
    batch_size: int,
    options: dict[str, Any],
    probe: MemoryProbe,
) -> tuple[list[dict[str, Any]], Any]:
    """All parts at one batch size on one mesh; returns (records, the train state after)."""
    names, n = options["parts"], mesh.size
    net = vdm.score_net
    forward = flops.unet_forward_flops(net, batch_size, info.shape)
    replicated = sharding.replicated(mesh)
    key = jax.device_put(jax.random.PRNGKey(config.seed), replicated)
    # The train step donates its state: every part reads the live one.
    live = {"state": train_state}
    parts: list[Part] = []

    if "train" in names:
        batch = random_batch(config, info, mesh, batch_size, train=True)

        def run_train(compiled: Any) -> Callable[[], Any]:
            def call() -> Any:
                live["state"], metrics = compiled(live["state"], batch)
                return live["state"], metrics

            return call

        parts.append(
            prepare(
                "train",
                train.make_train_step(config, info, vdm, mesh),
                (train_state, batch),
                run=run_train,
                images_per_call=batch_size,
                calls_per_step=1,
                analytic_flops=flops.TRAIN_FLOPS_PER_FORWARD * forward,
                num_devices=n,
            )
        )

    if "eval" in names:
        eval_step, extra, evals_per_image = _eval_step(config, info, vdm, mesh)
        eval_batch = random_batch(config, info, mesh, batch_size, train=False)
        part = prepare(
            "eval",
            eval_step,
            (train_state.ema_params, eval_batch, key, *extra),
            run=lambda compiled: (
                lambda: compiled(live["state"].ema_params, eval_batch, key, *extra)
            ),
            images_per_call=batch_size,
            calls_per_step=1,
            analytic_flops=evals_per_image * forward if evals_per_image else 0.0,
            num_devices=n,
        )
        part.record["eval_method"] = config.eval.get("method", "elbo")
        part.record["network_evals_per_image"] = evals_per_image
        parts.append(part)

    if "sample" in names:
        sample_config = copy.deepcopy(config)
        sample_config.sample.batch_size = batch_size
        sample_config.sample.num_steps = options["sample_steps"]
        part = prepare(
            "sample",
            evaluate.make_sample_fn(sample_config, info, vdm, mesh),
            (train_state.ema_params, key),
            run=lambda compiled: lambda: compiled(live["state"].ema_params, key),
            images_per_call=batch_size,
            calls_per_step=options["sample_steps"],
            analytic_flops=options["sample_steps"] * forward,
            num_devices=n,
        )
        part.record["sample_steps_per_call"] = options["sample_steps"]
        parts.append(part)

    if "conv_stack" in names:
        depth = conv_stack_depth(vdm, batch_size, info, options["conv_stack_depth"])
        h, w, _ = info.shape
        width = net.channels
        rng = np.random.default_rng(config.seed)
        scale = 1.0 / math.sqrt(9 * width)  # Variance preserving: activations stay O(1).
        kernels = [
            jax.device_put(
                (scale * rng.standard_normal((3, 3, width, width))).astype(np.float32), replicated
            )
            for _ in range(depth)
        ]
        rows = batch_size // jax.process_count()  # This process's rows of the global batch.
        local_x = rng.standard_normal((rows, h, w, width)).astype(np.float32)
        x = sharding.global_batch({"x": local_x}, mesh)["x"]
        live["kernels"] = kernels

        def run_stack(compiled: Any) -> Callable[[], Any]:
            def call() -> Any:
                live["kernels"] = compiled(live["kernels"], x)
                return live["kernels"]

            return call

        part = prepare(
            "conv_stack",
            conv_stack_step(mesh, state.DTYPES[config.model.dtype]),
            (kernels, x),
            run=run_stack,
            images_per_call=batch_size,
            calls_per_step=1,
            analytic_flops=flops.TRAIN_FLOPS_PER_FORWARD
            * depth
            * flops.conv3x3_flops(batch_size, h, w, width, width),
            num_devices=n,
        )
        part.record.update(depth=depth, width=width, dtype=config.model.dtype)
        parts.append(part)

    records = time_parts(parts, options, probe)
    _add_ratios(records)
    for rec in records:
        rec.update(batch_size=batch_size, num_devices=n)
    return records, live["state"]


def _add_ratios(records: list[dict[str, Any]]) -> None:
    """Each model part's FLOP/s over the conv stack's, per counting method.

    The ratio is taken per round (the part's step and the conv stack's step of the same
    round, seconds apart) and the median over rounds is reported, with quartiles: a drift in
    the machine's speed during the run (other tenants, clocks) cancels within a round but not
    between the two parts' separate medians.
    """
    stack = next((r for r in records if r["part"] == "conv_stack"), None)
    if stack is None:
        return
    stack_s = np.asarray(stack["step_s"]["all"], np.float64)
    for rec in records:
        if rec["part"] == "conv_stack":
            continue
        part_s = np.asarray(rec["step_s"]["all"], np.float64)
        ratios, quartiles = {}, {}
        for k in ("analytic", "xla"):
            if rec["flops"].get(k) and stack["flops"].get(k):
                per_round = (rec["flops"][k] / part_s) / (stack["flops"][k] / stack_s)
                q25, q50, q75 = np.percentile(per_round, [25, 50, 75])
                ratios[k], quartiles[k] = float(q50), [float(q25), float(q75)]
        rec["ratio_vs_conv_stack"] = ratios
        rec["ratio_vs_conv_stack_quartiles"] = quartiles


def _tree_bytes(tree: Any) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def saved_activation_bytes(
    config: ml_collections.ConfigDict,
    info: data.DatasetInfo,
    vdm: Any,
    params: Any,
    batch: dict[str, Any],
) -> int:
    """Bytes the backward pass keeps from the forward pass, for the whole batch.

    The residuals of ``jax.vjp`` of the negative ELBO with respect to the parameters, read
    off the traced program (``jax.eval_shape``: nothing is computed or allocated). They are
    what ``model.remat`` and ``model.dtype`` change, and unlike XLA:CPU's memory estimate
    they do not depend on a backend's scheduler. Parameters the backward reads again are
    counted too, so this overestimates by at most one copy of them in the compute dtype.
    The loss is the evaluation ELBO, without dropout: a model trained with dropout also
    keeps its masks (one byte per masked activation).
    """
    loss_cfg = state.loss_config(config, info)

    def residuals(p: Any, b: dict[str, Any]) -> Any:
        def loss(p_: Any) -> jax.Array:
            terms = model.vdm_terms(vdm, p_, b, jax.random.key(0), loss_cfg)
            return jnp.mean(sum(terms.values()))

        return jax.vjp(loss, p)[1]

    return _tree_bytes(jax.eval_shape(residuals, params, batch))


def _memory_only_point(
    config: ml_collections.ConfigDict,
    info: data.DatasetInfo,
    mesh: Mesh,
    vdm: Any,
    batch_size: int,
) -> dict[str, Any]:
    """Compiles the train step on abstract inputs: XLA's memory estimate and FLOP counts.

    Also a backend-independent estimate of one device's memory at the step's peak: the
    train state (parameters, EMA, optimizer moments; replicated), one copy of the
    gradients, and the device's share of :func:`saved_activation_bytes` (the batch is
    sharded). The working set of the one block being differentiated comes on top.
    """
    optimizer = state.create_optimizer(config)
    abstract_state = state.abstract_train_state(config, info, vdm, optimizer, mesh)
    batch = abstract_batch(config, info, mesh, batch_size)
    state_bytes = _tree_bytes((abstract_state.params, abstract_state.ema_params))
    state_bytes += _tree_bytes(abstract_state.opt_state)
    grad_bytes = _tree_bytes(abstract_state.params)
    activation_bytes = saved_activation_bytes(config, info, vdm, abstract_state.params, batch)
    estimate = {
        "train_state_bytes": state_bytes,
        "gradient_bytes": grad_bytes,
        "saved_activation_bytes": activation_bytes // mesh.size,
        "total_bytes": state_bytes + grad_bytes + activation_bytes // mesh.size,
    }
    step_fn = train.make_train_step(config, info, vdm, mesh)
    start = time.perf_counter()
    traced = step_fn.trace(abstract_state, batch)
    trace_s = time.perf_counter() - start
    compiled, compile_s = compile_traced(traced)
    stats = compile_stats(compiled, mesh.size)
    forward = flops.unet_forward_flops(vdm.score_net, batch_size, info.shape)
    return {
        "part": "train",
        "memory_only": True,
        "batch_size": batch_size,
        "num_devices": mesh.size,
        "compile_s": trace_s + compile_s,
        "trace_s": trace_s,
        "flops": {
            "analytic": float(flops.TRAIN_FLOPS_PER_FORWARD * forward),
            "jaxpr": float(flops.jaxpr_flops(traced.jaxpr)),
            "xla": stats.pop("xla_flops", 0.0),
        },
        "memory": {**stats, "residual_estimate_per_device": estimate},
        "num_params": int(unet.count_params(abstract_state.params)),
    }


# ----------------------------------------------------------------------------- the sweep


def _config_for(config: ml_collections.ConfigDict, batch_size: int) -> ml_collections.ConfigDict:
    cfg = copy.deepcopy(config)
    cfg.training.batch_size = batch_size
    cfg.eval.batch_size = batch_size
    cfg.sample.batch_size = batch_size
    return cfg


def run_on_mesh(
    config: ml_collections.ConfigDict,
    options: dict[str, Any],
    devices: Sequence[jax.Device],
) -> list[dict[str, Any]]:
    """Every batch size of ``options`` on a mesh over ``devices``; the result records."""
    info = dataset_info(config)
    mesh = sharding.make_mesh(devices)
    batch_sizes = options["batch_sizes"] or [config.training.batch_size]
    records: list[dict[str, Any]] = []
    train_state = None
    probe = MemoryProbe(devices)
    options = dict(options)
    for batch_size in batch_sizes:
        cfg = _config_for(config, batch_size)
        try:
            config_validation.validate(
                cfg, num_devices=mesh.size, process_count=jax.process_count(), info=info
            )
            vdm = state.create_model(cfg, info)
            if options["memory_only"]:
                records.append(_memory_only_point(cfg, info, mesh, vdm, batch_size))
            else:
                if train_state is None:
                    optimizer = state.create_optimizer(cfg)
                    train_state = state.create_train_state(cfg, info, vdm, optimizer, mesh)
                point, train_state = _benchmark_point(
                    cfg, info, mesh, vdm, train_state, batch_size, options, probe
                )
                records.extend(point)
                options["profile_dir"] = None  # One trace is enough.
        except Exception as e:  # One failed point must not lose the others.
            traceback.print_exc()
            records.append(
                {
                    "part": "error",
                    "batch_size": batch_size,
                    "num_devices": mesh.size,
                    "error": f"{type(e).__name__}: {e}",
                }
            )
        for rec in records:
            rec.setdefault("device_kind", devices[0].device_kind)
            rec.setdefault("platform", devices[0].platform)
    return records


def _child_argv(argv: Sequence[str], num_devices: int, json_path: str) -> list[str]:
    """This command line for one device count in a child process."""
    replaced = ("--device_counts", "--json", "--device_count_mode", "--profile_dir")
    out, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
            continue
        if arg in replaced:
            skip = True  # "--flag value": drop the value too.
            continue
        if arg.startswith(tuple(f"{r}=" for r in replaced)):
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
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    kept = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{kept} --xla_force_host_platform_device_count={num_devices}".strip()
    return env


def run_in_child(argv: Sequence[str], num_devices: int) -> list[dict[str, Any]]:
    """Runs this benchmark in a child process with ``num_devices`` simulated CPU devices."""
    with tempfile.TemporaryDirectory(prefix="vdm_benchmark_") as tmp:
        path = os.path.join(tmp, "child.json")
        env = _child_env(num_devices)
        # The child's table goes to its stdout, kept out of ours; its log stays visible.
        result = subprocess.run(
            _child_argv(argv, num_devices, path),
            env=env,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            stdout=subprocess.PIPE,
            text=True,
        )
        if not os.path.exists(path):
            print(result.stdout, file=sys.stderr)
            return [
                {
                    "part": "error",
                    "num_devices": num_devices,
                    "error": f"child process exited with {result.returncode} and no results",
                }
            ]
        with open(path) as f:
            records = json.load(f)["results"]
    for rec in records:
        rec["run_in"] = f"child process, XLA_FLAGS={env['XLA_FLAGS']}"
    return records


def environment() -> dict[str, Any]:
    """Versions, devices and host of this run."""
    devices = jax.devices()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
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
        "git_commit": commit,
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_1min": _load_average(),
    }


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


FLOP_COUNTING = (
    "flops.analytic: closed-form conv/matmul FLOPs of the U-Net (2 per multiply-add; 3x the "
    "forward for a train step, num_time_samples x for eval, 1x per sampler step; elementwise "
    "ops not counted). flops.jaxpr: conv_general_dilated and dot_general FLOPs counted in the "
    "traced program (includes rematerialised forwards). flops.xla: compiled.cost_analysis() "
    "['flops'] x devices (all ops). ratio_vs_conv_stack: analytic (and xla) FLOP/s of the "
    "part over the conv stack's in the same timing round (same batch, devices, dtype and "
    "process), median over rounds."
)


def run(
    config: ml_collections.ConfigDict,
    options: dict[str, Any],
    argv: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Runs the benchmark and returns the whole JSON-able report.

    Args:
      config: the experiment config (model, dataset shape, optimizer, eval and sampler).
      options: from :func:`make_options`.
      argv: this process's command line, to start children for other CPU device counts
        (None: such counts run as sub-meshes of this process's devices instead).
    """
    devices = jax.devices()
    load_before = _load_average()
    counts = options["device_counts"] or [len(devices)]
    results: list[dict[str, Any]] = []
    for n in counts:
        mode = options["device_count_mode"]
        if mode == "auto":
            mode = (
                "subprocess" if jax.default_backend() == "cpu" and n != len(devices) else "submesh"
            )
        if mode == "subprocess" and argv is not None:
            results.extend(run_in_child(argv, n))
        elif n > len(devices):
            results.append(
                {
                    "part": "error",
                    "num_devices": n,
                    "error": f"{n} devices requested, {len(devices)} visible",
                }
            )
        else:
            results.extend(run_on_mesh(config, options, devices[:n]))
    env = environment()
    # Other processes competing for the host skew the times; the load average shows it.
    env["load_average_1min_at_start"] = load_before
    return {
        "schema_version": SCHEMA_VERSION,
        "environment": env,
        "config": config.to_dict(),
        "options": options,
        "flop_counting": FLOP_COUNTING,
        "results": results,
    }


# ----------------------------------------------------------------------------- output


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value / scale, spec)


_COLUMNS = (
    "part", "dev", "batch", "compile s", "s/step", "[p25, p75]", "img/s", "GFLOP/step",
    "GFLOP/s", "vs conv", "cpu/wall", "peak MiB", "XLA MiB", "est MiB",
)  # fmt: skip


def _row(r: dict[str, Any]) -> list[str]:
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
        _fmt(r.get("ratio_vs_conv_stack", {}).get("analytic"), ".3f"),
        _fmt(r.get("process_cpu_per_wall"), ".2f"),
        _fmt(mem.get("peak_bytes"), ".0f", _MIB),
        _fmt(mem.get("memory_analysis_per_device", {}).get("total_bytes"), ".0f", _MIB),
        _fmt(mem.get("residual_estimate_per_device", {}).get("total_bytes"), ".0f", _MIB),
    ]


def format_table(report: dict[str, Any]) -> str:
    """The results as a fixed-width text table, with a line on what the columns mean."""
    env = report["environment"]
    rows = [list(_COLUMNS)]
    errors = []
    for r in report["results"]:
        if r["part"] == "error":
            errors.append(
                f"error: {r.get('num_devices', '-')} devices, batch {r.get('batch_size', '-')}: "
                f"{r['error']}"
            )
        else:
            rows.append(_row(r))
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]

    def line(row: list[str]) -> str:
        return "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )

    sources = {
        r["memory"]["peak_source"]
        for r in report["results"]
        if "peak_source" in r.get("memory", {})
    }
    table = [line(rows[0]), "-" * len(line(rows[0]))] + [line(row) for row in rows[1:]]
    return "\n".join(
        [
            f"jax {env['jax_version']} on {env['backend']} ({env['device_kind']}, "
            f"{env['num_devices']} visible devices, {env['host_cpu_count']} host CPUs; "
            f"1-min load average {_fmt(env.get('load_average_1min_at_start'), '.1f')} at start, "
            f"{_fmt(env.get('load_average_1min'), '.1f')} at end)",
            *table,
            *errors,
            "s/step: median over the timed steps; img/s at the median. GFLOP: analytic "
            "conv/matmul count (train = 3x forward). vs conv: analytic FLOP/s over the conv "
            "stack's (its depth in parentheses) within each round, median over rounds. "
            "cpu/wall: this process's CPU seconds per wall second while stepping (about the "
            "core count when it had the host to itself). "
            "XLA MiB: compiled.memory_analysis() per device (arguments + outputs - aliased + "
            "temporaries). est MiB (--memory_only): train state + gradients + saved "
            "activations per device, from the traced program. peak MiB: "
            + ("; ".join(sorted(sources)) or "not measured")
            + ".",
        ]
    )


def write_json(report: dict[str, Any], path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)


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
        list(DEVICE_COUNT_MODES),
        "How to run a device count: 'subprocess' (CPU: a child with that many simulated "
        "devices), 'submesh' (the first N devices of this process); 'auto': subprocess on CPU "
        "when N differs from the devices this process sees, submesh otherwise.",
    )
    flags.DEFINE_list("parts", list(PARTS), f"What to measure, of {PARTS}.")
    flags.DEFINE_boolean(
        "memory_only", False, "Only compile the train step on abstract inputs: memory and FLOPs."
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


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config is None:
        raise app.UsageError("--config is required")
    options = make_options(
        steps=FLAGS.steps,
        warmup=FLAGS.warmup,
        batch_sizes=_parse_ints(FLAGS.batch_sizes, "batch_sizes"),
        device_counts=_parse_ints(FLAGS.device_counts, "device_counts"),
        device_count_mode=FLAGS.device_count_mode,
        parts=list(FLAGS.parts),
        memory_only=FLAGS.memory_only,
        conv_stack_depth=FLAGS.conv_stack_depth,
        sample_steps=FLAGS.sample_steps,
        profile_dir=FLAGS.profile_dir,
    )
    sharding.initialize_distributed()  # Joins a multi-host run; nothing for one process.
    report = run(FLAGS.config, options, argv=sys.argv)
    if jax.process_index() != 0:
        return
    print(format_table(report), flush=True)
    if FLAGS.json:
        write_json(report, FLAGS.json)
        print(f"Wrote {FLAGS.json}")
    if any(r["part"] == "error" for r in report["results"]):
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
