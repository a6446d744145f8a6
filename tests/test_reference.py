"""Importing checkpoints of the reference VDM code (google-research/vdm) into a workdir.

The released checkpoints cannot be downloaded here, so each test writes a checkpoint in the
reference's on-disk format itself: a parameter tree with the reference's names and shapes
(``model_vdm.py``) and random values, serialized as ``clu.checkpoint.Checkpoint.save`` does it
(``flax.serialization.to_bytes`` of its ``TrainState`` into ``ckpt-N.flax``, next to the
``checkpoint`` index TensorFlow's CheckpointManager writes). The loaded model is compared with
an independent re-derivation of the reference forward pass, written below in float64 numpy
from the reference's math: score network, noise schedule and the negative-ELBO terms. The
model compared is the runner's, restored from the workdir the checkpoint was imported into.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from runner_helpers import REPO, eval_record, eval_run, subprocess_env, tiny_config, train_run

from configs import cifar10, cifar10_aug
from vdm_jax import model, schedules, unet
from vdm_jax.runner import (
    checkpoint,
    config_validation,
    data,
    evaluate,
    experiment,
    reference,
    sampling,
    state,
    workdir,
)

B, HW, C, K = 4, 8, 3, 256
# 64 channels: the reference's 32 GroupNorm groups then hold 2 channels each, so that the
# conditioning (a per-channel shift before GroupNorm) is not erased and is tested too.
N = 64
# The facts of a CIFAR-10-like dataset of B x B images, so that no data has to be present.
INFO = data.DatasetInfo("cifar10", (HW, HW, C), K, 10, 64, 64)

# ---------------------------------------------------------------------------------------------
# The reference parameter layout, with random values.


def _layout(
    n: int, layers: int, with_attention: bool, fourier: bool, gamma_type: str, gamma_width: int
) -> dict[str, Any]:
    """Names and shapes of the reference VDM's ``params`` (model_vdm.py, flax auto-names)."""

    def dense(n_in, n_out, bias=True):
        return {"kernel": (n_in, n_out), **({"bias": (n_out,)} if bias else {})}

    def conv(n_in, n_out):
        return {"kernel": (3, 3, n_in, n_out), "bias": (n_out,)}

    def norm(c):
        return {"scale": (c,), "bias": (c,)}

    def resnet(n_in):
        block = {
            "GroupNorm_0": norm(n_in),
            "conv1": conv(n_in, n),
            "cond_proj": dense(4 * n, n, bias=False),
            "GroupNorm_1": norm(n),
            "conv2": conv(n, n),
        }
        if n_in != n:
            block["nin_shortcut"] = dense(n_in, n)
        return block

    def attn():
        return {"GroupNorm_0": norm(n), **{k: dense(n, n) for k in ("q", "k", "v", "proj_out")}}

    score = {
        "dense0": dense(n + 1, 4 * n),
        "dense1": dense(4 * n, 4 * n),
        "conv_in": conv(C * 5 if fourier else C, n),
    }
    for i in range(layers):
        score[f"down.block_{i}"] = resnet(n)
        if with_attention:
            score[f"down.attn_{i}"] = attn()
    score.update({"mid.block_1": resnet(n), "mid.attn_1": attn(), "mid.block_2": resnet(n)})
    for i in range(layers + 1):
        score[f"up.block_{i}"] = resnet(2 * n)
        if with_attention:
            score[f"up.attn_{i}"] = attn()
    score.update({"GroupNorm_0": norm(n), "conv_out": conv(n, C)})
    tree = {"score_model": score}
    if gamma_type == "learnable_scalar":
        tree["gamma"] = {"w": (1,), "b": (1,)}
    elif gamma_type == "learnable_nnet":
        tree["gamma"] = {
            "l1": dense(1, 1),
            "l2": dense(1, gamma_width),
            "l3": dense(gamma_width, 1, bias=False),
        }
    return tree


