"""Asynchronous orbax checkpoints of the whole :class:`~vdm_jax.runner.state.TrainState`, verified.

A checkpoint is the state pytree alone: the data position is its step (batches are a pure
function of ``(seed, step)``) and the PRNG key is in the state. Checkpoints live in
``{workdir}/checkpoints/{step}``; the latest readable one is restored automatically.

Integrity: every save records a digest of the state (per leaf, two wrapping 32-bit sums of
its words, the second position-weighted; computed on device) in the step's orbax metadata,
and a restore recomputes and compares it, so flipped bytes are named as corruption instead
of surfacing later as a diverged loss; a metadata file that no longer parses makes the
checkpoint unreadable too (orbax itself would read it as "no digest" and skip the check).
A checkpoint that cannot be read (empty or partial
folder, missing metadata, truncated or corrupt data, digest mismatch) is reported in one
warning with its folder and the reason, and the next older one is tried. Training moves an
unreadable checkpoint to ``{workdir}/checkpoints_unreadable/`` (never deleting it) so that a
later save of the same step cannot collide with it; evaluation and sampling only skip it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from vdm_jax.runner import state
from vdm_jax.runner.experiment import Experiment
from vdm_jax.runner.state import TrainState

DIGEST_KEY = "vdm_jax_state_digest"
# Orbax's per-step metadata file, which holds the digest.
METADATA_FILE = "_CHECKPOINT_METADATA"


class CorruptCheckpointError(ValueError):
    """A checkpoint whose restored contents do not match the digest recorded at saving."""


def checkpoint_dir(workdir: str) -> str:
    """Where the checkpoints of ``workdir`` live."""
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def unreadable_dir(workdir: str) -> str:
    """Where training sets aside the checkpoints of ``workdir`` that could not be read."""
    return os.path.join(os.path.abspath(workdir), "checkpoints_unreadable")


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


def _words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as uint32 values, one per element, flattened."""
    x = x.reshape(-1)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _leaf_digests(leaves: list[jax.Array]) -> jax.Array:
    """[num_leaves, 2] uint32: each leaf's sum of words and sum of (2 i + 1) word_i, mod 2^32.

    Any change of a single word changes both sums (2 i + 1 is odd, so invertible mod 2^32);
    integer sums do not depend on the reduction order, so devices and hosts agree.
    """
    rows = []
    for leaf in leaves:
        words = _words(leaf)
        weights = 2 * jnp.arange(words.size, dtype=jnp.uint32) + 1
        rows.append(jnp.stack([jnp.sum(words), jnp.sum(words * weights)]))
    return jnp.stack(rows) if rows else jnp.zeros((0, 2), jnp.uint32)


def state_digest(tree: Any) -> list[list[int]]:
    """The integrity digest of a pytree of arrays: ``[[sum, weighted sum], ...]`` per leaf."""
    return np.asarray(jax.device_get(_leaf_digests(jax.tree.leaves(tree)))).tolist()


def _saved_tree(train_state: TrainState) -> dict[str, Any]:
    """The state as the dict of its fields that a checkpoint holds: optional fields that are
    None (e.g. ``time_moments`` without ``model.adaptive_time``) are left out, so the
    checkpoints of a run without them keep the layout of the runs before they existed."""
    fields = {f.name: getattr(train_state, f.name) for f in dataclasses.fields(train_state)}
    return {k: v for k, v in fields.items() if v is not None}


def save(manager: ocp.CheckpointManager, train_state: TrainState, step: int) -> None:
    """Starts saving ``train_state`` as checkpoint ``step`` with its digest.

    Returns once the state is copied off device; the write itself continues in the
    background (``manager.wait_until_finished`` waits for it), so the next training step may
    donate the state's buffers.
    """
    if step in manager.all_steps():
        return
    manager.save(
        step,
        args=ocp.args.StandardSave(_saved_tree(train_state)),
        force=True,
        custom_metadata={DIGEST_KEY: state_digest(train_state)},
    )
    logging.info("Saving checkpoint %d to %s.", step, manager.directory)


