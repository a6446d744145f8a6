"""Evaluation (bpd over the whole split) and sampling, during training and as run modes.

* :func:`evaluate`: every real example of the eval split once (padding masked out),
  ``eval.num_time_samples`` time / noise draws per image averaged per image, then the mean
  over images and its standard error ``std / sqrt(N)``, for the total bpd and each term.
  The standard error treats the per-image estimates as independent; it covers both the
  spread of the data and the Monte Carlo noise of the time / noise draws. Deterministic for
  ``config.seed`` and ``eval.batch_size`` (times are antithetic over each global batch if
  ``model.antithetic_time``), and independent of the number of devices and hosts.
* :func:`sample`: integer samples from the reverse process (``vdm_jax.samplers``).
* :func:`run_eval`, :func:`run_sample`: ``--mode=eval`` / ``--mode=sample`` on the latest
  checkpoint of a workdir, with its EMA parameters.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh
from PIL import Image

from vdm_jax import checkpoint, data, model, samplers, sharding, state

Params = Any
# `fold_in` constants that separate the eval and sampling randomness from training's.
EVAL_STREAM = 1
SAMPLE_STREAM = 2
# Term names of `model.vdm_terms` -> the names logged for them.
TERM_NAMES = {"prior": "bpd_prior", "recon": "bpd_recon", "diffusion": "bpd_diff"}
# Sample grids show each image at least this many pixels high.
_MIN_DISPLAY_SIZE = 32


def model_batch(
    batch: Mapping[str, np.ndarray], conditioning: str, *, train: bool
) -> dict[str, np.ndarray]:
    """The parts of a data batch the model takes, as the config's conditioning wants them.

    Args:
      batch: ``{"image": int [b, H, W, C], "label": int [b], ...}`` from ``vdm_jax.data``.
      conditioning: ``"none"`` (the label is dropped), ``"label"`` (kept) or
        ``"augmentation"`` (the D4 index when training; the identity, 0, when evaluating).
      train: whether this is a training batch.

    Returns:
      ``{"image"}`` or ``{"image", "label"}``.
    """
    if conditioning == "none":
        return {"image": batch["image"]}
    label = batch["label"]
    if conditioning == "augmentation" and not train:
        label = np.zeros_like(label)
    return {"image": batch["image"], "label": label}


def make_eval_step(
    vdm: model.VDM, loss_cfg: model.LossConfig, num_time_samples: int, mesh: Mesh
) -> Callable[[Params, dict[str, jax.Array], jax.Array], dict[str, jax.Array]]:
    """The jitted per-example eval: ``(params, batch, key) -> {term: [B]}`` in bits/dim.

    Each term is averaged over ``num_time_samples`` draws (keys ``fold_in(key, i)``) of
    the time and noise; ``bpd`` is their sum. Outputs are replicated so that every host can
    read the whole batch.
    """

    def eval_step(params: Params, batch: dict[str, jax.Array], key: jax.Array):
        batch_size = batch["image"].shape[0]

        def add_sample(i: jax.Array, sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
            terms = model.vdm_terms(vdm, params, batch, jax.random.fold_in(key, i), loss_cfg)
            return {k: sums[k] + terms[k] for k in sums}

        zeros = {k: jnp.zeros((batch_size,), jnp.float32) for k in TERM_NAMES}
        sums = jax.lax.fori_loop(0, num_time_samples, add_sample, zeros)
        out = {TERM_NAMES[k]: v / num_time_samples for k, v in sums.items()}
        out["bpd"] = sum(out.values())
        return out

    replicated = sharding.replicated(mesh)
    return jax.jit(
        eval_step,
        in_shardings=(replicated, sharding.batch_sharding(mesh), replicated),
        out_shardings=replicated,
    )


def _mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error std / sqrt(N) (ddof 1) of per-example values [N]."""
    values = values.astype(np.float64)
    if values.size < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(values.size))