def _random_tree(layout: dict[str, Any], seed: int) -> dict[str, Any]:
    """Float32 values; zero-initialised layers of the reference get random values too."""
    rng = np.random.default_rng(seed)
    flat = flax.traverse_util.flatten_dict(layout)  # tuples (shapes) are leaves
    out = {}
    for key, shape in flat.items():
        if key[0] == "gamma":
            continue
        if key[-1] == "kernel":
            value = rng.standard_normal(shape) / math.sqrt(math.prod(shape[:-1]))
        elif key[-1] == "scale":
            value = 1.0 + 0.2 * rng.standard_normal(shape)
        else:
            value = 0.2 * rng.standard_normal(shape)
        out[key] = value.astype(np.float32)
    gamma = layout.get("gamma", {})
    if "w" in gamma:  # Negative w: the schedule must use |w|.
        out[("gamma", "w")] = np.array([-11.0 - seed], np.float32)
        out[("gamma", "b")] = np.array([-6.0 + 0.1 * seed], np.float32)
    elif "l1" in gamma:  # Mixed signs: every kernel must enter through |.|.
        width = gamma["l2"]["kernel"][1]
        out[("gamma", "l1", "kernel")] = np.array([[-8.0]], np.float32)
        out[("gamma", "l1", "bias")] = np.array([-6.5], np.float32)
        out[("gamma", "l2", "kernel")] = (3.0 * rng.standard_normal((1, width))).astype(np.float32)
        out[("gamma", "l2", "bias")] = rng.standard_normal(width).astype(np.float32)
        out[("gamma", "l3", "kernel")] = (8.0 * rng.standard_normal((width, 1))).astype(np.float32)
    return flax.traverse_util.unflatten_dict(out)


class _ReferenceTrainState(flax.struct.PyTreeNode):
    """The fields of the reference ``train_state.TrainState`` (non-pytree fields dropped)."""

    step: int
    params: Any
    ema_params: Any
    opt_state: Any
    tx_fn: Callable = flax.struct.field(pytree_node=False)


def _write_clu_checkpoint(directory, number: int, params, ema_params, step: int) -> str:
    """Writes ``ckpt-{number}`` as ``clu.checkpoint.Checkpoint.save`` does; returns the prefix.

    The ``.flax`` file is exactly clu's (``flax.serialization.to_bytes(state)``); the
    TensorFlow part (``.index``, ``.data``) holds only a save counter and cannot be written
    without TensorFlow, so empty files stand in for it: the loader never reads them.
    """
    os.makedirs(directory, exist_ok=True)
    tx = optax.adamw(2e-4, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01)
    ref_state = _ReferenceTrainState(step, params, ema_params, tx.init(params), tx_fn=None)
    prefix = os.path.join(directory, f"ckpt-{number}")
    with open(f"{prefix}.flax", "wb") as f:
        f.write(flax.serialization.to_bytes(ref_state))
    for suffix in (".index", ".data-00000-of-00001"):
        open(prefix + suffix, "wb").close()
    numbers = sorted(int(name[5:-5]) for name in os.listdir(directory) if name.endswith(".flax"))
    with open(os.path.join(directory, "checkpoint"), "w") as f:
        f.write(f'model_checkpoint_path: "ckpt-{number}"\n')
        for k in numbers:
            f.write(f'all_model_checkpoint_paths: "ckpt-{k}"\n')
    return prefix


# ---------------------------------------------------------------------------------------------
# The reference forward pass, re-derived in float64 numpy from model_vdm.py.


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _swish(x):
    return x * _sigmoid(x)


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _log_softmax(x, axis=-1):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def _f64(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def _dense(x, p):
    return x @ p["kernel"] + p.get("bias", 0.0)


def _conv3x3(x, p):
    """Flax nn.Conv(kernel_size=(3, 3)): stride 1, SAME padding, kernel HWIO."""
    h, w = x.shape[1:3]
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = sum(
        xp[:, dy : dy + h, dx : dx + w] @ p["kernel"][dy, dx] for dy in range(3) for dx in range(3)
    )
    return out + p["bias"]


def _group_norm(x, p, groups=32, eps=1e-6):
    """Flax nn.GroupNorm() defaults: 32 groups, epsilon 1e-6, statistics over H, W, group."""
    g = x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * p["scale"] + p["bias"]


def _resnet_block(x, cond, p):
    n = p["conv1"]["kernel"].shape[-1]
    h = _conv3x3(_swish(_group_norm(x, p["GroupNorm_0"])), p["conv1"])
    h = h + (cond @ p["cond_proj"]["kernel"])[:, None, None, :]
    h = _conv3x3(_swish(_group_norm(h, p["GroupNorm_1"])), p["conv2"])  # dropout: eval
    if x.shape[-1] != n:
        x = _dense(x, p["nin_shortcut"])
    return x + h


def _attn_block(x, p):
    b, hgt, wid, c = x.shape
    h = _group_norm(x, p["GroupNorm_0"])
    q, k, v = (_dense(h, p[name]).reshape(b, hgt * wid, c) for name in ("q", "k", "v"))
    weights = _softmax(np.einsum("bic,bjc->bij", q / np.sqrt(c), k))  # one head, depth c
    out = np.einsum("bij,bjc->bic", weights, v).reshape(x.shape)
    return x + _dense(out, p["proj_out"])


def _timestep_embedding(t, dim):
    half = dim // 2
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))
    args = (1000.0 * t)[:, None] * freqs
    return np.concatenate([np.sin(args), np.cos(args)], axis=1)


