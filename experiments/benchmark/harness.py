"""A model-agnostic timing harness: compile jitted programs, time them round-robin, record.

A :class:`Part` is one compiled program, ready to call, with what compiling it told
(:class:`Compilation`: compile time, FLOP counts, XLA's memory estimate). :func:`time_parts`
warms each part up (measuring its peak memory with a :class:`MemoryProbe`), then times them
in rounds; :func:`results` turns the measurements into :class:`PartResult` records, each
part's FLOP rate also taken relative to a baseline part's in the same rounds.

Nothing here knows the model: FLOP counts of the traced program come from a counter passed
in (``count_jaxpr_flops``), analytic counts as numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import resource
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

# ``traced.jaxpr -> FLOPs`` of the traced program.
JaxprFlopCounter = Callable[[Any], float]
# ``compiled -> (() -> outputs)``: one call of a compiled program, keeping any state (such as
# a donated train state) between calls.
Runner = Callable[[Any], Callable[[], Any]]
_COUNTED_FLOPS = ("analytic", "xla")  # The counts the ratio to the baseline is taken for.

# Dense bfloat16 peak FLOP/s of one chip, by a substring of ``device.device_kind`` (first
# match wins; the vendors' data sheets, without sparsity).
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
)


def peak_bf16_flops(device_kind: str) -> float | None:
    """One chip's dense bfloat16 peak FLOP/s from :data:`PEAK_BF16_FLOPS` (None: unknown)."""
    return next((peak for name, peak in PEAK_BF16_FLOPS if name in device_kind), None)


class MemoryProbe:
    """Peak memory over an interval: device peak where reported, else process peak RSS.

    Attributes:
      devices: the devices measured.
      device_stats: whether every device reports ``peak_bytes_in_use``.
      source: what :meth:`peak_bytes` reads, in words (written with each result).
    """

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
        """The peak since :meth:`reset` (device peaks: over the process's life)."""
        if self.device_stats:
            return max(int(d.memory_stats()["peak_bytes_in_use"]) for d in self.devices)
        peak = _proc_status_bytes("VmHWM")
        if peak is not None:
            return peak
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def current_bytes(self) -> int | None:
        """Bytes in use now: the device's ``bytes_in_use``, else the process's RSS."""
        if self.device_stats:
            return max(int(d.memory_stats().get("bytes_in_use", 0)) for d in self.devices)
        return _proc_status_bytes("VmRSS")


def _proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of Linux's ``/proc/self/status`` in bytes; None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"{field}:\s+(\d+)\s+kB", f.read())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


@dataclasses.dataclass(frozen=True)
class StepTimes:
    """Statistics of per-step seconds, and every sample in the order measured."""

    median: float
    p25: float
    p75: float
    min: float
    max: float
    mean: float
    n: int
    all: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "all": list(self.all)}


def summarize(seconds: Sequence[float]) -> StepTimes:
    """Median, quartiles, min, max, mean and every sample of per-step seconds [n]."""
    s = np.asarray(seconds, np.float64)
    q25, q50, q75 = np.percentile(s, [25, 50, 75])
    return StepTimes(
        median=float(q50),
        p25=float(q25),
        p75=float(q75),
        min=float(s.min()),
        max=float(s.max()),
        mean=float(s.mean()),
        n=int(s.size),
        all=tuple(float(v) for v in s),
    )


@dataclasses.dataclass(frozen=True)
class XlaStats:
    """What XLA says of a compiled program (each None where the backend does not say).

    Attributes:
      memory_per_device: ``compiled.memory_analysis()`` in bytes per device:
        ``argument_bytes``, ``output_bytes``, ``alias_bytes``, ``temp_bytes``,
        ``generated_code_bytes`` and ``total_bytes`` (live at the peak).
      flops: ``cost_analysis()["flops"]`` summed over devices.
      bytes_accessed: ``cost_analysis()["bytes accessed"]`` summed over devices.
    """

    memory_per_device: dict[str, int] | None
    flops: float | None
    bytes_accessed: float | None

    def memory_json(self) -> dict[str, Any]:
        """The ``memory`` entries of a result: those XLA reported."""
        out: dict[str, Any] = {}
        if self.memory_per_device is not None:
            out["memory_analysis_per_device"] = dict(self.memory_per_device)
        if self.bytes_accessed is not None:
            out["xla_bytes_accessed"] = self.bytes_accessed
        return out