def evaluate(
    config: ml_collections.ConfigDict,
    info: data.DatasetInfo,
    vdm: model.VDM,
    params: Params,
    mesh: Mesh,
    eval_step: Callable[..., dict[str, jax.Array]] | None = None,
) -> dict[str, float]:
    """bpd over the whole eval split, with standard errors; the same on every host.

    Args:
      config: the experiment config (``data``, ``model``, ``eval``, ``seed``).
      info: the dataset's facts.
      vdm: the model.
      params: parameters to evaluate (the EMA parameters), replicated over ``mesh``.
      mesh: the device mesh.
      eval_step: a step from :func:`make_eval_step` to reuse (compiled once per run).

    Returns:
      ``{"bpd", "bpd_stderr", "bpd_prior", "bpd_prior_stderr", "bpd_recon", ...,
      "num_examples", "num_time_samples"}``.
    """
    if eval_step is None:
        loss_cfg = state.loss_config(config, info)
        eval_step = make_eval_step(vdm, loss_cfg, config.eval.num_time_samples, mesh)
    global_batch_size = config.eval.batch_size
    base_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), EVAL_STREAM)
    batches = data.eval_batches(
        info.name,
        global_batch_size=global_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        data_dir=config.data.data_dir,
    )
    outputs = []
    for k, batch in enumerate(batches):
        inputs = sharding.global_batch(
            model_batch(batch, config.model.conditioning, train=False), mesh
        )
        outputs.append(eval_step(params, inputs, jax.random.fold_in(base_key, k)))
    # Rows of the global batches, in order: example k B + i sits at row i of batch k.
    per_example = {
        name: np.concatenate([np.asarray(o[name]) for o in outputs]) for name in outputs[0]
    }
    real = np.arange(len(outputs) * global_batch_size) < info.num_eval
    results: dict[str, float] = {}
    for name in ("bpd", *TERM_NAMES.values()):
        results[name], results[f"{name}_stderr"] = _mean_and_stderr(per_example[name][real])
    results["num_examples"] = int(real.sum())
    results["num_time_samples"] = config.eval.num_time_samples
    return results


def make_sample_fn(
    config: ml_collections.ConfigDict, info: data.DatasetInfo, vdm: model.VDM, mesh: Mesh
) -> Callable[[Params, jax.Array], jax.Array]:
    """The jitted sampler ``(params, key) -> int32 [sample.batch_size, H, W, C]``.

    The batch of latents is sharded over the mesh; the integer samples come back
    replicated. Class-conditional models draw the labels ``0, 1, ..., K-1, 0, ...``;
    augmentation-conditional ones use the identity (0).
    """
    batch_size, s = config.sample.batch_size, config.sample
    classes = state.num_classes(config, info)
    batch_spec = sharding.batch_sharding(mesh)

    def sample_fn(params: Params, key: jax.Array) -> jax.Array:
        label = None
        if config.model.conditioning == "label":
            label = jnp.arange(batch_size, dtype=jnp.int32) % classes
        elif config.model.conditioning == "augmentation":
            label = jnp.zeros((batch_size,), jnp.int32)

        def gamma_fn(t: jax.Array) -> jax.Array:
            return vdm.apply({"params": params}, t, method=model.VDM.gamma)

        def eps_fn(z: jax.Array, gamma_t: jax.Array) -> jax.Array:
            z = jax.lax.with_sharding_constraint(z, batch_spec)
            return vdm.apply(
                {"params": params}, z, gamma_t, label, train=False, method=model.VDM.eps
            )

        return samplers.sample(
            key,
            gamma_fn,
            eps_fn,
            (batch_size, *info.shape),
            vocab_size=info.vocab_size,
            num_steps=s.num_steps,
            sampler=s.sampler,
            decode_method=s.decode,
        )

    replicated = sharding.replicated(mesh)
    return jax.jit(sample_fn, in_shardings=(replicated, replicated), out_shardings=replicated)