def _base2_fourier_features(z, start=6, stop=8):
    """Channel c, exponent k at index c * n + (k - start); all sines, then all cosines.

    The reference forms the arguments ``2^k 2 pi z`` in the input's dtype, float32; at
    ``2^7 2 pi |z| ~ 2000`` their rounding (~1e-4 rad) is part of the function it computes,
    so the arguments are rounded to float32 here too (the rest stays float64).
    """
    ks = np.arange(start, stop)
    w = np.tile(2.0**ks * 2 * np.float32(np.pi), z.shape[-1]).astype(np.float32)  # [w6, w7, ..]
    h = np.repeat(z.astype(np.float32), len(ks), axis=-1) * w  # [z0, z0, z1, z1, ...]
    h = h.astype(np.float32).astype(np.float64)
    return np.concatenate([np.sin(h), np.cos(h)], axis=-1)


def _score_model(p, z, g_t, conditioning, fourier=True, gamma_min=-13.3, gamma_max=5.0):
    """eps_hat of the reference ScoreUNet (deterministic)."""
    t = (g_t - gamma_min) / (gamma_max - gamma_min)
    cond = np.concatenate(
        [_timestep_embedding(t, p["conv_in"]["kernel"].shape[-1]), conditioning[:, None]], axis=1
    )
    cond = _swish(_dense(_swish(_dense(cond, p["dense0"])), p["dense1"]))
    h = np.concatenate([z, _base2_fourier_features(z)], axis=-1) if fourier else z
    hs = [_conv3x3(h, p["conv_in"])]
    layers = sum(1 for k in p if k.startswith("down.block_"))
    for i in range(layers):
        h = _resnet_block(hs[-1], cond, p[f"down.block_{i}"])
        if f"down.attn_{i}" in p:
            h = _attn_block(h, p[f"down.attn_{i}"])
        hs.append(h)
    h = _resnet_block(hs[-1], cond, p["mid.block_1"])
    h = _resnet_block(_attn_block(h, p["mid.attn_1"]), cond, p["mid.block_2"])
    for i in range(layers + 1):
        h = _resnet_block(np.concatenate([h, hs.pop()], axis=-1), cond, p[f"up.block_{i}"])
        if f"up.attn_{i}" in p:
            h = _attn_block(h, p[f"up.attn_{i}"])
    h = _conv3x3(_swish(_group_norm(h, p["GroupNorm_0"])), p["conv_out"])
    return h + z  # the reference's "base measure"


def _gamma_and_derivative(p, t, gamma_min=-13.3, gamma_max=5.0):
    """gamma(t) and d gamma / dt of the reference schedules, the derivative by hand."""
    t = np.asarray(t, np.float64)
    if "w" in p:  # NoiseSchedule_Scalar
        w, b = np.abs(p["w"][0]), p["b"][0]
        return b + w * t, w + 0 * t
    if "l1" in p:  # NoiseSchedule_NNet
        w1, b1 = np.abs(p["l1"]["kernel"][0, 0]), p["l1"]["bias"][0]
        w2, b2 = np.abs(p["l2"]["kernel"][0]), p["l2"]["bias"]
        w3 = np.abs(p["l3"]["kernel"][:, 0])
        s = _sigmoid(2.0 * (t[..., None] - 0.5) * w2 + b2)
        gamma = b1 + w1 * t + (2.0 * (s - 0.5)) @ w3 / len(w3)
        return gamma, w1 + (4.0 * s * (1.0 - s) * w2) @ w3 / len(w3)
    return gamma_min + (gamma_max - gamma_min) * t, (gamma_max - gamma_min) + 0 * t


def _negative_elbo(p, x, t, eps, eps_0, conditioning, fourier=True):
    """VDM.__call__ of the reference (continuous time), in nats per example, given the noise."""
    sched = p.get("gamma", {})
    f = 2.0 * ((x + 0.5) / K) - 1.0
    (g_0, _), (g_1, _) = _gamma_and_derivative(sched, 0.0), _gamma_and_derivative(sched, 1.0)
    var_1 = _sigmoid(g_1)
    z_0_rescaled = f + np.exp(0.5 * g_0) * eps_0
    centres = 2.0 * ((np.arange(K) + 0.5) / K) - 1.0
    logits = -0.5 * np.square((z_0_rescaled[..., None] - centres) * np.exp(-0.5 * g_0))
    logprobs = np.take_along_axis(_log_softmax(logits), x[..., None].astype(int), -1)
    g_t, dg_t = _gamma_and_derivative(sched, t)
    var_t = _sigmoid(g_t)[:, None, None, None]
    z_t = np.sqrt(1.0 - var_t) * f + np.sqrt(var_t) * eps
    eps_hat = _score_model(p["score_model"], z_t, g_t, conditioning, fourier)
    return {
        "recon": -logprobs.sum(axis=(1, 2, 3, 4)),
        "prior": 0.5 * np.sum((1.0 - var_1) * f**2 + var_1 - np.log(var_1) - 1.0, axis=(1, 2, 3)),
        "diffusion": 0.5 * dg_t * np.sum(np.square(eps - eps_hat), axis=(1, 2, 3)),
    }


