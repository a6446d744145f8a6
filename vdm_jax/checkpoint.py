"""Asynchronous orbax checkpoints of the whole :class:`~vdm_jax.state.TrainState`.

A checkpoint is the state pytree alone: the data position is its step (batches are a pure
function of ``(seed, step)``) and the PRNG key is in the state. Checkpoints live in
``{workdir}/checkpoints/{step}``; the latest is restored automatically.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from vdm_jax import reference, sharding, state
from vdm_jax.experiment import Experiment
from vdm_jax.state import TrainState


def checkpoint_dir(workdir: str) -> str:
    """Where the checkpoints of ``workdir`` live."""
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(
    workdir: str, *, max_to_keep: int = 3, read_only: bool = False
) -> ocp.CheckpointManager:
    """A manager that saves asynchronously and keeps the last ``max_to_keep`` checkpoints.

    ``read_only`` managers (evaluation, sampling) only restore; they create no directory.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=True,
        create=not read_only,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, state: TrainState, step: int) -> None:
    """Starts saving ``state`` as checkpoint ``step``; returns once it is copied off device.

    The write itself continues in the background (``manager.wait_until_finished`` waits for
    it), so the next training step may donate the state's buffers.
    """
    if step in manager.all_steps():
        return
    manager.save(step, args=ocp.args.StandardSave(state), force=True)
    logging.info("Saving checkpoint %d to %s.", step, manager.directory)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: TrainState) -> TrainState | None:
    """The latest checkpoint, laid out like ``abstract_state``, or None if there is none.

    Args:
      manager: the workdir's checkpoint manager.
      abstract_state: ``jax.ShapeDtypeStruct`` leaves with shardings
        (``state.abstract_train_state``).
    """
    step = manager.latest_step()
    if step is None:
        return None
    logging.info("Restoring checkpoint %d from %s.", step, manager.directory)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


def restore_latest_in(workdir: str, abstract_state: TrainState) -> TrainState | None:
    """:func:`restore_latest` through a read-only manager that is closed afterwards."""
    manager = make_manager(workdir, read_only=True)
    try:
        return restore_latest(manager, abstract_state)
    finally:
        manager.close()


def restore_eval_params(exp: Experiment, workdir: str) -> tuple[Any, int]:
    """``(EMA parameters, step)`` to evaluate or sample with, replicated over the mesh.

    From ``eval.reference_checkpoint`` when set (a released google-research/vdm checkpoint,
    whose architecture :func:`vdm_jax.experiment.build` already gave ``exp``), else from the
    latest checkpoint of ``workdir``.

    Raises:
      FileNotFoundError: if ``workdir`` has no checkpoint.
    """
    path = exp.eval.reference_checkpoint
    if path:
        restored = reference.restore_reference(path)
        logging.info("Evaluating reference checkpoint %s (step %d).", path, restored.step)
        return jax.device_put(restored.ema_params, sharding.replicated(exp.mesh)), restored.step
    restored = restore_latest_in(workdir, state.abstract_train_state(exp))
    if restored is None:
        raise FileNotFoundError(
            f"no checkpoint in {checkpoint_dir(workdir)}; run --mode=train first"
        )
    return restored.ema_params, int(restored.step)
