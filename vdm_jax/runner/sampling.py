"""Drawing samples from an experiment's model: during training and as ``--mode=sample``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from vdm_jax import latents, model, samplers
from vdm_jax.runner import checkpoint, metrics, outputs, sample_quality, sharding, state
from vdm_jax.runner import workdir as workdir_lib
from vdm_jax.runner.experiment import Experiment
from vdm_jax.runner.preemption import Preemption

Params = Any
# ``fold_in`` constant that separates the sampling randomness from training's and eval's.
SAMPLE_STREAM = 2


def make_sample_fn(exp: Experiment) -> Callable[[Params, jax.Array], jax.Array]:
    """The jitted sampler ``(params, key) -> int32 [sample.batch_size, H, W, C]``.

    ``sample.sampler`` (:data:`vdm_jax.samplers.SAMPLER_NAMES`) for ``sample.num_steps`` steps,
    then ``sample.decode``. The parameters come in the state's layout (gathered inside); the
    batch of latents is sharded over the mesh; the integer samples come back replicated.
    Labels are the conditioning's ``sample_labels``; an input-adaptive model's auxiliary
    latent is drawn from its prior.
    """
    spec, batch_size = exp.sample, exp.sample.batch_size
    batch_spec = sharding.batch_sharding(exp.mesh)
    layout = state.param_layout(exp)

    def sample_fn(params: Params, key: jax.Array) -> jax.Array:
        params = layout.gather(params)
        label = None
        if exp.conditioning.conditional:
            label = exp.conditioning.sample_labels(batch_size, exp.num_classes)
        context = None
        if exp.vdm.encoder is not None:  # an input-adaptive schedule: c ~ p(c) first
            latent_dim = exp.vdm.encoder.latent_dim
            context = latents.sample_prior(jax.random.fold_in(key, 1), batch_size, latent_dim)
        gamma_fn, model_eps_fn = model.inference_fns(exp.vdm, params, label, context)

        def eps_fn(z: jax.Array, gamma_t: jax.Array) -> jax.Array:
            return model_eps_fn(jax.lax.with_sharding_constraint(z, batch_spec), gamma_t)

        return samplers.sample(
            key,
            gamma_fn,
            eps_fn,
            (batch_size, *exp.info.shape),
            vocab_size=exp.info.vocab_size,
            num_steps=spec.num_steps,
            sampler=spec.sampler,
            decode_method=spec.decode,
            tolerance=spec.ode_tolerance,
        )

    replicated = sharding.replicated(exp.mesh)
    return jax.jit(sample_fn, in_shardings=(layout.stored, replicated), out_shardings=replicated)


def draw(
    exp: Experiment,
    params: Params,
    sample_fn: Callable[[Params, jax.Array], jax.Array],
    preemption: Preemption | None = None,
) -> np.ndarray:
    """``sample.num_samples`` integer samples [N, H, W, C], deterministic for the seed.

    Raises:
      Interrupted: if ``preemption`` is requested; it is checked between sampler calls, and
        during the first call (which compiles the sampler) it runs in a worker thread
        (:meth:`Preemption.wait_for`) so that a signal is seen at once.
    """
    base_key = jax.random.fold_in(jax.random.PRNGKey(exp.seed), SAMPLE_STREAM)
    num_batches = -(-exp.sample.num_samples // exp.sample.batch_size)
    batches = []
    for k in range(num_batches):
        if preemption is not None:
            preemption.check()
        call = functools.partial(sample_fn, params, jax.random.fold_in(base_key, k))
        samples = preemption.wait_for(call) if k == 0 and preemption is not None else call()
        batches.append(np.asarray(samples))
    return np.concatenate(batches)[: exp.sample.num_samples]


def quality(exp: Experiment, samples: np.ndarray, workdir: str) -> dict[str, float]:
    """``samples/...`` scalars: the Fréchet distance of ``samples`` [N, H, W, C] to the held-out
    split, and that of as many real images (:mod:`vdm_jax.runner.sample_quality`); empty when the
    dataset has no feature network or N < 2."""
    name = exp.info.name
    if name not in sample_quality.FEATURE_NETS or len(samples) < 2:
        return {}
    net = sample_quality.load_or_fit(name, workdir, write=jax.process_index() == 0)
    figures = sample_quality.frechet_to_heldout(samples, net, name, exp.data.data_dir)
    return {f"samples/{k}": v for k, v in figures.items()}


def run_sample(exp: Experiment, workdir: str, *, rewrite_config_record: bool = False) -> np.ndarray:
    """``--mode=sample``: ``sample.num_samples`` samples from the latest checkpoint.

    The workdir is checked first, as for evaluation; ``rewrite_config_record`` writes a
    damaged ``config.json`` anew (``--config_record=rewrite``).

    Writes ``{workdir}/samples/step_{step}.png`` and ``.npz`` (process 0), and logs the
    sample-quality figures of :func:`quality` to the console and TensorBoard.

    Returns:
      The samples, int32 [N, H, W, C].
    """
    workdir_lib.prepare(workdir, create=False)
    workdir_lib.check_config_record(exp, workdir, rewrite_damaged=rewrite_config_record)
    params, step = checkpoint.restore_eval_params(exp, workdir)
    samples = draw(exp, params, make_sample_fn(exp))
    scalars = quality(exp, samples, workdir)
    if scalars:
        writer = metrics.MetricWriter(workdir)
        writer.write_scalars(step, scalars)
        writer.close()
    if jax.process_index() == 0:
        path = outputs.write_samples(samples, exp.info.vocab_size, workdir, step)
        print(f"Wrote {len(samples)} samples of step {step} to {path} and .npz")
        if scalars:
            print(
                f"Fréchet distance to the held-out images {scalars['samples/frechet_distance']:.3f}"
                f" (as many training images, for scale: "
                f"{scalars['samples/frechet_distance_real']:.3f})"
            )
    return samples
