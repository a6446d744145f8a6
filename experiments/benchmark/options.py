"""The benchmark's options: what to measure, how often, on which batch sizes and devices."""

from __future__ import annotations

import dataclasses
from typing import Any

from experiments.benchmark.parts import DEFAULT_PARTS, PARTS

# How a device count runs (see :func:`experiments.benchmark.sweep.run`).
DEVICE_COUNT_MODES = ("auto", "subprocess", "submesh")


@dataclasses.dataclass(frozen=True)
class Options:
    """The benchmark's options (also written to the report's ``options``).

    Attributes:
      steps: timed steps per part (rounds).
      warmup: untimed steps of each part before (>= 1; peak memory is taken over them).
      batch_sizes: global batch sizes to sweep (empty: the config's training batch).
      device_counts: device counts to sweep (empty: every device JAX sees).
      device_count_mode: one of :data:`DEVICE_COUNT_MODES`.
      parts: what to measure, of :data:`experiments.benchmark.parts.PARTS`.
      memory_only: only compile the train step on abstract inputs (memory and FLOPs).
      fit_device_bytes: with ``memory_only``, also the widest U-Net whose estimate fits this
        many bytes per device (0: not searched).
      peak_flops: one device's peak FLOP/s for model-FLOP utilisation (0: the chip's dense
        bfloat16 peak from :data:`experiments.benchmark.harness.PEAK_BF16_FLOPS`, if known).
      conv_stack_depth: 3x3 convs in the baseline stack (0: match the model's conv FLOPs).
      sample_steps: sampler steps per timed call.
      profile_dir: where to write a profiler trace of the first batch size (None: none).

    Raises:
      ValueError: on unknown parts or mode, or fewer than one step, warm-up or sampler step.
    """

    steps: int = 10
    warmup: int = 2
    batch_sizes: tuple[int, ...] = ()
    device_counts: tuple[int, ...] = ()
    device_count_mode: str = "auto"
    parts: tuple[str, ...] = DEFAULT_PARTS
    memory_only: bool = False
    fit_device_bytes: float = 0.0
    peak_flops: float = 0.0
    conv_stack_depth: int = 0
    sample_steps: int = 1
    profile_dir: str | None = None

    def __post_init__(self) -> None:
        bad_parts = set(self.parts) - set(PARTS)
        if bad_parts:
            raise ValueError(f"unknown parts {sorted(bad_parts)}; allowed: {tuple(PARTS)}")
        if self.device_count_mode not in DEVICE_COUNT_MODES:
            raise ValueError(f"device_count_mode must be one of {DEVICE_COUNT_MODES}")
        if self.steps < 1 or self.warmup < 1 or self.sample_steps < 1:
            raise ValueError("need steps >= 1, warmup >= 1 and sample_steps >= 1")
        if self.peak_flops < 0:
            raise ValueError("peak_flops must be >= 0 (0: from the device kind)")
        if self.fit_device_bytes < 0 or (self.fit_device_bytes and not self.memory_only):
            raise ValueError("fit_device_bytes must be >= 0, and needs memory_only")

    def to_json(self) -> dict[str, Any]:
        """The options as a JSON-able dict (lists for the sequences)."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }


_SEQUENCES = ("batch_sizes", "device_counts", "parts")


def make_options(**overrides: Any) -> Options:
    """The default :class:`Options` with some replaced (sequences may be given as lists).

    Raises:
      ValueError: on an unknown option name, or an invalid value (see :class:`Options`).
    """
    allowed = {f.name for f in dataclasses.fields(Options)}
    unknown = set(overrides) - allowed
    if unknown:
        raise ValueError(f"unknown benchmark options {sorted(unknown)}; allowed: {sorted(allowed)}")
    return Options(**{k: tuple(v) if k in _SEQUENCES else v for k, v in overrides.items()})