def sample(
    config: ml_collections.ConfigDict,
    params: Params,
    sample_fn: Callable[[Params, jax.Array], jax.Array],
) -> np.ndarray:
    """``config.sample.num_samples`` integer samples [N, H, W, C], deterministic for the seed."""
    base_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), SAMPLE_STREAM)
    num_batches = -(-config.sample.num_samples // config.sample.batch_size)
    batches = [sample_fn(params, jax.random.fold_in(base_key, k)) for k in range(num_batches)]
    return np.concatenate([np.asarray(b) for b in batches])[: config.sample.num_samples]


def image_grid(samples: np.ndarray, vocab_size: int, padding: int = 1) -> np.ndarray:
    """Integer images -> one displayable uint8 grid [rows h, cols w, C].

    Values are scaled by 255 / (K - 1) so that the largest value is white; images smaller
    than 32 pixels are upscaled (nearest neighbour) so that they can be seen.

    Args:
      samples: [N, H, W, C] integers in {0..K-1}, C = 1 or 3.
      vocab_size: K.
      padding: pixels of black between images.
    """
    n, height, width, channels = samples.shape
    scale = max(1, math.ceil(_MIN_DISPLAY_SIZE / height))
    pixels = np.round(samples.astype(np.float64) * (255.0 / (vocab_size - 1))).astype(np.uint8)
    pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h, w = height * scale + padding, width * scale + padding
    grid = np.zeros((rows * h + padding, cols * w + padding, channels), np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[padding + r * h : (r + 1) * h, padding + c * w : (c + 1) * w] = pixels[i]
    return grid


def write_samples(samples: np.ndarray, vocab_size: int, workdir: str, step: int) -> str:
    """Writes ``{workdir}/samples/step_{step}.png`` (a grid) and ``.npz`` (``samples``, int).

    Returns:
      The PNG's path.
    """
    directory = os.path.join(workdir, "samples")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"step_{step}")
    grid = image_grid(samples, vocab_size)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path + ".png")
    np.savez(path + ".npz", samples=samples.astype(np.int32))
    return path + ".png"


def write_eval_json(
    results: Mapping[str, Any], workdir: str, step: int, config: ml_collections.ConfigDict
) -> dict[str, Any]:
    """Writes ``{workdir}/eval_step_{step}.json``: the results with step, dataset and seed.

    Returns:
      What was written.
    """
    record = {"step": step, "dataset": config.data.name, "seed": config.seed, **results}
    with open(os.path.join(workdir, f"eval_step_{step}.json"), "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
    return record


def _restore_ema(
    config: ml_collections.ConfigDict,
    workdir: str,
    devices: Sequence[jax.Device] | None,
) -> tuple[data.DatasetInfo, model.VDM, Mesh, Params, int]:
    """Validates the config and returns (info, model, mesh, EMA params, step) of the latest
    checkpoint of ``workdir``."""
    mesh, info = state.setup(config, devices)
    vdm = state.create_model(config, info)
    abstract = state.abstract_train_state(config, info, vdm, state.create_optimizer(config), mesh)
    manager = checkpoint.make_manager(workdir, read_only=True)
    try:
        restored = checkpoint.restore_latest(manager, abstract)
    finally:
        manager.close()
    if restored is None:
        raise FileNotFoundError(
            f"no checkpoint in {checkpoint.checkpoint_dir(workdir)}; run --mode=train first"
        )
    return info, vdm, mesh, restored.ema_params, int(restored.step)


def run_eval(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, Any]:
    """``--mode=eval``: bpd of the latest checkpoint's EMA parameters over the eval split.

    Writes ``{workdir}/eval_step_{step}.json`` (process 0) and prints the results.

    Returns:
      The results of :func:`evaluate` plus ``step``, ``dataset`` and ``seed``.
    """
    info, vdm, mesh, params, step = _restore_ema(config, workdir, devices)
    results = evaluate(config, info, vdm, params, mesh)
    record = {"step": step, "dataset": info.name, "seed": config.seed, **results}
    if jax.process_index() == 0:
        write_eval_json(results, workdir, step, config)
        print(json.dumps(record, indent=2, sort_keys=True))
        logging.info(
            "Step %d: test bpd %.4f +- %.4f over %d examples, written to %s.",
            step,
            results["bpd"],
            results["bpd_stderr"],
            results["num_examples"],
            workdir,
        )
    return record


def run_sample(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> np.ndarray:
    """``--mode=sample``: ``config.sample.num_samples`` samples from the latest checkpoint.

    Writes ``{workdir}/samples/step_{step}.png`` and ``.npz`` (process 0).

    Returns:
      The samples, int32 [N, H, W, C].
    """
    info, vdm, mesh, params, step = _restore_ema(config, workdir, devices)
    samples = sample(config, params, make_sample_fn(config, info, vdm, mesh))
    if jax.process_index() == 0:
        path = write_samples(samples, info.vocab_size, workdir, step)
        print(f"Wrote {len(samples)} samples of step {step} to {path} and .npz")
    return samples