def _memory_analysis(compiled: Any) -> dict[str, int] | None:
    try:
        mem = compiled.memory_analysis()
    except Exception:  # A backend may not implement it.
        return None
    if mem is None:
        return None
    fields = ("argument", "output", "alias", "temp", "generated_code")
    memory = {f"{f}_bytes": int(getattr(mem, f"{f}_size_in_bytes", 0)) for f in fields}
    # Live at the peak: inputs, outputs not aliased to (donated) inputs, and temporaries.
    memory["total_bytes"] = (
        memory["argument_bytes"]
        + memory["output_bytes"]
        - memory["alias_bytes"]
        + memory["temp_bytes"]
    )
    return memory


def _cost_analysis(compiled: Any) -> dict[str, float] | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # A backend may not implement it.
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return cost or None


def compile_stats(compiled: Any, num_devices: int) -> XlaStats:
    """XLA's memory estimate (per device) and FLOP count (all devices) of a compiled program.

    Args:
      compiled: a ``jax.stages.Compiled``, one device's share of an SPMD program.
      num_devices: the devices it runs on.
    """
    cost = _cost_analysis(compiled)
    flops = bytes_accessed = None
    if cost and "flops" in cost:
        flops = float(cost["flops"]) * num_devices
        if "bytes accessed" in cost:
            bytes_accessed = float(cost["bytes accessed"]) * num_devices
    return XlaStats(_memory_analysis(compiled), flops, bytes_accessed)


def compile_traced(traced: Any) -> tuple[Any, float]:
    """Lowers and compiles a ``jax.stages.Traced``; returns (compiled, seconds)."""
    start = time.perf_counter()
    compiled = traced.lower().compile()
    return compiled, time.perf_counter() - start