def _recorded_digest(folder: str) -> list[list[int]] | None:
    """The digest recorded in checkpoint ``folder``'s metadata; None for a checkpoint saved
    without one (an older run), or without the metadata file (reported by the restore).

    Raises:
      CorruptCheckpointError: the metadata file or its digest does not parse.
    """
    path = os.path.join(folder, METADATA_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        digest = (meta.get("custom_metadata") or {}).get(DIGEST_KEY)
    except (OSError, ValueError, AttributeError) as e:
        raise CorruptCheckpointError(
            f"its metadata file {METADATA_FILE} is damaged ({type(e).__name__}: {e}), so the "
            "digest recorded at saving cannot be read"
        ) from e
    well_formed = isinstance(digest, list) and all(
        isinstance(row, list) and len(row) == 2 and all(isinstance(v, int) for v in row)
        for row in digest
    )
    if digest is not None and not well_formed:
        raise CorruptCheckpointError(
            f"the digest in its metadata file {METADATA_FILE} is damaged (not [[sum, sum], ...])"
        )
    return digest


def _restore_verified(
    manager: ocp.CheckpointManager, step: int, abstract_state: TrainState
) -> TrainState:
    """Checkpoint ``step``, checked against its recorded digest (when it has one)."""
    recorded = _recorded_digest(os.path.join(str(manager.directory), str(step)))
    tree = manager.restore(step, args=ocp.args.StandardRestore(_saved_tree(abstract_state)))
    restored = abstract_state.replace(**tree)
    if recorded is None:
        logging.info("Checkpoint %d has no recorded digest (an older run); not verified.", step)
        return restored
    actual = state_digest(restored)
    if actual != recorded:
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(restored)]
        bad = [paths[i] for i, (a, r) in enumerate(zip(actual, recorded, strict=False)) if a != r]
        raise CorruptCheckpointError(
            f"its contents do not match the digest recorded when it was saved "
            f"(corrupt leaves: {', '.join(bad[:5]) or 'the leaf count differs'})"
        )
    return restored


def _set_aside(workdir: str, step: int) -> None:
    """Moves checkpoint ``step`` to ``checkpoints_unreadable/`` (process 0), never deleting."""
    if jax.process_index() == 0:
        source = os.path.join(checkpoint_dir(workdir), str(step))
        os.makedirs(unreadable_dir(workdir), exist_ok=True)
        target, n = os.path.join(unreadable_dir(workdir), str(step)), 1
        while os.path.exists(target):
            target, n = os.path.join(unreadable_dir(workdir), f"{step}.{n}"), n + 1
        shutil.move(source, target)
        logging.warning("Moved unreadable checkpoint %s to %s.", source, target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"vdm_jax set aside checkpoint {step}")


def _diagnose(folder: str) -> str:
    """What is visibly wrong with a checkpoint folder, as a prefix to orbax's error."""
    if not os.listdir(folder):
        return "the folder is empty; "
    missing = [
        f
        for f in ("_CHECKPOINT_METADATA", "default/_METADATA")
        if not os.path.exists(os.path.join(folder, f))
    ]
    return f"missing {', '.join(missing)} (a partial save?); " if missing else ""


def restore_latest(
    workdir: str, abstract_state: TrainState, *, set_aside: bool = False
) -> TrainState | None:
    """The newest readable checkpoint of ``workdir``, laid out like ``abstract_state``.

    Each try uses its own read-only manager, so a failed read leaves nothing behind.

    Args:
      workdir: the run's directory.
      abstract_state: ``jax.ShapeDtypeStruct`` leaves with shardings
        (:func:`vdm_jax.runner.state.abstract_train_state`).
      set_aside: move unreadable checkpoints out of the way (training: call the training
        manager's ``reload()`` afterwards); False only skips them (evaluation, sampling).

    Returns:
      The restored state, or None if no checkpoint could be read.
    """
    with make_manager(workdir, read_only=True) as manager:
        steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:
        folder = os.path.join(checkpoint_dir(workdir), str(step))
        logging.info("Restoring checkpoint %s.", folder)
        try:
            with make_manager(workdir, read_only=True) as manager:
                return _restore_verified(manager, step, abstract_state)
        except Exception as e:  # Any failure to read it: try the next older one.
            reason = _diagnose(folder) + " ".join(f"{type(e).__name__}: {e}".split())[:400]
            logging.warning("Cannot read checkpoint %s (%s); trying an older one.", folder, reason)
            if set_aside:
                _set_aside(workdir, step)
    return None


def restore_eval_params(exp: Experiment, workdir: str) -> tuple[Any, int]:
    """``(EMA parameters, step)`` of the newest readable checkpoint of ``workdir``, in the
    state's layout, to evaluate or sample with.

    Raises:
      FileNotFoundError: if ``workdir`` has no readable checkpoint.
    """
    restored = restore_latest(workdir, state.abstract_train_state(exp))
    if restored is None:
        raise FileNotFoundError(
            f"no readable checkpoint in {checkpoint_dir(workdir)}; run --mode=train first"
        )
    return restored.ema_params, int(restored.step)
