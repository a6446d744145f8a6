"""Checkpoints released with the reference VDM code (github.com/google-research/vdm), in vdm_jax.

The reference code published two CIFAR-10 checkpoints (its README: ``--mode=eval`` reports
``eval_bpd=2.637`` without and ``2.522`` with augmentation); see :data:`CHECKPOINTS`. This
module reads them without TensorFlow, converts their parameters into the parameter tree of
:class:`vdm_jax.model.VDM` built with the options of :func:`model_overrides` (so that our
model computes the same function), and :func:`import_checkpoint` writes one, once, into a
new workdir (``experiments/import_reference.py``), which the runner then evaluates, samples
and trains like any other. Nothing else in the runner knows about reference checkpoints.

**On-disk format** (CommonLoopUtils ``clu.checkpoint.Checkpoint``, which the reference uses
through ``MultihostCheckpoint(workdir/checkpoints)``: host 0 writes the directory
``checkpoints-0``, the directory the released URLs name)::

    checkpoint                  TF ``CheckpointState`` text: model_checkpoint_path: "ckpt-N"
    ckpt-N.index, ckpt-N.data-* TensorFlow state: only the save counter here (no tf_state)
    ckpt-N.flax                 flax.serialization.to_bytes(TrainState): msgpack

Only ``ckpt-N.flax`` is needed. It holds the state dict of the reference ``TrainState``:
``{"step", "params", "ema_params", "opt_state"}``; ``params`` and ``ema_params`` are
``{"score_model": ..., "gamma": ...}`` (``gamma`` absent for the fixed schedule). The
reference evaluates with ``ema_params``. Local paths need nothing beyond Flax; ``gs://``
paths are read with ``tensorflow.io.gfile``, imported only then (or copy the directory with
``gsutil -m cp -r``).

**Reference parameter layout** (``model_vdm.py``; n = ``sm_n_embd``, L = ``sm_n_layer``,
C = image channels; every Dense / Conv has kernel and bias unless noted)::

    score_model/dense0              kernel [n + 1, 4n]  (time embedding + conditioning flag)
    score_model/dense1              kernel [4n, 4n]
    score_model/conv_in             kernel [3, 3, 5C, n] with Fourier features (else [.., C, n])
    score_model/down.block_{i<L}    ResnetBlock, input width n
    score_model/down.attn_{i}       AttnBlock, only when ``with_attention``
    score_model/mid.block_1, mid.attn_1, mid.block_2
    score_model/up.block_{i<=L}     ResnetBlock, input width 2n (so with nin_shortcut)
    score_model/up.attn_{i}         AttnBlock, only when ``with_attention``
    score_model/GroupNorm_0         scale, bias [n]
    score_model/conv_out            kernel [3, 3, n, C]
    ResnetBlock: GroupNorm_0, conv1, cond_proj (kernel [4n, n], no bias), GroupNorm_1, conv2,
                 nin_shortcut (kernel [in, n]; only when in != n)
    AttnBlock:   GroupNorm_0, q, k, v, proj_out (kernels [n, n])
    gamma: learnable_scalar  w [1], b [1]              gamma(t) = b + |w| t
           learnable_nnet    l1, l2, l3                see schedules.ReferenceNetSchedule
           fixed             (no parameters)

Conversion (:func:`convert_params`): ``dense0/1`` -> ``cond_dense_0/1``; ResnetBlock ->
ResBlock (``GroupNorm_0/1`` -> ``norm_0/1``, ``conv1/2`` -> ``conv_0/1``, ``nin_shortcut`` ->
``skip_proj``, ``cond_proj`` bias = 0); AttnBlock (``q, k, v`` concatenated into ``qkv``);
``mid.block_1, mid.attn_1, mid.block_2`` -> ``mid_res_0, mid_attn, mid_res_1``; final
``GroupNorm_0`` -> ``norm_out``; ``learnable_scalar`` -> ``learned_linear`` with
``gamma_min = b``, ``log_gamma_range = log |w|`` (equal up to float32 rounding of
``exp(log |w|)``); ``learnable_nnet`` -> ``reference_net`` unchanged. Every other step is a
rename: the converted model computes the reference function (``tests/test_reference.py``
checks it against an independent re-derivation of the reference forward pass).

The reference's conditioning input is a flag (0 = image not augmented); its evaluation and
sampling always pass 0. Our ``label_input="flag"`` feeds ``label != 0``: 0 without labels
(``conditioning="none"``) and for the identity D4 element, which is what our evaluation
passes with ``conditioning="augmentation"``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax
import jax
import ml_collections
import numpy as np
from absl import logging

from vdm_jax.runner import checkpoint, data, experiment, state
from vdm_jax.runner import workdir as workdir_lib

Params = dict[str, Any]

# Where the reference README publishes the checkpoints, and what its --mode=eval reports.
CHECKPOINTS = {
    "cifar10": "gs://gresearch/vdm/cifar10/checkpoint-final/checkpoints-0",
    "cifar10_aug": "gs://gresearch/vdm/cifar10/aug-checkpoint-final/checkpoints-0",
}
REPORTED_BPD = {"cifar10": 2.637, "cifar10_aug": 2.522}

# Fixed in the reference code: Fourier exponents range(6, 8), GroupNorm() with 32 groups, and
# the gamma range that rescales gamma_t into [0, 1] for the time embedding (every config).
FOURIER_MIN_EXP, FOURIER_MAX_EXP = 6, 7
NUM_GROUPS = 32
GAMMA_MIN, GAMMA_MAX = -13.3, 5.0

_SCHEDULE_TYPES = ("learnable_scalar", "learnable_nnet", "fixed")


class ReferenceCheckpointError(ValueError):
    """A checkpoint or parameter tree that does not follow the reference layout."""


@dataclasses.dataclass(frozen=True)
class ReferenceArchitecture:
    """What a reference parameter tree says about the model that made it.

    Attributes:
      channels: ``sm_n_embd``, the width of every block.
      num_blocks: ``sm_n_layer``, ResNet blocks on the way down.
      image_channels: C, channels of the data.
      with_attention: attention after every down and up block (``with_attention``).
      fourier_features: whether ``conv_in`` sees Fourier features of z.
      gamma_type: ``learnable_scalar``, ``learnable_nnet`` or ``fixed``.
      gamma_width: hidden width of ``learnable_nnet`` (0 for the others, or ``nonlinear=False``).
    """

    channels: int
    num_blocks: int
    image_channels: int
    with_attention: bool
    fourier_features: bool
    gamma_type: str
    gamma_width: int = 0


def _path(key: tuple[str, ...]) -> str:
    return "/".join(key)


def _unwrap(reference_params: Mapping[str, Any]) -> Mapping[str, Any]:
    """Accepts ``{"score_model", "gamma"}`` or the variables dict ``{"params": {...}}``."""
    if set(reference_params) == {"params"}:
        return reference_params["params"]
    return reference_params


def _shape(tree: Mapping[str, Any], *key: str) -> tuple[int, ...]:
    node: Any = tree
    for k in key:
        if not isinstance(node, Mapping) or k not in node:
            raise ReferenceCheckpointError(
                f"not a reference VDM parameter tree: no {_path(key)!r} (top-level keys: "
                f"{sorted(tree)}); expected the layout of google-research/vdm model_vdm.py"
            )
        node = node[k]
    return tuple(np.shape(node))


def infer_architecture(reference_params: Mapping[str, Any]) -> ReferenceArchitecture:
    """Reads the model's sizes and options off a reference parameter tree.

    Args:
      reference_params: ``params`` or ``ema_params`` of a reference checkpoint.

    Raises:
      ReferenceCheckpointError: if the tree lacks the leaves the sizes are read from.
    """
    tree = _unwrap(reference_params)
    score = tree.get("score_model") if isinstance(tree, Mapping) else None
    if not isinstance(score, Mapping):
        keys = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
        raise ReferenceCheckpointError(
            f"not a reference VDM parameter tree: no 'score_model' (got {keys})"
        )
    channels = _shape(tree, "score_model", "conv_in", "kernel")[-1]
    in_width = _shape(tree, "score_model", "conv_in", "kernel")[-2]
    image_channels = _shape(tree, "score_model", "conv_out", "kernel")[-1]
    down = [int(m.group(1)) for k in score if (m := re.fullmatch(r"down\.block_(\d+)", k))]
    num_blocks = max(down, default=-1) + 1
    n_freqs = FOURIER_MAX_EXP - FOURIER_MIN_EXP + 1
    if in_width == image_channels * (1 + 2 * n_freqs):
        fourier = True
    elif in_width == image_channels:
        fourier = False
    else:
        raise ReferenceCheckpointError(
            f"score_model/conv_in/kernel has {in_width} input channels; expected "
            f"{image_channels} (no Fourier features) or {image_channels * (1 + 2 * n_freqs)}"
        )
    gamma = tree.get("gamma", {})
    if not gamma:
        gamma_type, gamma_width = "fixed", 0
    elif "w" in gamma or "b" in gamma:
        gamma_type, gamma_width = "learnable_scalar", 0
    elif "l1" in gamma:
        gamma_type = "learnable_nnet"
        gamma_width = _shape(tree, "gamma", "l2", "kernel")[-1] if "l2" in gamma else 0
    else:
        raise ReferenceCheckpointError(
            f"unknown reference noise schedule with parameters {sorted(gamma)}; expected "
            "learnable_scalar (w, b), learnable_nnet (l1, l2, l3) or fixed (none)"
        )
    return ReferenceArchitecture(
        channels=channels,
        num_blocks=num_blocks,
        image_channels=image_channels,
        with_attention="down.attn_0" in score or "up.attn_0" in score,
        fourier_features=fourier,
        gamma_type=gamma_type,
        gamma_width=gamma_width,
    )


def model_overrides(
    arch: ReferenceArchitecture, gamma_min: float = GAMMA_MIN, gamma_max: float = GAMMA_MAX
) -> dict[str, Any]:
    """``config.model`` fields (by name) that make the runner build the reference function.

    The score network's sizes and layout, the schedule (``learned_linear``,
    ``reference_net`` with its width and ``schedule_grad = "elbo"``, or ``fixed_linear``),
    ``timesteps = 0`` (continuous time, as in the released configs) and
    ``parameterization = "eps"``. ``gamma_min`` / ``gamma_max`` are the reference config's
    (-13.3 and 5 in all its configs; they rescale gamma_t for the time embedding, and are
    the fixed schedule's, stored in no checkpoint). Dropout (0.1 for CIFAR-10, 0.05 with
    augmentation in the reference configs) is not stored in a checkpoint and does not matter
    for evaluation. ``conditioning`` stays the config's: ``"none"`` for ``cifar10``,
    ``"augmentation"`` for ``cifar10_aug`` (both evaluate with the flag 0, as the reference
    does).
    """
    overrides: dict[str, Any] = dict(
        num_blocks=arch.num_blocks,
        channels=arch.channels,
        attention="all" if arch.with_attention else "middle",
        fourier_features=arch.fourier_features,
        fourier_min_exp=FOURIER_MIN_EXP,
        fourier_max_exp=FOURIER_MAX_EXP,
        gamma_min=gamma_min,
        gamma_max=gamma_max,
        label_input="flag",
        num_groups=NUM_GROUPS,
        min_group_size=1,
        add_z_to_eps=True,
        timesteps=0,
        parameterization="eps",
    )
    if arch.gamma_type == "learnable_scalar":
        overrides["schedule"] = "learned_linear"
    elif arch.gamma_type == "learnable_nnet":
        overrides.update(
            schedule="reference_net", schedule_width=arch.gamma_width, schedule_grad="elbo"
        )
    else:
        overrides["schedule"] = "fixed_linear"
    return overrides


class _Reader:
    """Takes leaves out of a flattened reference tree, recording what is missing or wrong."""

    def __init__(self, tree: Mapping[str, Any]):
        flat = flax.traverse_util.flatten_dict(dict(tree), keep_empty_nodes=False)
        self.left = dict(flat)
        self.missing: list[str] = []
        self.bad_shapes: list[str] = []

    def take(self, key: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
        if key not in self.left:
            self.missing.append(_path(key))
            return np.zeros(shape, np.float32)
        value = np.asarray(self.left.pop(key))
        if value.shape != shape:
            self.bad_shapes.append(f"{_path(key)}: {value.shape}, expected {shape}")
            return np.zeros(shape, np.float32)
        return value.astype(np.float32)

    def dense(self, key: tuple[str, ...], n_in: int, n_out: int, bias: bool = True) -> Params:
        out = {"kernel": self.take((*key, "kernel"), (n_in, n_out))}
        out["bias"] = self.take((*key, "bias"), (n_out,)) if bias else np.zeros(n_out, np.float32)
        return out

    def conv(self, key: tuple[str, ...], n_in: int, n_out: int) -> Params:
        return {
            "kernel": self.take((*key, "kernel"), (3, 3, n_in, n_out)),
            "bias": self.take((*key, "bias"), (n_out,)),
        }

    def norm(self, key: tuple[str, ...], n: int) -> Params:
        return {"scale": self.take((*key, "scale"), (n,)), "bias": self.take((*key, "bias"), (n,))}

    def resnet_block(self, key: tuple[str, ...], n_in: int, n: int) -> Params:
        out = {
            "norm_0": self.norm((*key, "GroupNorm_0"), n_in),
            "conv_0": self.conv((*key, "conv1"), n_in, n),
            # The reference's cond_proj has no bias: ours, zero, adds nothing.
            "cond_proj": self.dense((*key, "cond_proj"), 4 * n, n, bias=False),
            "norm_1": self.norm((*key, "GroupNorm_1"), n),
            "conv_1": self.conv((*key, "conv2"), n, n),
        }
        if n_in != n:
            out["skip_proj"] = self.dense((*key, "nin_shortcut"), n_in, n)
        return out

    def attn_block(self, key: tuple[str, ...], n: int) -> Params:
        q, k, v = (self.dense((*key, name), n, n) for name in ("q", "k", "v"))
        return {
            "norm": self.norm((*key, "GroupNorm_0"), n),
            "qkv": {
                part: np.concatenate([q[part], k[part], v[part]], axis=-1)
                for part in ("kernel", "bias")
            },
            "proj_out": self.dense((*key, "proj_out"), n, n),
        }


def convert_params(
    reference_params: Mapping[str, Any], arch: ReferenceArchitecture | None = None
) -> Params:
    """Converts reference parameters into ours: ``{"score_net": ..., "schedule": ...}``.

    Args:
      reference_params: ``params`` or ``ema_params`` of a reference checkpoint, i.e.
        ``{"score_model": ..., "gamma": ...}`` (or wrapped as ``{"params": ...}``).
      arch: the architecture, if known; else read off the tree (:func:`infer_architecture`).

    Returns:
      Float32 numpy arrays in the tree of the parameters of the model that
      :func:`model_overrides` configures
      (``schedule`` absent for the fixed schedule).

    Raises:
      ReferenceCheckpointError: listing every missing key, unexpected key and wrong shape.
    """
    tree = _unwrap(reference_params)
    arch = arch or infer_architecture(tree)
    if arch.gamma_type not in _SCHEDULE_TYPES:
        raise ReferenceCheckpointError(f"gamma_type must be one of {_SCHEDULE_TYPES}")
    r = _Reader(tree)
    n, c = arch.channels, arch.image_channels
    n_freqs = FOURIER_MAX_EXP - FOURIER_MIN_EXP + 1
    c_in = c * (1 + 2 * n_freqs) if arch.fourier_features else c
    s = ("score_model",)

    net: Params = {
        "cond_dense_0": r.dense((*s, "dense0"), n + 1, 4 * n),
        "cond_dense_1": r.dense((*s, "dense1"), 4 * n, 4 * n),
        "conv_in": r.conv((*s, "conv_in"), c_in, n),
    }
    for i in range(arch.num_blocks):
        net[f"down_{i}"] = r.resnet_block((*s, f"down.block_{i}"), n, n)
        if arch.with_attention:
            net[f"down_attn_{i}"] = r.attn_block((*s, f"down.attn_{i}"), n)
    net["mid_res_0"] = r.resnet_block((*s, "mid.block_1"), n, n)
    net["mid_attn"] = r.attn_block((*s, "mid.attn_1"), n)
    net["mid_res_1"] = r.resnet_block((*s, "mid.block_2"), n, n)
    for i in range(arch.num_blocks + 1):
        net[f"up_{i}"] = r.resnet_block((*s, f"up.block_{i}"), 2 * n, n)
        if arch.with_attention:
            net[f"up_attn_{i}"] = r.attn_block((*s, f"up.attn_{i}"), n)
    net["norm_out"] = r.norm((*s, "GroupNorm_0"), n)
    net["conv_out"] = r.conv((*s, "conv_out"), n, c)
    out: Params = {"score_net": net}

    if arch.gamma_type == "learnable_scalar":
        w = r.take(("gamma", "w"), (1,))
        b = r.take(("gamma", "b"), (1,))
        with np.errstate(divide="ignore"):  # |w| = 0 gives log 0 = -inf, and exp(-inf) = 0.
            log_range = np.asarray(np.log(np.abs(w[0])), np.float32)
        out["schedule"] = {"gamma_min": np.asarray(b[0], np.float32), "log_gamma_range": log_range}
    elif arch.gamma_type == "learnable_nnet":
        sched = {"l1": r.dense(("gamma", "l1"), 1, 1)}
        if arch.gamma_width > 0:
            sched["l2"] = r.dense(("gamma", "l2"), 1, arch.gamma_width)
            sched["l3"] = {"kernel": r.take(("gamma", "l3", "kernel"), (arch.gamma_width, 1))}
        out["schedule"] = sched

    problems = []
    if r.missing:
        problems.append(f"missing keys: {r.missing}")
    if r.left:
        problems.append(f"unexpected keys: {sorted(_path(k) for k in r.left)}")
    if r.bad_shapes:
        problems.append(f"wrong shapes: {r.bad_shapes}")
    if problems:
        raise ReferenceCheckpointError(
            f"parameters do not follow the reference VDM layout for {arch}: " + "; ".join(problems)
        )
    return out


# ---------------------------------------------------------------------------------------------
# Reading the checkpoint files.


def _is_url(path: str) -> bool:
    return re.match(r"^[a-z][a-z0-9+.-]*://", path, re.I) is not None


def _gfile():
    try:
        import tensorflow as tf  # Only for remote paths: TF is not a dependency.
    except ImportError as e:
        raise ImportError(
            "reading a checkpoint from a URL (gs://...) needs TensorFlow's tf.io.gfile, which "
            "is not installed; copy the directory first, e.g. "
            f"`gsutil -m cp -r {CHECKPOINTS['cifar10']} /tmp/vdm_cifar10`, and pass the local "
            "path"
        ) from e
    return tf.io.gfile


def _exists(path: str) -> bool:
    return _gfile().exists(path) if _is_url(path) else os.path.exists(path)


def _isdir(path: str) -> bool:
    return _gfile().isdir(path) if _is_url(path) else os.path.isdir(path)


def _listdir(path: str) -> list[str]:
    return [p.rstrip("/") for p in _gfile().listdir(path)] if _is_url(path) else os.listdir(path)


def _read(path: str, mode: str = "rb") -> Any:
    if _is_url(path):
        with _gfile().GFile(path, mode) as f:
            return f.read()
    with open(path, mode) as f:
        return f.read()


def _join(directory: str, name: str) -> str:
    return (
        f"{directory.rstrip('/')}/{name}" if _is_url(directory) else os.path.join(directory, name)
    )


def _number(name: str) -> int:
    m = re.search(r"-(\d+)\.flax$", name)
    return int(m.group(1)) if m else -1


def find_flax_file(path: str) -> str:
    """The ``ckpt-N.flax`` file that ``clu.checkpoint.Checkpoint(path).restore_dict()`` reads.

    Args:
      path: a checkpoint directory (e.g. ``.../checkpoints-0``; its ``checkpoint`` file names
        the latest checkpoint, as TensorFlow's CheckpointManager wrote it; without one, the
        highest-numbered ``*.flax``), a checkpoint prefix (``.../ckpt-3``) or a ``.flax`` file.

    Raises:
      FileNotFoundError: with what the directory holds, if there is no such file.
    """
    if not _isdir(path):
        for candidate in (path, f"{path}.flax"):
            if candidate.endswith(".flax") and _exists(candidate) and not _isdir(candidate):
                return candidate
        raise FileNotFoundError(f"no reference checkpoint at {path!r} (nor {path + '.flax'!r})")
    index = _join(path, "checkpoint")
    if _exists(index):
        m = re.search(r'^model_checkpoint_path:\s*"(.*)"\s*$', _read(index, "r"), re.M)
        if m:
            prefix = m.group(1)
            # TF writes paths relative to the directory, but older files may hold the absolute
            # path of the machine that trained: then look for the same name here.
            for candidate in (prefix, os.path.basename(prefix)):
                if _is_url(candidate) or os.path.isabs(candidate):
                    full = f"{candidate}.flax"
                else:
                    full = _join(path, f"{candidate}.flax")
                if _exists(full):
                    return full
    flax_files = sorted((f for f in _listdir(path) if f.endswith(".flax")), key=_number)
    if flax_files:
        return _join(path, flax_files[-1])
    raise FileNotFoundError(
        f"no reference checkpoint (ckpt-N.flax) in {path!r}; it holds {sorted(_listdir(path))}"
    )


def load_reference_checkpoint(path: str) -> dict[str, Any]:
    """The raw state dict of a reference (clu) checkpoint, read without TensorFlow.

    Args:
      path: see :func:`find_flax_file`.

    Returns:
      ``{"step", "params", "ema_params", "opt_state"}`` as nested dicts of numpy arrays, as
      ``clu.checkpoint.Checkpoint(path).restore_dict()`` returns them.
    """
    flax_path = find_flax_file(path)
    try:
        state = flax.serialization.msgpack_restore(_read(flax_path))
    except Exception as e:  # msgpack's errors name no file.
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise ReferenceCheckpointError(
            f"{flax_path!r} is not a reference checkpoint: it does not decode ({reason})"
        ) from e
    if not isinstance(state, dict):
        raise ReferenceCheckpointError(f"{flax_path!r} does not hold a state dict")
    return state


class RestoredReference(NamedTuple):
    """A reference checkpoint in our layout.

    Attributes:
      params: the trained parameters, ``{"score_net": ..., "schedule": ...}``.
      ema_params: their EMA (what the reference evaluates and samples with).
      step: the training step of the checkpoint.
      arch: the reference architecture (see :func:`model_overrides`).
    """

    params: Params
    ema_params: Params
    step: int
    arch: ReferenceArchitecture


def restore_reference(path: str) -> RestoredReference:
    """Loads and converts a reference checkpoint (see :func:`load_reference_checkpoint`)."""
    state = load_reference_checkpoint(path)
    missing = [k for k in ("params", "ema_params") if k not in state]
    if missing:
        raise ReferenceCheckpointError(
            f"reference checkpoint {path!r} has no {missing}; it holds {sorted(state)}"
        )
    arch = infer_architecture(state["ema_params"])
    return RestoredReference(
        params=convert_params(state["params"], arch),
        ema_params=convert_params(state["ema_params"], arch),
        step=int(np.asarray(state.get("step", 0))),
        arch=arch,
    )


# ---------------------------------------------------------------------------------------------
# Importing a checkpoint into a workdir.

# The reference's conditioning input is the augmentation flag: no other conditioning fits it.
CONDITIONINGS = ("none", "augmentation")


def config_mismatches(config: ml_collections.ConfigDict, arch: ReferenceArchitecture) -> list[str]:
    """The ``--config.model.X=V`` flags that would make ``config``'s model ``arch``'s (every
    :func:`model_overrides` field, and one score network); empty when it already is."""
    wanted = {**model_overrides(arch), "ensemble_size": 1}
    return [f"--config.model.{k}={v}" for k, v in wanted.items() if config.model.get(k) != v]


def _shape_mismatches(expected: Params, converted: Params) -> list[str]:
    """Leaves of ``converted`` whose path or shape is not that of ``expected`` (shapes)."""
    leaves = jax.tree_util.tree_leaves_with_path
    want = {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in leaves(expected)}
    got = {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in leaves(converted)}
    return [
        f"{key}: {got.get(key, 'absent')} in the checkpoint, {want.get(key, 'absent')} in the model"
        for key in sorted(want.keys() | got.keys())
        if want.get(key) != got.get(key)
    ]


def import_checkpoint(
    path: str,
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    info: data.DatasetInfo | None = None,
) -> int:
    """Writes reference checkpoint ``path`` into the new ``workdir`` as a run of ``config``.

    The workdir then holds what training would have written: the config record and an orbax
    checkpoint at the reference's step, whose ``params`` and ``ema_params`` are the
    reference's (converted) and whose optimizer state, PRNG key and other fields are a fresh
    state's (Adam's moments and count at zero: resuming training restarts the warmup).
    Everything is checked before anything is written.

    Args:
      path: see :func:`find_flax_file`.
      config: an experiment config whose model is the checkpoint's (:func:`model_overrides`;
        ``configs/cifar10.py:reference`` and ``configs/cifar10_aug.py:reference`` describe
        the released ones).
      workdir: absent or empty.
      info: the dataset's facts, if already known (default: opened from ``config.data``).

    Returns:
      The checkpoint's step.

    Raises:
      workdir.WorkdirError: if ``workdir`` is a file, not empty, or cannot be written.
      FileNotFoundError, ReferenceCheckpointError: if ``path`` is not a reference checkpoint,
        or its model is not ``config``'s (naming the flags that would make it so).
      config_validation.ConfigError: if ``config`` is invalid.
    """
    if os.path.isdir(workdir) and os.listdir(workdir):
        raise workdir_lib.WorkdirError(
            f"workdir {workdir!r} is not empty (it holds {sorted(os.listdir(workdir))[:5]}); "
            "import into a new one"
        )
    restored = restore_reference(path)
    wrong = config_mismatches(config, restored.arch)
    if wrong:
        raise ReferenceCheckpointError(
            f"the config's model is not that of {path!r}; add {' '.join(wrong)} (the released "
            "checkpoints: --config=configs/cifar10.py:reference or cifar10_aug.py:reference)"
        )
    if config.model.conditioning not in CONDITIONINGS:
        raise ReferenceCheckpointError(
            f"config.model.conditioning={config.model.conditioning!r}: a reference checkpoint "
            f"is conditioned on the augmentation flag only (allowed: {CONDITIONINGS})"
        )
    exp = experiment.build(config, info=info)
    shapes = state.state_shapes(exp)
    wrong = _shape_mismatches(shapes.params, restored.params)
    if wrong:
        raise ReferenceCheckpointError(
            f"the parameters of {path!r} do not fit the config's model (dataset "
            f"{exp.info.name!r}, images {exp.info.shape}): {'; '.join(wrong[:4])}"
        )
    workdir_lib.prepare(workdir, create=True)
    layout = state.state_shardings(exp, shapes)
    train_state = state.create_train_state(exp).replace(
        step=jax.device_put(np.int32(restored.step), layout.step),
        params=jax.device_put(restored.params, layout.params),
        ema_params=jax.device_put(restored.ema_params, layout.ema_params),
    )
    with checkpoint.make_manager(workdir, max_to_keep=exp.training.max_to_keep) as manager:
        checkpoint.save(manager, train_state, restored.step)
        manager.wait_until_finished()
    workdir_lib.write_config_record(exp, workdir)
    logging.info("Imported %s (step %d) into %s.", path, restored.step, workdir)
    return restored.step
