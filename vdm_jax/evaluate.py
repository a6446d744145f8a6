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

import functools
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging
from jax.sharding import Mesh
from PIL import Image

from vdm_jax import (
    checkpoint,
    data,
    diffusion,
    likelihood,
    model,
    reference,
    samplers,
    sharding,
    state,
)

Params = Any
# `fold_in` constants that separate the eval and sampling randomness from training's.
EVAL_STREAM = 1
SAMPLE_STREAM = 2
PILOT_STREAM = 3
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


# Time bins of the importance-sampling proposal q(t) (``eval.time_sampling="importance"``).
PROPOSAL_BINS = 32
EvalStepFn = Callable[[Params, dict[str, jax.Array], jax.Array, jax.Array], dict[str, jax.Array]]


def make_eval_step(
    config: ml_collections.ConfigDict, info: data.DatasetInfo, vdm: model.VDM, mesh: Mesh
) -> EvalStepFn:
    """The jitted per-example eval ``(params, batch, key, proposal) -> {name: [B]}``, bits/dim.

    What it computes follows ``config.eval``:

    * ``method="elbo"``, ``time_sampling="antithetic"``: each term averaged over
      ``num_time_samples`` draws of the training estimator (keys ``fold_in(key, i)``).
    * ``"stratified"`` / ``"importance"``: :func:`vdm_jax.likelihood.elbo_eval` with
      ``num_time_samples`` per image in two independent replicates; also ``bpd_mc_stderr``,
      the Monte Carlo standard error of each image's estimate. ``proposal`` [PROPOSAL_BINS]
      is the q(t) of importance sampling (uniform otherwise; see :func:`fit_time_proposal`).
    * ``method="ode"``: :func:`vdm_jax.likelihood.ode_bpd`, the bound from the
      probability-flow ODE with ``ode_dequantization`` ("uniform", or "decoder": the ELBO's
      own encoder and decoder, which also gives ``bpd_recon``), and ``num_function_evals``
      of the batch's solve; with ``ode_dequant_samples > 1`` also ``bpd_mc_stderr``.

    Outputs are replicated so that every host can read the whole batch.
    """
    e = config.eval
    loss_cfg = state.loss_config(config, info)
    to_bpd = 1.0 / (math.prod(info.shape) * math.log(2.0))

    def antithetic(params, batch, key, proposal):
        del proposal

        def add_sample(i: jax.Array, sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
            terms = model.vdm_terms(vdm, params, batch, jax.random.fold_in(key, i), loss_cfg)
            return {k: sums[k] + terms[k] for k in sums}

        zeros = {k: jnp.zeros(batch["image"].shape[:1], jnp.float32) for k in TERM_NAMES}
        sums = jax.lax.fori_loop(0, e.num_time_samples, add_sample, zeros)
        out = {TERM_NAMES[k]: v / e.num_time_samples for k, v in sums.items()}
        out["bpd"] = sum(out.values())
        return out

    def per_image(params, batch, key, proposal):
        gamma_fn, eps_fn = model.inference_fns(vdm, params, batch.get("label"))
        est = likelihood.elbo_eval(
            key,
            batch["image"],
            gamma_fn,
            eps_fn,
            vocab_size=info.vocab_size,
            num_time_samples=e.num_time_samples,
            method="stratified",
            proposal=likelihood.TimeProposal(proposal) if e.time_sampling == "importance" else None,
        )
        return {
            "bpd": est.total * to_bpd,
            "bpd_prior": est.prior * to_bpd,
            "bpd_recon": est.recon * to_bpd,
            "bpd_diff": est.diffusion * to_bpd,
            "bpd_mc_stderr": est.total_stderr * to_bpd,
        }

    def ode(params, batch, key, proposal):
        del proposal
        gamma_fn, eps_fn = model.inference_fns(vdm, params, batch.get("label"))
        result = likelihood.ode_bpd(
            key,
            batch["image"],
            gamma_fn,
            eps_fn,
            vocab_size=info.vocab_size,
            num_dequant_samples=e.ode_dequant_samples,
            dequantization=e.ode_dequantization,
            divergence=e.ode_divergence,
            rtol=e.ode_rtol,
            atol=e.ode_atol,
        )
        nfe = jnp.broadcast_to(result.num_function_evals, result.bpd.shape)
        out = {"bpd": result.bpd, "num_function_evals": nfe.astype(jnp.float32)}
        if e.ode_dequantization == "decoder":
            out["bpd_recon"] = result.bpd_recon
        if e.ode_dequant_samples > 1:  # Monte Carlo error over the dequantization draws.
            out["bpd_mc_stderr"] = result.bpd_stderr
        return out

    if e.method == "ode":
        step = ode
    else:
        step = antithetic if e.time_sampling == "antithetic" else per_image
    replicated = sharding.replicated(mesh)
    return jax.jit(
        step,
        in_shardings=(replicated, sharding.batch_sharding(mesh), replicated, replicated),
        out_shardings=replicated,
    )


def fit_time_proposal(
    config: ml_collections.ConfigDict,
    info: data.DatasetInfo,
    vdm: model.VDM,
    params: Params,
    batch: dict[str, jax.Array],
    key: jax.Array,
) -> jax.Array:
    """q(t) for importance sampling, fitted on one pilot batch, [PROPOSAL_BINS].

    The pilot draws ``num_time_samples`` stratified times per image and sets q(t) in each
    bin proportional to the root mean square of the diffusion integrand there (the
    variance-minimising choice), mixed with 10% of the uniform density
    (:func:`vdm_jax.likelihood.fit_proposal`). Any q keeps the estimate unbiased; the pilot
    only decides how much the variance drops. Its cost is one pass over one batch.
    """

    return _pilot_proposal(
        params,
        batch,
        key,
        vdm=vdm,
        vocab_size=info.vocab_size,
        num_samples=config.eval.num_time_samples,
    )


# Module level, with the model and sizes static: compiled once per run, not at every
# evaluation during training.
@functools.partial(jax.jit, static_argnames=("vdm", "vocab_size", "num_samples"))
def _pilot_proposal(
    params: Params,
    batch: dict[str, jax.Array],
    key: jax.Array,
    *,
    vdm: model.VDM,
    vocab_size: int,
    num_samples: int,
) -> jax.Array:
    gamma_fn, eps_fn = model.inference_fns(vdm, params, batch.get("label"))
    samples = likelihood.diffusion_loss_samples(
        key,
        diffusion.encode(batch["image"], vocab_size),
        gamma_fn,
        eps_fn,
        num_samples=num_samples,
    )
    return likelihood.fit_proposal(samples.t, samples.integrand, num_bins=PROPOSAL_BINS).bin_probs


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
) -> dict[str, Any]:
    """bpd over the whole eval split, with standard errors; the same on every host.

    Args:
      config: the experiment config (``data``, ``model``, ``eval``, ``seed``).
      info: the dataset's facts.
      vdm: the model.
      params: parameters to evaluate (the EMA parameters), replicated over ``mesh``.
      mesh: the device mesh.
      eval_step: a step from :func:`make_eval_step` to reuse (compiled once per run).

    Returns:
      ``bpd`` and ``bpd_stderr`` (the standard error over images: the spread of the per-image
      estimates, which holds the test set's own variability and the Monte Carlo noise),
      the same for each ELBO term (``bpd_prior``, ``bpd_recon``, ``bpd_diff``) when the
      method is ``elbo``; ``bpd_mc_stderr`` (Monte Carlo error alone, given the split) for
      per-image time sampling; ``num_function_evals`` and the tolerances for ``ode``; and
      ``method``, ``num_examples``, ``seconds``.
    """
    if eval_step is None:
        eval_step = make_eval_step(config, info, vdm, mesh)
    start = time.perf_counter()
    global_batch_size = config.eval.batch_size
    base_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), EVAL_STREAM)
    batches = data.eval_batches(
        info.name,
        global_batch_size=global_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        data_dir=config.data.data_dir,
    )
    proposal = likelihood.uniform_proposal(PROPOSAL_BINS).bin_probs
    progress = tqdm.tqdm(
        batches,
        total=data.num_eval_batches(info, global_batch_size),
        desc="eval",
        disable=jax.process_index() != 0,
        leave=False,
    )
    outputs = []
    for k, batch in enumerate(progress):
        inputs = sharding.global_batch(
            model_batch(batch, config.model.conditioning, train=False), mesh
        )
        if k == 0 and config.eval.method == "elbo" and config.eval.time_sampling == "importance":
            pilot_key = jax.random.fold_in(base_key, PILOT_STREAM)
            proposal = fit_time_proposal(config, info, vdm, params, inputs, pilot_key)
        outputs.append(eval_step(params, inputs, jax.random.fold_in(base_key, k), proposal))
    # Rows of the global batches, in order: example k B + i sits at row i of batch k.
    per_example = {
        name: np.concatenate([np.asarray(o[name]) for o in outputs]) for name in outputs[0]
    }
    real = np.arange(len(outputs) * global_batch_size) < info.num_eval
    results: dict[str, Any] = {"method": config.eval.method}
    for name in ("bpd", *TERM_NAMES.values()):
        if name in per_example:
            results[name], results[f"{name}_stderr"] = _mean_and_stderr(per_example[name][real])
    if "bpd_mc_stderr" in per_example:  # Monte Carlo error of the split's mean, given the split.
        _, mc_stderr = likelihood.split_mean_stderr(
            per_example["bpd"][real], per_example["bpd_mc_stderr"][real]
        )
        results["bpd_mc_stderr"] = float(mc_stderr)
    results["num_examples"] = int(real.sum())
    if config.eval.method == "ode":
        results["num_function_evals"] = float(per_example["num_function_evals"].mean())
        results["ode_rtol"], results["ode_atol"] = config.eval.ode_rtol, config.eval.ode_atol
        results["ode_divergence"] = config.eval.ode_divergence
        results["ode_dequant_samples"] = config.eval.ode_dequant_samples
        results["ode_dequantization"] = config.eval.ode_dequantization
    else:
        results["num_time_samples"] = config.eval.num_time_samples
        results["time_sampling"] = config.eval.time_sampling
    results["seconds"] = time.perf_counter() - start
    return results