@dataclasses.dataclass(frozen=True)
class FlopCounts:
    """FLOPs of one step, three ways.

    Attributes:
      analytic: the closed-form count given by the caller.
      jaxpr: the traced program's count (``count_jaxpr_flops``).
      xla: XLA's ``cost_analysis()`` (0 where not reported).
    """

    analytic: float
    jaxpr: float
    xla: float

    def to_json(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    def per_second(self, seconds: float) -> dict[str, float]:
        """FLOP/s of each nonzero count at ``seconds`` per step."""
        return {k: v / seconds for k, v in self.to_json().items() if v}


@dataclasses.dataclass(frozen=True)
class Compilation:
    """What compiling a program measured.

    Attributes:
      trace_s: seconds to trace.
      compile_s: seconds to trace, lower and compile.
      flops: FLOPs per step.
      xla: XLA's memory estimate and counts.
    """

    trace_s: float
    compile_s: float
    flops: FlopCounts
    xla: XlaStats

    def to_json(self) -> dict[str, Any]:
        """The ``compile_s``, ``trace_s`` and ``flops`` entries of a result."""
        return {"compile_s": self.compile_s, "trace_s": self.trace_s, "flops": self.flops.to_json()}


def compile_program(
    jitted: Any,
    args: tuple[Any, ...],
    *,
    num_devices: int,
    analytic_flops: float,
    count_jaxpr_flops: JaxprFlopCounter,
    calls_per_step: int = 1,
) -> tuple[Any, Compilation]:
    """Traces and compiles one jitted function (timed) and counts its FLOPs.

    Args:
      jitted: a ``jax.jit`` function.
      args: its example arguments (arrays or ``jax.ShapeDtypeStruct`` s; compiled for them).
      num_devices: devices of the mesh.
      analytic_flops: closed-form conv/matmul FLOPs of one call.
      count_jaxpr_flops: counts the FLOPs of the traced program.
      calls_per_step: steps one call runs; the FLOP counts are per step.

    Returns:
      ``(compiled, compilation)``.
    """
    start = time.perf_counter()
    traced = jitted.trace(*args)
    trace_s = time.perf_counter() - start
    jaxpr_flops = count_jaxpr_flops(traced.jaxpr)
    compiled, compile_s = compile_traced(traced)
    xla = compile_stats(compiled, num_devices)
    flops = FlopCounts(
        analytic=float(analytic_flops) / calls_per_step,
        jaxpr=float(jaxpr_flops) / calls_per_step,
        # XLA counts a loop body once: right for one sampler step, not for a loop over
        # several network evaluations.
        xla=(xla.flops or 0.0) / calls_per_step,
    )
    return compiled, Compilation(trace_s, trace_s + compile_s, flops, xla)


@dataclasses.dataclass(frozen=True)
class Part:
    """One compiled program to time, and what its result says about it.

    Attributes:
      name: the part's name (its result's ``part``).
      call: runs the compiled program once and returns its outputs.
      calls_per_step: steps one call runs; a step's time is the call's divided by it.
      images_per_call: images one call processes.
      compilation: what compiling it measured.
      details: None, or a dataclass whose fields the result adds as they are.
    """

    name: str
    call: Callable[[], Any]
    calls_per_step: int
    images_per_call: int
    compilation: Compilation
    details: Any = None


def prepare(
    name: str,
    jitted: Any,
    args: tuple[Any, ...],
    *,
    run: Runner,
    images_per_call: int,
    calls_per_step: int,
    analytic_flops: float,
    num_devices: int,
    count_jaxpr_flops: JaxprFlopCounter,
    details: Any = None,
) -> Part:
    """Compiles ``jitted`` for ``args`` (:func:`compile_program`) into a :class:`Part`.

    Args:
      name: the part.
      jitted: a ``jax.jit`` function.
      args: its example arguments.
      run: ``compiled -> (() -> outputs)``: one call of the compiled program.
      images_per_call: images one call processes.
      calls_per_step: steps one call runs.
      analytic_flops: closed-form conv/matmul FLOPs of one call.
      num_devices: devices of the mesh.
      count_jaxpr_flops: counts the FLOPs of the traced program.
      details: see :attr:`Part.details`.
    """
    compiled, compilation = compile_program(
        jitted,
        args,
        num_devices=num_devices,
        analytic_flops=analytic_flops,
        count_jaxpr_flops=count_jaxpr_flops,
        calls_per_step=calls_per_step,
    )
    return Part(name, run(compiled), calls_per_step, images_per_call, compilation, details)


@dataclasses.dataclass(frozen=True)
class PeakMemory:
    """Memory over a part's warm-up calls (:class:`MemoryProbe`)."""

    peak_bytes: int
    start_bytes: int | None
    peak_source: str


@dataclasses.dataclass(frozen=True)
class Timing:
    """What timing one part measured.

    Attributes:
      step_s: seconds per step, one sample per round.
      process_cpu_per_wall: this process's CPU seconds (all threads) per wall second,
        median over rounds: about the core count when it had the machine to itself.
      memory: peak memory over the warm-up.
    """

    step_s: StepTimes
    process_cpu_per_wall: float
    memory: PeakMemory


def _warm_up(part: Part, warmup: int, probe: MemoryProbe) -> PeakMemory:
    probe.reset()
    start_bytes = probe.current_bytes()
    for _ in range(max(warmup, 1)):
        jax.block_until_ready(part.call())
    return PeakMemory(probe.peak_bytes(), start_bytes, probe.source)


def _timed_rounds(
    parts: Sequence[Part], steps: int, profile_dir: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """Wall and CPU seconds per step, [steps, len(parts)], calling the parts in turn."""
    wall = np.zeros((steps, len(parts)))
    cpu = np.zeros((steps, len(parts)))
    profile = (
        jax.profiler.trace(profile_dir, create_perfetto_trace=True)
        if profile_dir
        else contextlib.nullcontext()
    )
    with profile:
        for step in range(steps):
            for i, part in enumerate(parts):
                cpu_start, start = time.process_time(), time.perf_counter()
                jax.block_until_ready(part.call())
                wall[step, i] = (time.perf_counter() - start) / part.calls_per_step
                cpu[step, i] = (time.process_time() - cpu_start) / part.calls_per_step
    return wall, cpu


def time_parts(
    parts: Sequence[Part],
    *,
    steps: int,
    warmup: int,
    probe: MemoryProbe,
    profile_dir: str | None = None,
) -> list[Timing]:
    """Warms each part up (measuring its peak memory), then times them round-robin.

    Each part first runs ``warmup`` (at least 1) untimed calls alone, over which its peak
    memory is taken. Then ``steps`` rounds each time one call of every part, in turn, so that
    a change in the machine's load during the run (other processes, clock changes) affects
    all parts alike and their ratio stays fair. Each call is waited for
    (``jax.block_until_ready``) before the clock stops: a time is one step's latency,
    dispatch included.

    Args:
      parts: the parts, in the order each round calls them.
      steps: timed rounds.
      warmup: untimed calls of each part before.
      probe: measures the peak memory.
      profile_dir: where to write a ``jax.profiler`` trace of the timed rounds (None: none).

    Returns:
      One timing per part, in order.
    """
    peaks = [_warm_up(part, warmup, probe) for part in parts]
    wall, cpu = _timed_rounds(parts, steps, profile_dir)
    timings = []
    for i, peak in enumerate(peaks):
        step_s = summarize(wall[:, i])
        cpu_per_wall = float(np.median(cpu[:, i]) / step_s.median)
        timings.append(Timing(step_s, cpu_per_wall, peak))
    return timings


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where and at which batch size a result was measured.

    Attributes:
      peak_flops_per_device: the chip's peak FLOP/s that model-FLOP utilisation is taken
        against (None: unknown, not reported).
    """

    batch_size: int
    num_devices: int
    device_kind: str
    platform: str
    peak_flops_per_device: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def utilization(self, flops_per_s: float | None) -> float | None:
        """Model-FLOP utilisation: ``flops_per_s`` over the devices' summed peak."""
        if not flops_per_s or not self.peak_flops_per_device:
            return None
        return flops_per_s / (self.peak_flops_per_device * self.num_devices)


@dataclasses.dataclass(frozen=True)
class Ratio:
    """A part's FLOP/s over a baseline part's, per count (``analytic``, ``xla``).

    Attributes:
      baseline: the baseline part's name.
      median: the median over rounds of the per-round ratio.
      quartiles: its [25th, 75th] percentiles.
    """

    baseline: str
    median: dict[str, float]
    quartiles: dict[str, tuple[float, float]]

    def to_json(self) -> dict[str, Any]:
        """``ratio_vs_{baseline}`` and ``ratio_vs_{baseline}_quartiles``."""
        key = f"ratio_vs_{self.baseline}"
        quartiles = {k: list(v) for k, v in self.quartiles.items()}
        return {key: dict(self.median), f"{key}_quartiles": quartiles}


def ratio_vs_baseline(part: Part, timing: Timing, baseline: Part, base_timing: Timing) -> Ratio:
    """``part``'s FLOP/s over ``baseline``'s, per round, summarised over rounds.

    The ratio is taken per round (the part's step and the baseline's step of the same round,
    seconds apart) and its median over rounds is reported, with quartiles: a drift in the
    machine's speed during the run (other tenants, clocks) cancels within a round but not
    between the two parts' separate medians. Counts either side lacks are left out.
    """
    part_s, baseline_s = np.asarray(timing.step_s.all), np.asarray(base_timing.step_s.all)
    median, quartiles = {}, {}
    for k in _COUNTED_FLOPS:
        part_flops = getattr(part.compilation.flops, k)
        baseline_flops = getattr(baseline.compilation.flops, k)
        if part_flops and baseline_flops:
            per_round = (part_flops / part_s) / (baseline_flops / baseline_s)
            q25, q50, q75 = np.percentile(per_round, [25, 50, 75])
            median[k], quartiles[k] = float(q50), (float(q25), float(q75))
    return Ratio(baseline.name, median, quartiles)


@dataclasses.dataclass(frozen=True)
class PartResult:
    """One timed part's result.

    Attributes:
      part: the part's name.
      placement: batch size and devices.
      compilation: compile time, FLOPs per step, XLA's figures.
      timing: step times, CPU use and peak memory.
      images_per_step: images one step processes.
      ratio: FLOP/s relative to the baseline part; None for the baseline itself, or when it
        was not measured.
      details: None, or a dataclass of the part's own fields.
    """

    part: str
    placement: Placement
    compilation: Compilation
    timing: Timing
    images_per_step: float
    ratio: Ratio | None = None
    details: Any = None

    def to_json(self) -> dict[str, Any]:
        """The result's JSON record (the report's ``results`` entries)."""
        median = self.timing.step_s.median
        memory = {**self.compilation.xla.memory_json(), **dataclasses.asdict(self.timing.memory)}
        flops_per_s = self.compilation.flops.per_second(median)
        return {
            "part": self.part,
            **self.placement.to_json(),
            **self.compilation.to_json(),
            "memory": memory,
            "step_s": self.timing.step_s.to_json(),
            "process_cpu_per_wall": self.timing.process_cpu_per_wall,
            "images_per_s": self.images_per_step / median,
            "flops_per_s": flops_per_s,
            # The analytic (model) FLOPs: rematerialised forwards do not count.
            "model_flops_utilization": self.placement.utilization(flops_per_s.get("analytic")),
            **(self.ratio.to_json() if self.ratio is not None else {}),
            **(dataclasses.asdict(self.details) if self.details is not None else {}),
        }


def results(
    parts: Sequence[Part],
    timings: Sequence[Timing],
    placement: Placement,
    *,
    baseline: str | None = None,
) -> list[PartResult]:
    """The parts' results, with FLOP rates relative to the ``baseline`` part where timed.

    Args:
      parts: the timed parts.
      timings: their :func:`time_parts` timings, in the same order.
      placement: where they ran.
      baseline: the name of the part the others' FLOP rates are taken relative to.
    """
    base = next((i for i, p in enumerate(parts) if p.name == baseline), None)
    out = []
    for part, timing in zip(parts, timings, strict=True):
        ratio = None
        if base is not None and part is not parts[base]:
            ratio = ratio_vs_baseline(part, timing, parts[base], timings[base])
        out.append(
            PartResult(
                part=part.name,
                placement=placement,
                compilation=part.compilation,
                timing=timing,
                images_per_step=part.images_per_call / part.calls_per_step,
                ratio=ratio,
                details=part.details,
            )
        )
    return out
