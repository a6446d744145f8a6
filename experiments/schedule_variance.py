r"""How much the learned schedule lowers the variance of the training gradient.

  python -m experiments.schedule_variance --config=configs/digits.py --workdir=workdir/digits

In continuous time the (weighted) diffusion loss depends on the schedule only through its
endpoints, so the schedule's interior is an importance distribution over log-SNR: with
``model.schedule_grad="variance"`` it is trained to lower the variance of the loss estimate
(VDM, section 5; the adaptive importance distribution of Kingma & Gao 2023). This measures
what that buys at the workdir's latest checkpoint: on one fixed batch of training images,
``--draws`` draws of times and noise give the denoiser's gradient under the learned schedule
and under the linear schedule with the same endpoints (uniform in log-SNR). Both estimate the
same expected gradient; so does a third, VDM++'s adaptive importance distribution itself
(what ``model.adaptive_time`` tracks during training): times from the piecewise-constant
q(t) proportional to the root mean square of the weighted integrand, fitted on a pilot of
the same batch (as ``eval.method=elbo_importance`` fits its proposal), with the learned
schedule and each weight divided by q(t). Unconditional models with a scalar schedule only.
The script prints each one's total variance ``E||g - mean g||^2`` and that of the weighted
loss, their ratios to the linear schedule's, and writes ``{workdir}/schedule_variance.json``.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vdm_jax import diffusion, elbo_estimators, model, weightings
from vdm_jax.runner import checkpoint, data, experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A trained workdir.")
_DRAWS = flags.DEFINE_integer("draws", 128, "Draws of times and noise per schedule.")
flags.mark_flags_as_required(["config", "workdir"])


def gradient_statistics(
    schedule_fn: model.ScheduleFn,
    schedule_params: model.Params,
    denoise_fn: model.DenoiseFn,
    denoise_params: model.Params,
    x: jax.Array,
    keys: jax.Array,
    cfg: model.LossConfig,
    proposal: elbo_estimators.TimeProposal | None = None,
) -> dict[str, float]:
    """Mean and total variance over ``keys`` [N] of the denoiser's gradient and of the
    (weighted) diffusion estimate, for one batch ``x``, with times from ``proposal``."""

    @jax.jit
    def one(key: jax.Array) -> tuple[jax.Array, jax.Array]:
        (_, terms), (_, grads) = model.loss_and_grads(
            schedule_fn, schedule_params, denoise_fn, denoise_params, x, key, cfg, proposal
        )
        diffusion = terms.get("diffusion_weighted", terms["diffusion"])
        flat = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads)])
        return jnp.mean(diffusion), flat

    losses, grads = zip(*(one(k) for k in keys), strict=True)
    losses = np.asarray(losses, np.float64)
    grads = np.stack([np.asarray(g, np.float64) for g in grads])
    mean = grads.mean(axis=0)
    return {
        "loss_mean": float(losses.mean()),
        "loss_stderr": float(losses.std(ddof=1) / np.sqrt(len(losses))),
        "loss_variance": float(losses.var(ddof=1)),
        "grad_total_variance": float(np.sum(grads.var(axis=0, ddof=1))),
        "grad_mean_norm": float(np.linalg.norm(mean)),
    }


def main(argv: list[str]) -> None:
    del argv
    exp = experiment.build(_CONFIG.value)
    if exp.conditioning.conditional:
        raise app.UsageError("only unconditional models (config.model.conditioning='none')")
    if exp.schedule.per_dimension:
        raise app.UsageError(
            "only scalar schedules: the comparison is with the linear schedule of the same "
            f"endpoints, and config.model.schedule={exp.model.schedule!r} is per dimension"
        )
    if exp.vdm.ensemble_size > 1:
        raise app.UsageError(
            "only one score network: the gradients compared are one denoiser's, and "
            f"config.model.ensemble_size={exp.vdm.ensemble_size}"
        )
    params, step = checkpoint.restore_eval_params(exp, _WORKDIR.value)
    images, _ = data.read_split(
        exp.info.name, "train", exp.data.data_dir, count=exp.training.batch_size
    )
    x = jnp.asarray(images)
    vdm = exp.vdm

    def learned(p: model.Params, t: jax.Array) -> jax.Array:
        return vdm.apply({"params": {"schedule": p}}, t, method=model.VDM.gamma)

    schedule_params = params["schedule"]
    gamma_0 = float(learned(schedule_params, jnp.zeros(())))
    gamma_1 = float(learned(schedule_params, jnp.ones(())))

    def linear(p: model.Params, t: jax.Array) -> jax.Array:
        del p
        return gamma_0 + (gamma_1 - gamma_0) * t

    def denoise(p: model.Params, z: jax.Array, gamma_t: jax.Array) -> jax.Array:
        variables = {"params": {"score_net": p}}
        return vdm.apply(variables, z, gamma_t, None, train=False, method=model.VDM.eps)

    pilot = elbo_estimators.diffusion_loss_samples(
        jax.random.key(exp.seed + 1),
        diffusion.encode(x, exp.info.vocab_size),
        lambda t: learned(schedule_params, t),
        lambda z, g: denoise(params["score_net"], z, g),
        num_samples=16,
    )
    w, _ = weightings.weight_and_slope(
        exp.loss.weighting, exp.loss.weighting_bias, learned(schedule_params, pilot.t)
    )
    proposal = elbo_estimators.fit_proposal(pilot.t, w * pilot.integrand)

    keys = jax.random.split(jax.random.key(exp.seed), _DRAWS.value)
    result = {"step": step, "gamma_0": gamma_0, "gamma_1": gamma_1, "draws": _DRAWS.value}
    settings = (("learned", learned, None), ("linear", linear, None), ("fitted", learned, proposal))
    for name, fn, q in settings:
        result[name] = gradient_statistics(
            fn, schedule_params, denoise, params["score_net"], x, keys, exp.loss, q
        )
    for name in ("learned", "fitted"):
        for key in ("grad_total_variance", "loss_variance"):
            result[f"{name}_{key}_ratio"] = result[name][key] / result["linear"][key]
    print(json.dumps(result, indent=1))
    with open(os.path.join(_WORKDIR.value, "schedule_variance.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    app.run(main)
