"""Training: the jitted step and the loop that logs, evaluates, samples and checkpoints.

``train_step(state, batch) -> (state, metrics)`` is pure; :func:`make_train_step` jits it
over the mesh with the batch sharded, the state in its layout (replicated, or split over the
``"fsdp"`` axis: :mod:`vdm_jax.runner.sharding`) and donated.
:func:`train_and_evaluate` runs it from the latest checkpoint of the workdir (or from
scratch) to ``training.num_steps``. Nothing is scanned in chunks: every step returns
to the host, so logging, evaluation and checkpoints can happen at any step.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from absl import logging
from jax.sharding import Mesh

from vdm_jax import elbo_estimators, model
from vdm_jax.runner import (
    checkpoint,
    data,
    ensemble,
    eval_methods,
    evaluate,
    metrics,
    outputs,
    preemption,
    sampling,
    sharding,
    state,
    workdir_lock,
)
from vdm_jax.runner import workdir as workdir_lib
from vdm_jax.runner.experiment import Experiment
from vdm_jax.runner.state import TrainState

Metrics = dict[str, jax.Array]
# What the training loop logs under ``train/`` (window means of the step metrics, then
# throughput), and ``bpd_diff_weighted`` (the trained diffusion term) for a weighting other
# than ``model.weighting="elbo"``.
LOGGED_METRICS = (
    "bpd",
    "bpd_prior",
    "bpd_recon",
    "bpd_diff",
    "grad_norm",
    "gamma_0",
    "gamma_1",
    "learning_rate",
    "steps_per_sec",
    "images_per_sec",
)
TrainStepFn = Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, Metrics]]


def train_step(
    train_state: TrainState,
    batch: dict[str, jax.Array],
    *,
    vdm: model.VDM,
    optimizer: optax.GradientTransformation,
    learning_rate: optax.Schedule,
    loss_cfg: model.LossConfig,
    ema_rate: float,
    layout: sharding.ParamLayout,
    mesh: Mesh | None = None,
) -> tuple[TrainState, Metrics]:
    """One AdamW update and EMA update; a non-finite loss or gradient leaves the state as is.

    Args:
      train_state: the state before the step.
      batch: ``{"image": int32 [B, H, W, C], "label": int32 [B] (if conditioned)}``.
      vdm: the model.
      optimizer: the optax transformation of :func:`vdm_jax.runner.state.create_optimizer`.
      learning_rate: its learning-rate schedule (for logging).
      loss_cfg: the objective's configuration.
      ema_rate: the EMA decay.
      layout: the parameters' layout: the step computes with them gathered and keeps their
        gradients (and so the update) in the stored layout.
      mesh: the mesh the step is jitted over: an ensemble's members may be split over it
        (:func:`vdm_jax.runner.ensemble.loss_and_grads`).

    Returns:
      ``(new_state, metrics)``; metrics are scalars: ``bpd`` and each term (``bpd_prior``,
      ``bpd_recon``, ``bpd_diff``), ``grad_norm`` (before clipping), ``gamma_0``,
      ``gamma_1``, ``learning_rate`` (all of the state before the step), ``finite``
      (bool: the update was applied) and, under a weighting, ``bpd_diff_weighted``.
    """
    # The step's randomness depends only on (seed, step): not on devices or restarts.
    key = jax.random.fold_in(train_state.rng, train_state.step)
    params = layout.gather(train_state.params)
    moments = train_state.time_moments
    proposal = None if moments is None else elbo_estimators.proposal_from_moments(moments)
    (loss, terms), grads = ensemble.loss_and_grads(
        vdm, params, batch, key, loss_cfg, proposal=proposal, mesh=mesh
    )
    grads = layout.shard(grads)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply_update(old: TrainState) -> TrainState:
        updates, opt_state = optimizer.update(grads, old.opt_state, old.params)
        params = optax.apply_updates(old.params, updates)
        ema_params = jax.tree.map(
            lambda e, p: ema_rate * e + (1.0 - ema_rate) * p, old.ema_params, params
        )
        new = old.replace(
            step=old.step + 1, params=params, ema_params=ema_params, opt_state=opt_state
        )
        if moments is None:
            return new
        # The integrand at each time, undivided by q: what the variance-minimising q tracks.
        trained = terms.get("diffusion_weighted", terms["diffusion"])
        integrand = trained * terms["time_density"]
        return new.replace(
            time_moments=elbo_estimators.update_moments(
                moments, terms["time"], integrand, state.TIME_MOMENTS_DECAY
            )
        )

    # A branch, not a select over every leaf: the select read both versions of each donated
    # buffer and cost ~6% of a CIFAR-10 step on CPU; the branch updates them in place.
    new_state = jax.lax.cond(finite, apply_update, lambda old: old, train_state)

    # Logged: gamma(0) and gamma(1), averaged over dimensions for a per-dimension schedule,
    # at the prior's mean c = 0 for an input-adaptive one.
    context = None if vdm.encoder is None else jnp.zeros((1, vdm.encoder.latent_dim))
    gamma_fn, _ = model.inference_fns(vdm, params, context=context)

    def gamma(t: jax.Array) -> jax.Array:
        return jnp.mean(gamma_fn(t))

    step_metrics = {
        "bpd": loss,
        **{name: jnp.mean(terms[k]) for k, name in eval_methods.TERM_NAMES.items()},
        **({"bpd_latent": jnp.mean(terms["latent"])} if "latent" in terms else {}),
        **(
            {"bpd_diff_weighted": jnp.mean(terms["diffusion_weighted"])}
            if "diffusion_weighted" in terms
            else {}
        ),
        "grad_norm": grad_norm,
        "gamma_0": gamma(jnp.zeros(())),
        "gamma_1": gamma(jnp.ones(())),
        "learning_rate": learning_rate(train_state.step),
        "finite": finite,
    }
    return new_state, step_metrics


def make_train_step(exp: Experiment) -> TrainStepFn:
    """:func:`train_step` jitted over the mesh: batch sharded, state in its layout
    (:func:`vdm_jax.runner.state.state_shardings`) and donated."""
    state_shardings = state.state_shardings(exp)
    step = functools.partial(
        train_step,
        vdm=exp.vdm,
        optimizer=state.create_optimizer(exp.optimizer),
        learning_rate=state.learning_rate_schedule(exp.optimizer),
        loss_cfg=exp.loss,
        ema_rate=exp.optimizer.ema_rate,
        layout=sharding.ParamLayout.of(state_shardings.params),
        mesh=exp.mesh,
    )
    return jax.jit(
        step,
        in_shardings=(state_shardings, sharding.batch_sharding(exp.mesh)),
        out_shardings=(state_shardings, sharding.replicated(exp.mesh)),
        donate_argnums=0,
    )


def _check_finite(step: int, step_metrics: Metrics, manager: ocp.CheckpointManager) -> None:
    """Raises FloatingPointError if training step ``step`` (1-based) was not finite."""
    if bool(step_metrics["finite"]):
        return
    raise FloatingPointError(
        f"non-finite loss or gradient norm in training step {step} "
        f"(bpd={float(step_metrics['bpd'])}, grad_norm={float(step_metrics['grad_norm'])}); "
        f"stopping without saving. The last good checkpoint is step {manager.latest_step()} "
        f"in {manager.directory}."
    )


def _window_scalars(window: list[Metrics], seconds: float, batch_size: int) -> dict[str, float]:
    """Means of the step metrics since the last log, plus throughput, as ``train/...``."""
    host = jax.device_get(window)
    scalars = {f"train/{k}": float(np.mean([m[k] for m in host])) for k in host[0] if k != "finite"}
    scalars["train/steps_per_sec"] = len(window) / seconds
    scalars["train/images_per_sec"] = len(window) * batch_size / seconds
    return scalars


def train_inputs(exp: Experiment, batch: data.Batch) -> dict[str, jax.Array]:
    """This host's rows of a training batch -> the model's global batch over the mesh."""
    return sharding.global_batch(exp.conditioning.model_batch(batch, train=True), exp.mesh)


def make_save_check(exp: Experiment) -> Callable[[TrainState, dict[str, jax.Array]], jax.Array]:
    """Jitted ``(state, batch) -> [] bool``: is the state fit to be saved as a good one?

    True when its parameters and EMA parameters are finite and the negative ELBO computed
    from its parameters on ``batch`` (no dropout) is finite. The training step checks the
    loss of the state *before* its update; this checks the state the update produced.
    """

    state_shardings = state.state_shardings(exp)
    layout = sharding.ParamLayout.of(state_shardings.params)

    def finite(train_state: TrainState, batch: dict[str, jax.Array]) -> jax.Array:
        key = jax.random.fold_in(train_state.rng, train_state.step)
        params = layout.gather(train_state.params)
        terms = model.vdm_terms(exp.vdm, params, batch, key, exp.loss)
        leaves = jax.tree.leaves((train_state.params, train_state.ema_params))
        finite_params = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
        return jnp.isfinite(jnp.mean(sum(terms.values()))) & finite_params

    return jax.jit(
        finite,
        in_shardings=(state_shardings, sharding.batch_sharding(exp.mesh)),
        out_shardings=sharding.replicated(exp.mesh),
    )


def train_and_evaluate(
    exp: Experiment, workdir: str, *, rewrite_config_record: bool = False
) -> TrainState:
    """Trains from the newest good checkpoint in ``workdir`` (or from scratch) to the last step.

    Logs every ``training.log_every`` steps and at the end, evaluates (EMA parameters, whole
    split) every ``eval_every`` steps, writes sample grids every ``sample_every`` steps, and
    saves every ``checkpoint_every`` steps and at the end.

    Guarantees: a state is saved only once a finite loss has been computed from it, so every
    checkpoint is a good one and only good ones rotate older ones out; a non-finite loss,
    gradient or updated state raises ``FloatingPointError`` without saving. The workdir keeps
    the config that wrote it (:mod:`vdm_jax.runner.workdir`) and a changed config is refused before
    any work; a second training of the same workdir is refused while this one runs
    (:mod:`vdm_jax.runner.workdir_lock`). An unreadable or corrupt newest checkpoint is set
    aside and the next older one used (:mod:`vdm_jax.runner.checkpoint`). On SIGTERM it saves
    at the next step boundary (or, during an evaluation or sampling, at once) and returns; a
    signal before any new step has finished (during the first compilation, say) raises
    :class:`vdm_jax.runner.preemption.Interrupted` at once, having written nothing (but the
    emptied lock file).

    Args:
      exp: the experiment (:func:`vdm_jax.runner.experiment.build`).
      workdir: holds checkpoints, TensorBoard events, eval JSON files and samples.
      rewrite_config_record: a damaged ``config.json`` is written anew from ``exp``
        (``--config_record=rewrite``: :func:`vdm_jax.runner.workdir.check_config_record`).

    Returns:
      The final (or preempted) state.
    """
    with preemption.handle_sigterm() as preempt:
        workdir_lib.prepare(workdir, create=True)
        with workdir_lock.hold(workdir):
            return _train(exp, workdir, preempt, rewrite_config_record)


def _train(
    exp: Experiment, workdir: str, preempt: preemption.Preemption, rewrite_config_record: bool
) -> TrainState:
    """:func:`train_and_evaluate`'s loop, with SIGTERM already handled by ``preempt`` and the
    workdir prepared and locked."""
    t = exp.training
    workdir_lib.check_config_record(exp, workdir, rewrite_damaged=rewrite_config_record)
    abstract = state.abstract_train_state(exp)
    workdir_lib.check_free_space(workdir, state.num_bytes(abstract))
    logging.info(
        "Train state: %.2f MiB per device of %.2f MiB on mesh %s.",
        sharding.bytes_per_device(abstract) / 2**20,
        state.num_bytes(abstract) / 2**20,
        dict(exp.mesh.shape),
    )
    # Created first: every process creates it in step, before anyone looks at the folder.
    manager = checkpoint.make_manager(workdir, max_to_keep=t.max_to_keep)
    train_state = checkpoint.restore_latest(workdir, abstract, set_aside=True)
    manager.reload()  # Unreadable checkpoints may have been set aside.
    if train_state is None:
        train_state = state.create_train_state(exp)
    step = int(train_state.step)
    logging.info("Starting at step %d of %d.", step, t.num_steps)

    p_train_step = make_train_step(exp)
    save_check = make_save_check(exp)
    evaluator = evaluate.Evaluator(exp)
    sample_fn = sampling.make_sample_fn(exp)
    writer = metrics.MetricWriter(workdir)
    batches = data.train_iterator(
        exp.info.name,
        global_batch_size=t.batch_size,
        seed=exp.seed,
        start_step=step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        augment=exp.data.augment,
        data_dir=exp.data.data_dir,
    )
    bar = tqdm.tqdm(
        total=t.num_steps, initial=step, disable=jax.process_index() != 0, dynamic_ncols=True
    )
    window: list[Metrics] = []
    window_start = time.perf_counter()
    paused = 0.0  # Seconds of the window spent evaluating, sampling or saving.
    previous: Metrics | None = None
    step_fn: Any = None

    def save(step_metrics: Metrics, batch: dict[str, jax.Array]) -> None:
        """Saves the state of ``step`` if it is good; raises FloatingPointError if not."""
        _check_finite(step, step_metrics, manager)
        if not bool(save_check(train_state, batch)):
            raise FloatingPointError(
                f"training step {step} produced a state with non-finite parameters or loss "
                f"(the update diverged: optimizer.learning_rate={exp.optimizer.learning_rate}); "
                f"stopping without saving it. The last good checkpoint is step "
                f"{manager.latest_step()} in {manager.directory}."
            )
        checkpoint.save(manager, train_state, step)
        workdir_lib.write_config_record(exp, workdir)

    try:
        while step < t.num_steps:
            batch = train_inputs(exp, next(batches))
            if step_fn is None:  # Compiled where a signal is seen at once.
                lowered = p_train_step.lower(train_state, batch)
                step_fn = preempt.wait_for(lowered.compile)
            train_state, step_metrics = step_fn(train_state, batch)
            step += 1
            # Check the previous step, not this one: the device stays one step ahead.
            if previous is not None:
                _check_finite(step - 1, previous, manager)
            previous = step_metrics
            window.append(step_metrics)
            bar.update(1)

            preempted = preempt.at_step(step)
            last = step == t.num_steps
            if step % t.log_every == 0 or last or preempted:
                _check_finite(step, step_metrics, manager)
                seconds = time.perf_counter() - window_start - paused
                scalars = _window_scalars(window, seconds, t.batch_size)
                writer.write_scalars(step, scalars)
                bar.set_postfix(bpd=f"{scalars['train/bpd']:.4f}")
                window, window_start, paused = [], time.perf_counter(), 0.0
            pause_start = time.perf_counter()
            if step % t.checkpoint_every == 0 or last or preempted:
                save(step_metrics, batch)
            if preempted:
                logging.warning("Preempted at step %d; checkpoint saved.", step)
                break
            try:
                if step % t.eval_every == 0:
                    # Kept as its protocol's record, with its own TensorBoard run.
                    evaluate.write(evaluator(train_state.ema_params, preempt), workdir, step)
                if step % t.sample_every == 0:
                    _sample(exp, sample_fn, train_state, writer, workdir, step, preempt)
            except preemption.Interrupted:
                save(step_metrics, batch)
                logging.warning(
                    "Preempted at step %d during evaluation or sampling; checkpoint saved.",
                    step,
                )
                break
            paused += time.perf_counter() - pause_start
        _finish_saving(manager)
    except OSError as e:
        raise _named_disk_full(e, workdir) from e
    finally:
        bar.close()
        with contextlib.suppress(Exception):  # Already raised above, or nothing to finish.
            manager.wait_until_finished()
        manager.close()
        writer.close()
        batches.close()
    return train_state


def _finish_saving(manager: ocp.CheckpointManager) -> None:
    """Waits for the asynchronous saves; a failed write raises OSError naming its cause."""
    try:
        manager.wait_until_finished()
    except ValueError as e:  # Orbax reports TensorStore write failures as ValueError.
        raise OSError(f"a checkpoint write to {manager.directory} failed: {e}") from e


def _named_disk_full(error: OSError, workdir: str) -> OSError:
    """``error``, restated in one line when it means the disk is full."""
    if error.errno == errno.ENOSPC or "RESOURCE_EXHAUSTED" in str(error):
        return OSError(
            errno.ENOSPC,
            f"No space left on device: the run could not write to {workdir}. "
            "Free space (or use another workdir) and resume",
        )
    return error


def _sample(
    exp: Experiment,
    sample_fn: Callable[[Any, jax.Array], jax.Array],
    train_state: TrainState,
    writer: metrics.MetricWriter,
    workdir: str,
    step: int,
    preempt: preemption.Preemption,
) -> None:
    """Samples from the EMA parameters during training, as a TensorBoard grid and files, with
    their quality figures (:func:`vdm_jax.runner.sampling.quality`)."""
    samples = sampling.draw(exp, train_state.ema_params, sample_fn, preempt)
    vocab_size = exp.info.vocab_size
    writer.write_images(step, {"samples": outputs.image_grid(samples, vocab_size)})
    scalars = sampling.quality(exp, samples, workdir)
    if scalars:
        writer.write_scalars(step, scalars)
    if jax.process_index() == 0:
        outputs.write_samples(samples, vocab_size, workdir, step)
