"""The device mesh, the shardings the runner uses, and joining a multi-host run.

The mesh has two axes, ``("data", "fsdp")``, that together cover every device of every host.
Batches are split along their first dimension over both (:func:`batch_sharding`). The train
state (parameters, EMA parameters, optimizer state) is either replicated (``sharding.fsdp=1``,
plain data parallelism: the ``"fsdp"`` axis has size 1) or, with ``sharding.fsdp=F``, each
of its large arrays is split over the ``F`` devices of the ``"fsdp"`` axis along one
dimension that ``F`` divides (:func:`fsdp_spec`; fully sharded data parallelism, as in
ZeRO-3: Rajbhandari et al. 2020, and big_vision's and MaxText's FSDP). A sharded step
gathers the parameters it computes with (:meth:`ParamLayout.gather`) and sums their
gradients onto the shards (:meth:`ParamLayout.shard`); XLA inserts the collectives. Each
host reads only its own rows of a global batch (``vdm_jax.runner.data``) and :func:`global_batch`
assembles them.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
# Batches are split over every device: the rows of the "data" axis, each over its "fsdp" row.
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)

# Environment variables whose presence (with more than one process) means a cluster launched
# this process, so that `jax.distributed.initialize()` can find its peers by itself.
_CLUSTER_SIZE_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
_CLUSTER_ADDRESS_VARS = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def make_mesh(devices: Sequence[jax.Device] | None = None, fsdp: int = 1) -> Mesh:
    """A mesh ``("data", "fsdp")`` of shape ``[N / F, F]`` over ``devices`` (default: every
    device of every host), ``F = fsdp`` (``-1``: all ``N`` devices).

    Devices are ordered by (process, id) and laid out row by row, so that host ``p``'s devices
    hold rows ``[p b, (p + 1) b)`` of a global batch, the rows that ``vdm_jax.runner.data`` gives
    host ``p``. Tests pass a subset of the local devices to compare device counts in one
    process.

    Raises:
      ValueError: if ``fsdp`` does not divide the number of devices.
    """
    devices = jax.devices() if devices is None else list(devices)
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    fsdp = len(devices) if fsdp == -1 else fsdp
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"sharding.fsdp={fsdp} does not divide the {len(devices)} devices")
    grid = np.asarray(devices).reshape(len(devices) // fsdp, fsdp)
    return Mesh(grid, (DATA_AXIS, FSDP_AXIS), axis_types=(AxisType.Auto, AxisType.Auto))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (metrics, keys, small or unsharded state)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Split along the first (batch) dimension over every device (both mesh axes)."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def fsdp_spec(shape: Sequence[int], num_bytes: int, fsdp: int, min_bytes: int) -> PartitionSpec:
    """Where one state array of ``shape`` (``num_bytes`` in all) is split over ``fsdp`` devices.

    Along its largest dimension that ``fsdp`` divides (the last such, for ties: a conv
    kernel ``[3, 3, C, C]`` splits its output channels); replicated when ``fsdp`` is 1, the
    array has fewer than ``min_bytes`` bytes (gathering it would cost more than it saves),
    or no dimension divides.
    """
    if fsdp == 1 or num_bytes < min_bytes:
        return PartitionSpec()
    divisible = [i for i, n in enumerate(shape) if n % fsdp == 0]
    if not divisible:
        return PartitionSpec()
    axis = max(divisible, key=lambda i: (shape[i], i))
    return PartitionSpec(*[FSDP_AXIS if i == axis else None for i in range(len(shape))])


def state_shardings(shapes: Any, mesh: Mesh, min_bytes: int) -> Any:
    """:func:`fsdp_spec` for every leaf of a pytree of arrays or ``jax.ShapeDtypeStruct`` s.

    The rule depends only on each leaf's shape, so parameters, their EMA and Adam's moments
    (which have the parameters' shapes) are split alike and update without communication.
    """
    fsdp = mesh.shape[FSDP_AXIS]

    def leaf_sharding(x: Any) -> NamedSharding:
        num_bytes = math.prod(x.shape) * np.dtype(x.dtype).itemsize
        return NamedSharding(mesh, fsdp_spec(x.shape, num_bytes, fsdp, min_bytes))

    return jax.tree.map(leaf_sharding, shapes)


def bytes_per_device(tree: Any) -> int:
    """The largest bytes any one device holds of a pytree of sharded arrays (or
    ``jax.ShapeDtypeStruct`` s with shardings): each leaf counts its shard."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += math.prod(shard) * np.dtype(x.dtype).itemsize
    return total


@dataclasses.dataclass(frozen=True)
class ParamLayout:
    """How a step moves parameters between their stored layout and the one it computes with.

    Attributes:
      stored: the parameters' shardings (a pytree of ``NamedSharding`` s): as the state
        holds them, split over ``"fsdp"`` or replicated (an ensemble's members may be split
        over ``"data"``).
      gathered: the same tree with no leaf split over ``"fsdp"``.
    """

    stored: Any
    gathered: Any

    @classmethod
    def of(cls, stored: Any) -> ParamLayout:
        """The layout of parameters stored with the shardings ``stored``."""

        def unsplit(s: NamedSharding) -> NamedSharding:
            spec = [None if axis == FSDP_AXIS else axis for axis in s.spec]
            return NamedSharding(s.mesh, PartitionSpec(*spec))

        return cls(stored, jax.tree.map(unsplit, stored))

    def gather(self, params: Any) -> Any:
        """``params`` whole on every device, but for an ensemble's members split over
        ``"data"`` (all-gathers over ``"fsdp"``; a no-op when nothing is). Inside jit."""
        return jax.lax.with_sharding_constraint(params, self.gathered)

    def shard(self, tree: Any) -> Any:
        """A tree shaped like the parameters (their gradients) in the stored layout: the sum
        of per-device gradients lands on the shards (a reduce-scatter where the backend forms
        one; XLA:CPU all-reduces and slices). Inside jit."""
        return jax.lax.with_sharding_constraint(tree, self.stored)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This host's rows of a batch -> global arrays sharded over the mesh.

    Args:
      local: arrays ``[b, ...]``, this host's rows of the global batch ``[B, ...]``.
      mesh: the mesh; ``B = b * process_count``.

    Returns:
      The same keys, global ``jax.Array`` s of shape ``[B, ...]`` with :func:`batch_sharding`.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def cluster_detected(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a multi-process launcher (SLURM, Open MPI, TPU pod, ...) started this process."""
    if any(environ.get(v) for v in _CLUSTER_ADDRESS_VARS):
        return True
    for var in _CLUSTER_SIZE_VARS:
        try:
            if int(environ.get(var, "1")) > 1:
                return True
        except ValueError:
            continue
    return "," in environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins a multi-process run, or does nothing for a single process.

    With any argument given, calls ``jax.distributed.initialize`` with them; otherwise calls
    it without arguments (JAX reads the cluster's environment) only when
    :func:`cluster_detected`, so that a laptop run needs no flags.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(a is not None for a in explicit):
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif cluster_detected():
        jax.distributed.initialize()
    else:
        return
    logging.info(
        "Process %d of %d; %d local and %d global devices.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