def eval_scalars(results: Mapping[str, Any]) -> dict[str, float]:
    """The numeric eval results as TensorBoard scalars ``eval/...``."""
    return {
        f"eval/{k}": float(v)
        for k, v in results.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


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

        gamma_fn, model_eps_fn = model.inference_fns(vdm, params, label)

        def eps_fn(z: jax.Array, gamma_t: jax.Array) -> jax.Array:
            return model_eps_fn(jax.lax.with_sharding_constraint(z, batch_spec), gamma_t)

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
    """(info, model, mesh, EMA params, step) of the latest checkpoint of ``workdir``.

    With ``config.eval.reference_checkpoint`` set, the EMA parameters (and step) of that
    released google-research/vdm checkpoint instead, and ``config.model`` is updated in
    place to the architecture the checkpoint holds (:func:`vdm_jax.reference.model_overrides`).
    """
    path = config.eval.reference_checkpoint
    if path:
        restored = reference.restore_reference(path)
        with config.unlocked():
            config.model.update(reference.model_overrides(restored.arch))
        logging.info("Evaluating reference checkpoint %s (step %d).", path, restored.step)
    mesh, info = state.setup(config, devices)
    vdm = state.create_model(config, info)
    if path:
        params = jax.device_put(restored.ema_params, sharding.replicated(mesh))
        return info, vdm, mesh, params, restored.step
    abstract = state.abstract_train_state(config, info, vdm, state.create_optimizer(config), mesh)
    restored = checkpoint.restore_latest_in(workdir, abstract)
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