def _reference_config(
    arch: reference.ReferenceArchitecture, **overrides: Any
) -> ml_collections.ConfigDict:
    """``configs/test.py`` on 8-bit, 3-channel images, with ``arch``'s model."""
    model_fields = {f"model.{k}": v for k, v in reference.model_overrides(arch).items()}
    cifar = {"data.name": "cifar10", "data.vocab_size": K}
    return tiny_config(**cifar, **model_fields, **overrides)


# ---------------------------------------------------------------------------------------------
# Tests.

CASES = {
    # The released CIFAR-10 configs: scalar schedule, attention only in the middle, flag 0.
    "cifar10": dict(
        layers=2, with_attention=False, fourier=True, gamma_type="learnable_scalar", labels=None
    ),
    # cifar10_aug_paper-like: NNet schedule, attention everywhere, augmentation flags.
    "nnet_attention_aug": dict(
        layers=1,
        with_attention=True,
        fourier=True,
        gamma_type="learnable_nnet",
        labels=np.array([0, 3, 5, 0]),
    ),
    "fixed_no_fourier": dict(
        layers=1, with_attention=False, fourier=False, gamma_type="fixed", labels=None
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_computes_the_reference_function(tmp_path, case):
    spec = CASES[case]
    layout = _layout(
        N,
        spec["layers"],
        spec["with_attention"],
        spec["fourier"],
        spec["gamma_type"],
        gamma_width=16,
    )
    params, ema_params = _random_tree(layout, seed=1), _random_tree(layout, seed=2)
    older = _random_tree(layout, seed=3)
    ckpt = str(tmp_path / "ref")
    _write_clu_checkpoint(ckpt, 1, older, older, step=10)
    _write_clu_checkpoint(ckpt, 2, params, ema_params, step=20)

    raw = reference.load_reference_checkpoint(ckpt)
    assert set(raw) == {"step", "params", "ema_params", "opt_state"} and raw["step"] == 20
    restored = reference.restore_reference(ckpt)
    arch = restored.arch
    assert (arch.channels, arch.num_blocks, arch.image_channels) == (N, spec["layers"], C)
    assert (arch.with_attention, arch.fourier_features, arch.gamma_type) == (
        spec["with_attention"],
        spec["fourier"],
        spec["gamma_type"],
    )
    assert restored.step == 20
    params_ours, ema_ours = restored.params, restored.ema_params
    assert not np.array_equal(
        params_ours["score_net"]["conv_in"]["kernel"], ema_ours["score_net"]["conv_in"]["kernel"]
    )

    # Imported into a workdir; the runner's model, and the EMA parameters it evaluates with.
    labels = spec["labels"]
    augmented = {"data.augment": True, "model.conditioning": "augmentation"}
    config = _reference_config(arch, **(augmented if labels is not None else {}))
    work = str(tmp_path / "work")
    assert reference.import_checkpoint(ckpt, config, work, info=INFO) == 20
    exp = experiment.build(config, jax.devices()[:1], info=INFO)
    ours, step = checkpoint.restore_eval_params(exp, work)
    assert step == 20
    jax.tree_util.tree_map(np.testing.assert_array_equal, ours, restored.ema_params)
    vdm = exp.vdm
    ref = _f64(ema_params)

    # The converted tree is exactly our model's tree: same names, shapes and dtypes.
    rng = np.random.default_rng(0)
    z = rng.standard_normal((B, HW, HW, C)).astype(np.float32)
    label = None if labels is None else jnp.asarray(labels)
    init = jax.eval_shape(lambda: vdm.init(jax.random.key(0), z, jnp.zeros(B), label))["params"]
    assert jax.tree_util.tree_structure(init) == jax.tree_util.tree_structure(ours)
    for want, got in zip(
        jax.tree_util.tree_leaves(init), jax.tree_util.tree_leaves(ours), strict=True
    ):
        assert (want.shape, want.dtype) == (got.shape, got.dtype)

    conditioning = np.zeros(B) if labels is None else (labels != 0).astype(np.float64)

    # Schedule gamma(t) and its derivative on a grid.
    t = np.linspace(0.0, 1.0, 11, dtype=np.float32)
    gamma_fn = lambda u: vdm.apply({"params": ours}, u, method=model.VDM.gamma)  # noqa: E731
    gamma, dgamma = schedules.gamma_and_derivative(gamma_fn, jnp.asarray(t))
    ref_gamma, ref_dgamma = _gamma_and_derivative(ref.get("gamma", {}), t)
    np.testing.assert_allclose(gamma, ref_gamma, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(dgamma, ref_dgamma, rtol=1e-5)
    assert np.all(np.diff(ref_gamma) > 0)

    # eps_hat at several noise levels, flags included.
    g_t = np.array([-12.0, -4.0, 0.5, 4.5], np.float32)
    eps = vdm.apply({"params": ours}, z, g_t, label, train=False, method=model.VDM.eps)
    ref_eps = _score_model(
        ref["score_model"],
        z.astype(np.float64),
        g_t.astype(np.float64),
        conditioning,
        spec["fourier"],
    )
    scale = np.abs(ref_eps - z).max()
    assert scale > 0.1  # the network does contribute beyond the "+ z"
    np.testing.assert_allclose(eps, ref_eps, rtol=0, atol=2e-5 * scale)
    # The time embedding and the flag both matter (conditioning survives the GroupNorms).
    other = _score_model(
        ref["score_model"], z.astype(np.float64), g_t + 1.0, conditioning, spec["fourier"]
    )
    assert np.abs(other - ref_eps).max() > 1e-3 * scale
    if labels is not None:
        flipped = _score_model(
            ref["score_model"],
            z.astype(np.float64),
            g_t.astype(np.float64),
            1.0 - conditioning,
            spec["fourier"],
        )
        assert np.abs(flipped - ref_eps).max() > 1e-3 * scale

    # Per-example negative-ELBO terms (bits/dim) from our loss, with the reference's math
    # fed the same noise: our vdm_terms draws t, eps, eps_0 from `key` as replicated here.
    x = rng.integers(0, K, (B, HW, HW, C))
    batch = {"image": jnp.asarray(x)} | ({} if labels is None else {"label": label})
    key = jax.random.key(7)
    cfg = model.LossConfig(vocab_size=K, timesteps=0, antithetic_time=True)
    terms = model.vdm_terms(vdm, ours, batch, key, cfg)
    key_t, key_rest = jax.random.split(key)
    key_eps, key_0 = jax.random.split(key_rest)
    t0 = float(jax.random.uniform(key_t, ()))
    t_ref = np.mod(t0 + np.arange(0.0, 1.0, 1.0 / B), 1.0)  # antithetic, as the reference
    noise = [np.asarray(jax.random.normal(k, x.shape), np.float64) for k in (key_eps, key_0)]
    ref_terms = _negative_elbo(ref, x, t_ref, *noise, conditioning, spec["fourier"])
    to_bpd = 1.0 / (HW * HW * C * np.log(2.0))
    for name in ("prior", "recon", "diffusion"):
        np.testing.assert_allclose(
            terms[name], ref_terms[name] * to_bpd, rtol=2e-5, atol=1e-5, err_msg=name
        )
    assert np.all(ref_terms["diffusion"] * to_bpd > 1e-2)  # a non-trivial diffusion term


def _tiny_reference(gamma_type="learnable_scalar", seed=0):
    layout = _layout(32, 1, False, True, gamma_type, gamma_width=4)
    return _random_tree(layout, seed)


def test_wrong_or_missing_keys_are_listed():
    tree = _tiny_reference()
    del tree["score_model"]["up.block_1"]["nin_shortcut"]
    tree["score_model"]["extra"] = {"kernel": np.zeros((2, 2), np.float32)}
    tree["score_model"]["dense1"]["kernel"] = np.zeros((7, 128), np.float32)
    with pytest.raises(reference.ReferenceCheckpointError) as info:
        reference.convert_params(tree)
    msg = str(info.value)
    assert "missing keys: ['score_model/up.block_1/nin_shortcut/kernel'," in msg
    assert "score_model/up.block_1/nin_shortcut/bias" in msg
    assert "unexpected keys: ['score_model/extra/kernel']" in msg
    assert "wrong shapes: ['score_model/dense1/kernel: (7, 128), expected (128, 128)']" in msg

    with pytest.raises(reference.ReferenceCheckpointError, match="no 'score_model'"):
        reference.convert_params({"score_net": {}})
    bad_gamma = _tiny_reference() | {"gamma": {"slope": np.ones(1, np.float32)}}
    with pytest.raises(reference.ReferenceCheckpointError, match="unknown reference noise"):
        reference.convert_params(bad_gamma)
    # The variables dict {"params": ...} is accepted too, and conversion is deterministic.
    tree = _tiny_reference("learnable_nnet")
    a, b = reference.convert_params({"params": tree}), reference.convert_params(tree)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    assert set(a["schedule"]) == {"l1", "l2", "l3"}


def test_checkpoint_files_are_found(tmp_path):
    tree = _tiny_reference()
    with pytest.raises(FileNotFoundError, match="no reference checkpoint"):
        reference.load_reference_checkpoint(str(tmp_path))
    prefix = _write_clu_checkpoint(tmp_path / "a", 2, tree, tree, step=2)
    _write_clu_checkpoint(tmp_path / "a", 10, tree, tree, step=10)
    # A prefix and a .flax file name one checkpoint; a directory its latest.
    assert reference.load_reference_checkpoint(prefix)["step"] == 2
    assert reference.load_reference_checkpoint(prefix + ".flax")["step"] == 2
    assert reference.load_reference_checkpoint(str(tmp_path / "a"))["step"] == 10
    # An index with the absolute path of the machine that trained: the same name here.
    with open(tmp_path / "a" / "checkpoint", "w") as f:
        f.write('model_checkpoint_path: "/gone/workdir/checkpoints-0/ckpt-2"\n')
    assert reference.load_reference_checkpoint(str(tmp_path / "a"))["step"] == 2
    # No index: the highest number (10, not the lexicographic last, 2).
    os.remove(tmp_path / "a" / "checkpoint")
    assert reference.load_reference_checkpoint(str(tmp_path / "a"))["step"] == 10
    # A state without ema_params is not a reference checkpoint.
    with open(tmp_path / "b.flax", "wb") as f:
        f.write(flax.serialization.to_bytes({"step": 1, "params": tree}))
    with pytest.raises(reference.ReferenceCheckpointError, match=r"has no \['ema_params'\]"):
        reference.restore_reference(str(tmp_path / "b.flax"))


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is not None, reason="needs TensorFlow to be absent"
)
def test_remote_path_without_tensorflow_says_what_to_do():
    with pytest.raises(ImportError, match="gsutil -m cp -r"):
        reference.load_reference_checkpoint(reference.CHECKPOINTS["cifar10"])


def test_model_overrides_for_released_checkpoints():
    # The released CIFAR-10 checkpoint's architecture (configs/cifar10.py of the reference).
    arch = reference.ReferenceArchitecture(
        channels=128,
        num_blocks=32,
        image_channels=3,
        with_attention=False,
        fourier_features=True,
        gamma_type="learnable_scalar",
    )
    overrides = reference.model_overrides(arch)
    assert overrides == {
        "num_blocks": 32,
        "channels": 128,
        "attention": "middle",
        "fourier_features": True,
        "fourier_min_exp": 6,
        "fourier_max_exp": 7,
        "gamma_min": -13.3,
        "gamma_max": 5.0,
        "label_input": "flag",
        "num_groups": 32,
        "min_group_size": 1,
        "add_z_to_eps": True,
        "schedule": "learned_linear",
        "timesteps": 0,
        "parameterization": "eps",
    }
    # At 128 and 320 channels our default GroupNorm grouping is the reference's as well.
    for width in (128, 256, 320, 640):
        assert unet._num_groups(32, width, unet.MIN_GROUP_SIZE) == 32
    nnet = reference.model_overrides(
        reference.ReferenceArchitecture(256, 32, 3, True, True, "learnable_nnet", 1024)
    )
    assert nnet["schedule"] == "reference_net" and nnet["schedule_width"] == 1024
    assert nnet["attention"] == "all" and nnet["schedule_grad"] == "elbo"
    # The configs' "reference" variants are the released checkpoints' models (the reference's
    # configs/cifar10.py and cifar10_aug.py: 128 and 320 channels); the defaults are not.
    aug = dataclasses.replace(arch, channels=320)
    assert reference.config_mismatches(cifar10.get_config("reference"), arch) == []
    assert reference.config_mismatches(cifar10_aug.get_config("reference"), aug) == []
    assert "--config.model.label_input=flag" in reference.config_mismatches(
        cifar10.get_config(), arch
    )


def test_reference_net_schedule_init_and_monotone():
    sched = schedules.make_schedule("reference_net", width=64)
    params = sched.init(jax.random.key(0), jnp.zeros(()))["params"]
    assert jax.tree_util.tree_map(jnp.shape, params) == {
        "l1": {"kernel": (1, 1), "bias": (1,)},
        "l2": {"kernel": (1, 64), "bias": (64,)},
        "l3": {"kernel": (64, 1)},
    }
    ends = sched.apply({"params": params}, jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(ends, [-13.3, 5.0], atol=0.02)  # nearly linear at init
    # Any signs: non-decreasing, as |W| makes it.
    params = jax.tree_util.tree_map(lambda a: -10.0 * jnp.ones_like(a), params)
    t = jnp.linspace(0.0, 1.0, 101)
    assert jnp.all(jnp.diff(sched.apply({"params": params}, t)) > 0)
    assert sched.apply({"params": params}, jnp.zeros((2, 3))).shape == (2, 3)


def _imported_pair(tmp_path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A small reference checkpoint at step 1234: ``(path, params, ema_params)``."""
    layout = _layout(32, 1, False, True, "learnable_scalar", gamma_width=4)
    params, ema_params = _random_tree(layout, 0), _random_tree(layout, 1)
    ckpt = str(tmp_path / "ref")
    _write_clu_checkpoint(ckpt, 3, params, ema_params, step=1234)
    return ckpt, params, ema_params


@pytest.mark.slow
def test_import_writes_a_workdir_the_runner_restores(tmp_path):
    ckpt, _, _ = _imported_pair(tmp_path)
    restored = reference.restore_reference(ckpt)
    config = _reference_config(restored.arch)
    work = str(tmp_path / "work")
    assert reference.import_checkpoint(ckpt, config, work, info=INFO) == 1234
    assert sorted(os.listdir(work)) == ["checkpoints", workdir.RECORD]
    exp = experiment.build(config, jax.devices()[:1], info=INFO)
    with open(os.path.join(work, workdir.RECORD)) as f:
        assert json.load(f) == workdir.config_record(exp)
    workdir.check_config_record(exp, work)
    # The whole train state, verified against its digest: the reference's parameters and EMA
    # parameters, at its step; a fresh optimizer state (Adam's count and moments at zero).
    train_state = checkpoint.restore_latest(work, state.abstract_train_state(exp))
    assert int(train_state.step) == 1234
    jax.tree_util.tree_map(np.testing.assert_array_equal, train_state.params, restored.params)
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, train_state.ema_params, restored.ema_params
    )
    fresh = state.create_train_state(exp)
    jax.tree_util.tree_map(np.testing.assert_array_equal, train_state.opt_state, fresh.opt_state)
    # Once only: the workdir now holds a run.
    with pytest.raises(workdir.WorkdirError, match="is not empty"):
        reference.import_checkpoint(ckpt, config, work, info=INFO)


def test_import_refuses_in_one_line_before_writing_anything(tmp_path):
    ckpt, _, _ = _imported_pair(tmp_path)
    arch = reference.restore_reference(ckpt).arch
    work = str(tmp_path / "work")
    garbage = tmp_path / "ckpt-3.flax"
    garbage.write_bytes(b"\x93not msgpack at all" * 10)
    grey = data.DatasetInfo("cifar10", (HW, HW, 1), K, 10, 64, 64)
    plain = tiny_config(**{"data.name": "cifar10", "data.vocab_size": K})
    for error, match, changes in (
        # Not a reference checkpoint.
        (FileNotFoundError, "no reference checkpoint", {"path": str(tmp_path / "nowhere")}),
        (reference.ReferenceCheckpointError, "does not decode", {"path": str(garbage)}),
        # A config whose model is not the checkpoint's: the flags that would make it so.
        (
            reference.ReferenceCheckpointError,
            r"not that of .*ref'; add --config\.model\.channels=32 .*--config\.model\.label_inp",
            {"config": plain},
        ),
        (
            reference.ReferenceCheckpointError,
            r"add --config\.model\.ensemble_size=1 ",
            {"config": _reference_config(arch, **{"model.ensemble_size": 2})},
        ),
        (
            reference.ReferenceCheckpointError,
            r"conditioning='label': .* the augmentation flag only",
            {"config": _reference_config(arch, **{"model.conditioning": "label"})},
        ),
        # Images whose channels are not the checkpoint's; a file for a workdir.
        (
            reference.ReferenceCheckpointError,
            r"do not fit the config's model .*\(8, 8, 1\).*conv_in.*kernel.*: \(3, 3, 15, 32\) in",
            {"info": grey},
        ),
        (workdir.WorkdirError, "is a file", {"target": str(garbage)}),
        # An invalid config: every problem named, as --mode=train names them.
        (
            config_validation.ConfigError,
            r"config\.training\.num_steps=-1",
            {"config": _reference_config(arch, **{"training.num_steps": -1})},
        ),
    ):
        args = {"path": ckpt, "config": _reference_config(arch), "target": work, **changes}
        with pytest.raises(error, match=match) as info:
            reference.import_checkpoint(
                args["path"], args["config"], args["target"], info=args.get("info", INFO)
            )
        assert error is config_validation.ConfigError or "\n" not in str(info.value)
        assert not os.path.exists(work)
    os.makedirs(work)
    (tmp_path / "work" / "notes.txt").write_text("mine")
    with pytest.raises(workdir.WorkdirError, match=r"is not empty \(it holds \['notes.txt'\]\)"):
        reference.import_checkpoint(ckpt, _reference_config(arch), work, info=INFO)
    assert os.listdir(work) == ["notes.txt"]


def test_import_command_refuses_in_one_line(tmp_path):
    garbage = tmp_path / "ckpt-3.flax"
    garbage.write_bytes(b"\x93not msgpack at all" * 10)
    command = [
        sys.executable,
        "-m",
        "experiments.import_reference",
        str(garbage),
        str(tmp_path / "work"),
        "--config=configs/cifar10.py:reference",
    ]
    result = subprocess.run(
        command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    assert "ReferenceCheckpointError: " in result.stderr and "does not decode" in result.stderr
    assert "Traceback" not in result.stderr and not os.path.exists(tmp_path / "work")


# What --mode=eval reported for this checkpoint and config when it read the reference
# checkpoint directly (config.eval.reference_checkpoint, before the import replaced it).
DIRECT_EVAL_BPD = 12.033646583557129


@pytest.mark.slow
def test_imported_workdir_evaluates_samples_and_trains_like_any_other(tmp_path, monkeypatch):
    """Import, then --mode=eval, --mode=sample and --mode=train through the runner: the EMA
    parameters (not the raw ones) are evaluated, to the figure of the direct evaluation."""
    # TFDS's mock data has no files for the runner's check of a prepared build to find (that
    # check has its own tests in test_data.py): read the mock's data source directly.
    def open_mock_split(name: str, split: str, data_dir: str | None) -> data._TfdsSplit:
        source = tfds.data_source("cifar10", split={"train": "train", "eval": "test"}[split])
        return data._TfdsSplit(name, (32, 32, 3), source, has_labels=True)

    spec = dataclasses.replace(data.DATASETS["cifar10"], open_split=open_mock_split)
    monkeypatch.setitem(data.DATASETS, "cifar10", spec)
    ckpt, _, _ = _imported_pair(tmp_path)
    restored = reference.restore_reference(ckpt)
    config = _reference_config(restored.arch, **{"eval.batch_size": 8})
    work = str(tmp_path / "work")
    devices = jax.devices()[:1]
    with tfds.testing.mock_data(num_examples=12):
        reference.import_checkpoint(ckpt, config, work)
        record = eval_run(config, work, devices=devices)
        assert record["step"] == 1234 and record["num_examples"] == 12
        assert record["bpd"] == pytest.approx(DIRECT_EVAL_BPD, rel=1e-5)
        exp = experiment.build(config, devices)
        evaluator = evaluate.Evaluator(exp)
        for params, expect_equal in ((restored.ema_params, True), (restored.params, False)):
            assert np.isclose(evaluator(params).bpd, record["bpd"], rtol=1e-6) == expect_equal
        assert eval_record(work, 1234)["bpd"] == record["bpd"]

        # Sampling settings may change, as for any workdir.
        small = {"sample.num_samples": 2, "sample.batch_size": 2, "sample.num_steps": 2}
        samples = sampling.run_sample(
            experiment.build(_reference_config(restored.arch, **small), devices), work
        )
        assert samples.shape == (2, 32, 32, C) and os.path.exists(
            os.path.join(work, "samples", "step_1234.png")
        )

        # Training resumes at the reference's step, from its parameters and EMA.
        longer = {
            "training.num_steps": 1235,
            "training.eval_every": 10**6,
            "training.sample_every": 10**6,
        }
        trained = train_run(_reference_config(restored.arch, **longer), work, devices=devices)
    assert int(trained.step) == 1235
    assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["1234", "1235"]
    moved = jax.tree.map(
        lambda a, b: float(np.abs(np.asarray(a) - b).max()), trained.ema_params, restored.ema_params
    )
    assert 0 < max(jax.tree.leaves(moved)) < 1e-2
