"""bpd over the whole evaluation split, with standard errors: during training and as
``--mode=eval``.

:class:`Evaluator` compiles an experiment's estimator
(:attr:`vdm_jax.runner.experiment.Experiment.eval_method`) once per run and runs
it over every real example of the eval split (padding rows masked out): per-image
estimates, then the mean over images and its standard
error ``std / sqrt(N)`` for the total bpd and each term. That standard error treats the
per-image estimates as independent; it covers both the spread of the data and the Monte
Carlo noise. Methods with replicates also report ``bpd_mc_stderr``, the Monte Carlo error
alone. Results are deterministic for the seed and ``eval.batch_size``, and independent of the
number of devices and hosts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any

import jax
import numpy as np
import tqdm
from absl import logging

from vdm_jax import diffusion, elbo_estimators, model
from vdm_jax.runner import checkpoint, data, eval_methods, metrics, results, sharding, state
from vdm_jax.runner import workdir as workdir_lib
from vdm_jax.runner.experiment import Experiment
from vdm_jax.runner.preemption import Preemption

Params = Any
# ``fold_in`` constants that separate the eval randomness from training's and sampling's.
EVAL_STREAM = 1
PILOT_STREAM = 3


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """The whole split's figures and the protocol that produced them.

    Attributes:
      method: the ``eval.method``.
      num_examples: real examples evaluated (the whole split).
      values: the split means and their standard errors over images (``bpd``,
        ``bpd_stderr``, and each term with ``_stderr``); ``bpd_mc_stderr`` where the method
        measures its Monte Carlo error; ``num_function_evals`` for adaptive methods. For a
        class-conditional model ``bpd`` bounds ``-log P(x)``: the conditional bound
        ``bpd_conditional`` plus ``bpd_label``, ``-log2 P(label) / D`` under the conditioning's
        label prior (:attr:`vdm_jax.runner.conditioning.Conditioning.label_nats`).
      settings: the method's settings (its :class:`vdm_jax.runner.eval_methods.EvalSettings`).
      seconds: wall time of the evaluation.
      estimator: the method, its settings, the time discretisation and time sampling
        (:func:`vdm_jax.runner.results.protocol`).
      dataset: name, version, split, number of examples, shape and vocabulary size.
      seed: the evaluation's seed.
      batch_size: the global eval batch.
    """

    method: str
    num_examples: int
    values: dict[str, float]
    settings: dict[str, Any]
    seconds: float
    estimator: dict[str, Any]
    dataset: dict[str, Any]
    seed: int
    batch_size: int

    @property
    def bpd(self) -> float:
        return self.values["bpd"]

    def protocol(self, step: int, ema: bool = True) -> dict[str, Any]:
        """What makes this figure comparable (:func:`vdm_jax.runner.results.protocol`)."""
        return results.protocol(
            dataset=self.dataset,
            estimator=self.estimator,
            seed=self.seed,
            batch_size=self.batch_size,
            step=step,
            ema=ema,
        )

    def record(self, step: int, ema: bool = True) -> dict[str, Any]:
        """One JSON-able dict: the figures and settings flat (``bpd``, ``bpd_stderr``, ...),
        with ``step``, ``dataset``, ``seed``, the nested ``protocol`` and its ``protocol_id``.
        """
        spec = self.protocol(step, ema)
        return {
            "step": step,
            "dataset": self.dataset["name"],
            "seed": self.seed,
            "method": self.method,
            "num_examples": self.num_examples,
            **self.values,
            **self.settings,
            "seconds": self.seconds,
            "protocol": spec,
            "protocol_id": results.protocol_id(spec),
        }

    def scalars(self) -> dict[str, float]:
        """The figures as TensorBoard scalars ``eval/...``."""
        scalars = {f"eval/{k}": v for k, v in self.values.items()}
        scalars["eval/num_examples"] = float(self.num_examples)
        scalars["eval/seconds"] = self.seconds
        return scalars


def write(
    result: EvalResult, workdir: str, step: int, ema: bool = True
) -> tuple[dict[str, Any], str, dict[str, Any] | None]:
    """Keeps ``result`` as its protocol's record of ``step`` and logs its scalars to the
    protocol's TensorBoard run (process 0 writes).

    Returns:
      ``(record, path, previous)``: ``previous`` is the record this one replaced (the same
      protocol re-run on the same step), else None.
    """
    record = result.record(step, ema)
    if jax.process_index() != 0:
        return record, "", None
    path, previous = results.write(record, workdir)
    writer = metrics.MetricWriter(workdir, run=os.path.join("eval", record["protocol_id"]))
    writer.write_scalars(step, result.scalars())
    writer.write_text(step, {"eval/protocol": _markdown(record["protocol"])})
    writer.close()
    if previous is not None:
        logging.warning(
            "Replaced the earlier record of this protocol at step %d (%s: bpd %.4f) with the "
            "new one (bpd %.4f).",
            step,
            path,
            previous.get("bpd", float("nan")),
            result.bpd,
        )
    return record, path, previous


def _markdown(spec: dict[str, Any]) -> str:
    """The protocol as a JSON code block (TensorBoard's text dashboard renders markdown)."""
    return "```\n" + json.dumps(spec, indent=2, sort_keys=True) + "\n```"


def _mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error std / sqrt(N) (ddof 1) of per-example values [N]."""
    values = values.astype(np.float64)
    if values.size < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(values.size))


class Evaluator:
    """An experiment's estimator, jitted once: ``evaluator(params) -> EvalResult``.

    The per-batch program ``(params, batch, mask, key, prepared) -> (Estimate, mask)`` takes the
    parameters in the state's layout (gathered inside), the batch sharded over the mesh, and
    returns everything replicated, so every host reads the whole global batch; the method's
    ``prepare`` step is jitted alongside.
    """

    def __init__(self, exp: Experiment):
        self.exp = exp
        self.method = exp.eval_method
        replicated = sharding.replicated(exp.mesh)
        batch_sharding = sharding.batch_sharding(exp.mesh)
        layout = state.param_layout(exp)
        context = dict(loss=exp.loss, settings=exp.eval_settings)  # What every estimator reads.

        def model_fns(params, batch, key):
            """The model's functions for this batch, and its auxiliary latent's KL in bpd [B]
            (None without one): an input-adaptive model is evaluated at c ~ q(c | x)."""
            x = batch["image"]
            c, kl = model.posterior_context(exp.vdm, params, x, exp.loss.vocab_size, key)
            fns = model.inference_fns(exp.vdm, params, batch.get("label"), c)
            return fns, None if c is None else diffusion.bits_per_dim(kl, math.prod(x.shape[1:]))

        def step(params, batch, mask, key, prepared):
            params = layout.gather(params)
            # The latent's key is folded off, so models without one see the same key as before.
            (gamma_fn, eps_fn), latent_bpd = model_fns(params, batch, jax.random.fold_in(key, 1))
            estimate = self.method.estimate(
                gamma_fn, eps_fn, batch["image"], key, prepared, **context
            )
            declared = exp.eval_settings.term_names()
            if set(estimate.terms) != set(declared):  # Checked once, when tracing.
                raise ValueError(
                    f"eval method {exp.eval.method!r} returned terms {tuple(estimate.terms)}, "
                    f"but its registry entry declares {declared}"
                )
            if latent_bpd is not None:
                terms = estimate.terms
                terms = {**terms, "bpd": terms["bpd"] + latent_bpd, "bpd_latent": latent_bpd}
                estimate = estimate._replace(terms=terms)
            return estimate, mask

        self.step = jax.jit(
            step,
            in_shardings=(layout.stored, batch_sharding, batch_sharding, replicated, replicated),
            out_shardings=replicated,
        )
        self.prepare = None
        if self.method.prepare is not None:

            def prepare(params, batch, key):
                params = layout.gather(params)
                (gamma_fn, eps_fn), _ = model_fns(params, batch, jax.random.fold_in(key, 1))
                return self.method.prepare(gamma_fn, eps_fn, batch["image"], key, **context)

            self.prepare = jax.jit(
                prepare, in_shardings=(layout.stored, batch_sharding, replicated)
            )

    def __call__(self, params: Params, preemption: Preemption | None = None) -> EvalResult:
        """Evaluates ``params`` (in the state's layout) over the whole eval split.

        Raises:
          Interrupted: if ``preemption`` is requested; it is checked between batches and
            while the first batch compiles.
        """
        exp = self.exp
        start = time.perf_counter()
        base_key = jax.random.fold_in(jax.random.PRNGKey(exp.seed), EVAL_STREAM)
        batches = data.eval_batches(
            exp.info.name,
            global_batch_size=exp.eval.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            data_dir=exp.data.data_dir,
        )
        progress = tqdm.tqdm(
            batches,
            total=data.num_eval_batches(exp.info, exp.eval.batch_size),
            desc="eval",
            disable=jax.process_index() != 0,
            leave=False,
        )
        prepared, per_batch = None, []
        with batches:
            for k, batch in enumerate(progress):
                if preemption is not None:
                    preemption.check()
                inputs = sharding.global_batch(
                    exp.conditioning.model_batch(batch, train=False), exp.mesh
                )
                mask = sharding.global_batch({"mask": batch["mask"]}, exp.mesh)["mask"]
                # The first calls compile: in a worker thread when preemptible, so that a
                # SIGTERM during the compilation is seen at once.
                compiling = k == 0 and preemption is not None
                if k == 0 and self.prepare is not None:
                    pilot_key = jax.random.fold_in(base_key, PILOT_STREAM)
                    pilot = functools.partial(self.prepare, params, inputs, pilot_key)
                    prepared = preemption.wait_for(pilot) if compiling else pilot()
                key = jax.random.fold_in(base_key, k)
                step = functools.partial(self.step, params, inputs, mask, key, prepared)
                per_batch.append(preemption.wait_for(step) if compiling else step())
        host = jax.device_get(per_batch)
        real = np.concatenate([mask for _, mask in host])
        values = _aggregate([estimate for estimate, _ in host], real)
        label_nats = exp.conditioning.label_nats(exp.info)
        if label_nats:
            nats_per_bpd = math.prod(exp.info.shape) * math.log(2)
            values = _with_label_cost(values, label_nats / nats_per_bpd)
        settings = exp.eval_settings.as_dict()
        estimator = {"method": exp.eval.method, **settings}
        estimator["time"] = (
            "continuous" if exp.loss.timesteps == 0 else f"{exp.loss.timesteps} steps"
        )
        if self.method.time_sampling is not None:
            estimator["time_sampling"] = self.method.time_sampling
        info = exp.info
        return EvalResult(
            method=exp.eval.method,
            num_examples=int(real.sum()),
            values=values,
            settings=settings,
            seconds=time.perf_counter() - start,
            estimator=estimator,
            dataset={
                "name": info.name,
                "version": info.version,
                "split": info.eval_split,
                "num_examples": int(real.sum()),
                "shape": list(info.shape),
                "vocab_size": info.vocab_size,
            },
            seed=exp.seed,
            batch_size=exp.eval.batch_size,
        )


def _aggregate(estimates: list[eval_methods.Estimate], real: np.ndarray) -> dict[str, float]:
    """Split means with standard errors from the batches' per-image estimates."""

    def rows(per_batch: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([np.asarray(v) for v in per_batch])[real]

    values: dict[str, float] = {}
    for name in estimates[0].terms:
        per_image = rows([e.terms[name] for e in estimates])
        values[name], values[f"{name}_stderr"] = _mean_and_stderr(per_image)
    if estimates[0].mc_stderr is not None:  # Monte Carlo error of the mean, given the split.
        _, mc = elbo_estimators.split_mean_stderr(
            rows([e.terms["bpd"] for e in estimates]), rows([e.mc_stderr for e in estimates])
        )
        values["bpd_mc_stderr"] = float(mc)
    if estimates[0].num_function_evals is not None:
        values["num_function_evals"] = float(rows([e.num_function_evals for e in estimates]).mean())
    return values


def _with_label_cost(values: dict[str, float], label_bpd: float) -> dict[str, float]:
    """The bound on ``-log P(x)`` from one on ``-log P(x | label)``: adds ``label_bpd`` (the
    same for every image, so no standard error of its own) to ``bpd`` as the term
    ``bpd_label``; the conditional figure stays as ``bpd_conditional``."""
    return {
        **values,
        "bpd": values["bpd"] + label_bpd,
        "bpd_conditional": values["bpd"],
        "bpd_label": label_bpd,
    }


def _monte_carlo_note(result: EvalResult) -> str:
    """`` (Monte Carlo 0.0123)`` when the method reports its Monte Carlo error, else ``""``."""
    mc = result.values.get("bpd_mc_stderr")
    return "" if mc is None else f" (Monte Carlo {mc:.4f})"


def run_eval(
    exp: Experiment, workdir: str, *, rewrite_config_record: bool = False
) -> dict[str, Any]:
    """``--mode=eval``: bpd of the latest checkpoint's EMA parameters over the eval split.

    The workdir is checked first (a directory, writable, and its recorded config matching
    the experiment's), so a long evaluation never ends in an unwritable result;
    ``rewrite_config_record`` writes a damaged record anew (``--config_record=rewrite``).

    Keeps the result as its protocol's record of the step (:func:`write`: another estimator's
    record is never touched; the same protocol re-run replaces its own, and says so), and
    prints it.

    Returns:
      The written record (:meth:`EvalResult.record`).
    """
    workdir_lib.prepare(workdir, create=False)
    workdir_lib.check_config_record(exp, workdir, rewrite_damaged=rewrite_config_record)
    params, step = checkpoint.restore_eval_params(exp, workdir)
    result = Evaluator(exp)(params)
    record, path, previous = write(result, workdir, step)
    if jax.process_index() == 0:
        print(json.dumps(record, indent=2, sort_keys=True))
        logging.info(
            "Step %d: %s bpd %.4f +- %.4f%s over %d examples, written to %s.",
            step,
            result.dataset["split"],
            result.bpd,
            result.values["bpd_stderr"],
            _monte_carlo_note(result),
            result.num_examples,
            path,
        )
        if previous is not None:
            print(f"Replaced the earlier record of {record['protocol_id']} at step {step}.")
    return record
