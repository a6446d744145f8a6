"""The device mesh, the two shardings the runner uses, and joining a multi-host run.

Data parallelism over one mesh axis, ``"data"``, that covers every device of every host:
batches are split along their first dimension (:func:`batch_sharding`), parameters and
optimizer state are replicated (:func:`replicated`). Each host reads only its own rows of a
global batch (``vdm_jax.data``) and :func:`global_batch` assembles them into global arrays.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

# Environment variables whose presence (with more than one process) means a cluster launched
# this process, so that `jax.distributed.initialize()` can find its peers by itself.
_CLUSTER_SIZE_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
_CLUSTER_ADDRESS_VARS = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: every device of every host).

    Devices are ordered by (process, id) so that host ``p``'s devices hold rows
    ``[p b, (p + 1) b)`` of a global batch, the rows that ``vdm_jax.data`` gives host ``p``.
    Tests pass a subset of the local devices to compare device counts in one process.
    """
    devices = jax.devices() if devices is None else list(devices)
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Split along the first (batch) dimension over the ``"data"`` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


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
