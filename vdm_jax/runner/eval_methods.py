"""Evaluation estimators, chosen by ``eval.method`` from :data:`EVAL_METHODS`.

Each entry is a pure per-batch function of the model as plain functions (``gamma_fn``,
``eps_fn``, so an analytic denoiser plugs in too) and the properties the runner and the
config checks read: whether it needs a continuous-time model, its network evaluations per
image, the settings recorded with its results, extra config rules, and an optional
``prepare`` step run once per evaluation on the first batch (the importance pilot).
:mod:`vdm_jax.runner.evaluate` runs an entry over the whole split; adding an estimator is one entry
here, its function and its test.

Per-batch contract: ``estimate(gamma_fn, eps_fn, x [B, H, W, C] ints, key, prepared, *,
loss, settings) -> Estimate``, all values per image in bits/dim.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from vdm_jax import diffusion, elbo_estimators, ode_likelihood, schedules
from vdm_jax.model import LossConfig
from vdm_jax.runner.specs import EvalSpec

# Time bins of the importance-sampling proposal q(t) (``elbo_importance``).
PROPOSAL_BINS = 32
# Term names of ``diffusion.vdm_terms`` -> the names reported for them.
TERM_NAMES = {"prior": "bpd_prior", "recon": "bpd_recon", "diffusion": "bpd_diff"}


class Estimate(NamedTuple):
    """One batch's per-image estimates.

    Attributes:
      terms: ``{"bpd": [B], ...}`` bits/dim; each is averaged over the split with its standard
        error over images.
      mc_stderr: [B] the Monte Carlo standard error of each image's ``bpd`` (given the image),
        or None when the method has no replicates to measure it.
      num_function_evals: [B] network evaluations spent on each image, or None when fixed
        (:attr:`EvalMethod.network_evals_per_image`).
    """

    terms: dict[str, jax.Array]
    mc_stderr: jax.Array | None = None
    num_function_evals: jax.Array | None = None


Estimator = Callable[..., Estimate]
Prepare = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class EvalMethod:
    """A registered estimator and the properties the runner and config checks read.

    Attributes:
      estimate: the per-batch function (see the module docstring).
      term_names: ``EvalSpec -> `` the keys of :attr:`Estimate.terms`.
      continuous_only: needs a continuous-time model (``model.timesteps = 0``).
      network_evals_per_image: ``EvalSpec -> `` network evaluations per image, or None when
        adaptive (reported per batch instead).
      settings: ``EvalSpec -> `` the settings recorded with the results.
      check: ``EvalSpec -> `` problems with the settings (each naming its field).
      prepare: ``(gamma_fn, eps_fn, x, key, *, loss, settings) -> pytree`` run once per
        evaluation on the first batch and passed to every ``estimate`` as ``prepared``;
        None: ``prepared`` is None.
      per_example_fns: ``EvalSpec ->`` the estimate calls ``gamma_fn`` and ``eps_fn`` on the
        batch's own examples only (not on copies of them), so functions that carry one row
        per example (an input-adaptive model's latent) work.
      time_sampling: how the estimator picks its times, recorded with every result (the
        protocol that makes a bits/dim comparable); None for the ODE's adaptive solver.
    """

    estimate: Estimator
    term_names: Callable[[EvalSpec], tuple[str, ...]]
    continuous_only: bool
    network_evals_per_image: Callable[[EvalSpec], int | None]
    settings: Callable[[EvalSpec], dict[str, Any]]
    check: Callable[[EvalSpec], list[str]] = lambda settings: []
    prepare: Prepare | None = None
    per_example_fns: Callable[[EvalSpec], bool] = lambda settings: True
    time_sampling: str | None = None


def _elbo_terms(settings: EvalSpec) -> tuple[str, ...]:
    del settings
    return ("bpd", *TERM_NAMES.values())


def _time_samples(settings: EvalSpec) -> int:
    return settings.num_time_samples


def _time_sample_settings(settings: EvalSpec) -> dict[str, Any]:
    return {"num_time_samples": settings.num_time_samples}


def _even_time_samples(settings: EvalSpec) -> list[str]:
    if settings.num_time_samples % 2:
        return [
            f"config.eval.num_time_samples={settings.num_time_samples!r} must be even for "
            f"config.eval.method={settings.method!r} (two replicates give its standard error)"
        ]
    return []


def training_estimator(
    gamma_fn: schedules.GammaFn,
    eps_fn: diffusion.EpsFn,
    x: jax.Array,
    key: jax.Array,
    prepared: None,
    *,
    loss: LossConfig,
    settings: EvalSpec,
) -> Estimate:
    """The training loss's own estimator, ``num_time_samples`` draws averaged per image.

    Draw ``i`` uses ``fold_in(key, i)``; its times are antithetic over the batch when
    ``loss.antithetic_time`` (so the result depends on the batch size), and on the T-step grid
    for a discrete-time model.
    """
    del prepared
    num_dims = math.prod(x.shape[1:])

    def add_sample(i: jax.Array, sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
        nats = diffusion.vdm_terms(
            x,
            jax.random.fold_in(key, i),
            gamma_fn,
            eps_fn,
            vocab_size=loss.vocab_size,
            timesteps=loss.timesteps,
            antithetic_time=loss.antithetic_time,
        )
        return {k: sums[k] + nats[k] for k in sums}

    zeros = {k: jnp.zeros(x.shape[:1], jnp.float32) for k in TERM_NAMES}
    sums = jax.lax.fori_loop(0, settings.num_time_samples, add_sample, zeros)
    terms = {
        TERM_NAMES[k]: diffusion.bits_per_dim(v / settings.num_time_samples, num_dims)
        for k, v in sums.items()
    }
    return Estimate({"bpd": sum(terms.values()), **terms})


def per_image_elbo(
    gamma_fn: schedules.GammaFn,
    eps_fn: diffusion.EpsFn,
    x: jax.Array,
    key: jax.Array,
    prepared: elbo_estimators.TimeProposal | None,
    *,
    loss: LossConfig,
    settings: EvalSpec,
) -> Estimate:
    """:func:`vdm_jax.elbo_estimators.elbo_eval`: stratified times per image in two
    replicates, under the proposal ``prepared`` (None: uniform), with each image's Monte
    Carlo error."""
    return _elbo_eval(gamma_fn, eps_fn, x, key, prepared, loss, settings, "stratified")


def shifted_grid_elbo(
    gamma_fn: schedules.GammaFn,
    eps_fn: diffusion.EpsFn,
    x: jax.Array,
    key: jax.Array,
    prepared: None,
    *,
    loss: LossConfig,
    settings: EvalSpec,
) -> Estimate:
    """As :func:`per_image_elbo`, with each replicate's times one random shift of an even
    grid, ``(U + j / S) mod 1`` (randomised quasi-Monte Carlo, the training estimator's
    points per image instead of per batch)."""
    return _elbo_eval(gamma_fn, eps_fn, x, key, prepared, loss, settings, "shifted")


def _elbo_eval(
    gamma_fn: schedules.GammaFn,
    eps_fn: diffusion.EpsFn,
    x: jax.Array,
    key: jax.Array,
    proposal: elbo_estimators.TimeProposal | None,
    loss: LossConfig,
    settings: EvalSpec,
    time_points: str,
) -> Estimate:
    est = elbo_estimators.elbo_eval(
        key,
        x,
        gamma_fn,
        eps_fn,
        vocab_size=loss.vocab_size,
        num_time_samples=settings.num_time_samples,
        time_points=time_points,
        proposal=proposal,
    )
    num_dims = math.prod(x.shape[1:])
    terms = {"bpd": est.total, "bpd_prior": est.prior, "bpd_recon": est.recon}
    terms["bpd_diff"] = est.diffusion
    return Estimate(
        {k: diffusion.bits_per_dim(v, num_dims) for k, v in terms.items()},
        mc_stderr=diffusion.bits_per_dim(est.total_stderr, num_dims),
    )


def fit_time_proposal(
    gamma_fn: schedules.GammaFn,
    eps_fn: diffusion.EpsFn,
    x: jax.Array,
    key: jax.Array,
    *,
    loss: LossConfig,
    settings: EvalSpec,
) -> elbo_estimators.TimeProposal:
    """q(t) for importance sampling, fitted on one pilot batch, [PROPOSAL_BINS] bins.

    The pilot draws ``num_time_samples`` stratified times per image and sets q(t) in each
    bin proportional to the root mean square of the diffusion integrand there (the
    variance-minimising choice), mixed with 10% of the uniform density
    (:func:`vdm_jax.elbo_estimators.fit_proposal`). Any q keeps the estimate unbiased; the
    pilot only decides how much the variance drops. Its cost is one pass over one batch.
    """
    samples = elbo_estimators.diffusion_loss_samples(
        key,
        diffusion.encode(x, loss.vocab_size),
        gamma_fn,
        eps_fn,
        num_samples=settings.num_time_samples,
    )
    return elbo_estimators.fit_proposal(samples.t, samples.integrand, num_bins=PROPOSAL_BINS)


def _ode_terms(settings: EvalSpec) -> tuple[str, ...]:
    names = ("bpd",)
    if settings.ode_importance_weighted:
        names += ("bpd_per_draw",)
    if ode_likelihood.DEQUANTIZATIONS[settings.ode_dequantization].has_decoder:
        names += ("bpd_recon",)
    return names


def probability_flow(
    gamma_fn: schedules.GammaFn,
    eps_fn: diffusion.EpsFn,
    x: jax.Array,
    key: jax.Array,
    prepared: None,
    *,
    loss: LossConfig,
    settings: EvalSpec,
) -> Estimate:
    """:func:`vdm_jax.ode_likelihood.ode_bpd` with the ``ode_*`` settings.

    ``bpd`` is the mean of the per-draw bounds, with its Monte Carlo error over the
    ``ode_dequant_samples`` draws (None with one draw); with ``ode_importance_weighted`` it is
    the importance-weighted bound over the draws (no Monte Carlo error: it is not a mean),
    and ``bpd_per_draw`` the mean.
    """
    del prepared
    result = ode_likelihood.ode_bpd(
        key,
        x,
        gamma_fn,
        eps_fn,
        vocab_size=loss.vocab_size,
        num_dequant_samples=settings.ode_dequant_samples,
        dequantization=settings.ode_dequantization,
        divergence=settings.ode_divergence,
        rtol=settings.ode_rtol,
        atol=settings.ode_atol,
    )
    weighted = settings.ode_importance_weighted
    terms = {
        "bpd": result.bpd_importance_weighted if weighted else result.bpd,
        "bpd_per_draw": result.bpd,
        "bpd_recon": result.bpd_recon,
    }
    nfe = jnp.broadcast_to(result.num_function_evals, result.bpd.shape).astype(jnp.float32)
    return Estimate(
        {k: terms[k] for k in _ode_terms(settings)},
        mc_stderr=result.bpd_stderr if settings.ode_dequant_samples > 1 and not weighted else None,
        num_function_evals=nfe,
    )


def _ode_settings(settings: EvalSpec) -> dict[str, Any]:
    return {
        "ode_rtol": settings.ode_rtol,
        "ode_atol": settings.ode_atol,
        "ode_divergence": settings.ode_divergence,
        "ode_dequant_samples": settings.ode_dequant_samples,
        "ode_dequantization": settings.ode_dequantization,
        "ode_importance_weighted": settings.ode_importance_weighted,
    }


def _importance_weighting_rules(settings: EvalSpec) -> list[str]:
    """The importance-weighted ODE bound needs several draws, and exact traces: ``exp`` of a
    Hutchinson estimate of the log-density is biased upwards, so the weighted figure falls
    below the bound (by 0.26 bpd on the digits model with 4 draws)."""
    if not settings.ode_importance_weighted:
        return []
    problems = []
    if settings.ode_dequant_samples < 2:
        problems.append(
            f"config.eval.ode_importance_weighted=True needs config.eval.ode_dequant_samples "
            f">= 2 to weight, got {settings.ode_dequant_samples!r} (allowed: >= 2, or False)"
        )
    if settings.ode_divergence != "exact":
        problems.append(
            "config.eval.ode_importance_weighted=True needs exact traces: with "
            f"config.eval.ode_divergence={settings.ode_divergence!r} the trace noise biases the "
            "weighted figure below the bound (allowed: 'exact', or False)"
        )
    return problems


def _adaptive(settings: EvalSpec) -> None:
    del settings


def _per_image_elbo_method(
    estimate: Estimator, time_sampling: str, prepare: Prepare | None = None
) -> EvalMethod:
    """An ELBO estimator with K times per image in two replicates (K even)."""
    return EvalMethod(
        estimate=estimate,
        term_names=_elbo_terms,
        continuous_only=True,
        network_evals_per_image=_time_samples,
        settings=_time_sample_settings,
        check=_even_time_samples,
        prepare=prepare,
        time_sampling=time_sampling,
    )


EVAL_METHODS: dict[str, EvalMethod] = {
    # The negative ELBO with the training estimator (antithetic times over the batch).
    "elbo": EvalMethod(
        estimate=training_estimator,
        term_names=_elbo_terms,
        continuous_only=False,
        network_evals_per_image=_time_samples,
        settings=_time_sample_settings,
        time_sampling="antithetic over the batch, t_i = (u + i / B) mod 1 (the training estimator)",
    ),
    # The same bound, stratified times per image in two replicates: a Monte Carlo error.
    "elbo_stratified": _per_image_elbo_method(
        per_image_elbo, "stratified per image, uniform proposal, 2 replicates"
    ),
    # The same bound, a randomly shifted even grid of times per image in two replicates.
    "elbo_shifted": _per_image_elbo_method(
        shifted_grid_elbo, "randomly shifted even grid per image, 2 replicates"
    ),
    # As "elbo_stratified", with t from q(t) fitted on a pilot batch.
    "elbo_importance": _per_image_elbo_method(
        per_image_elbo,
        f"stratified per image under q(t) fitted on the first batch ({PROPOSAL_BINS} bins), "
        "2 replicates",
        prepare=fit_time_proposal,
    ),
    # The probability-flow ODE's dequantized bound.
    "ode": EvalMethod(
        estimate=probability_flow,
        term_names=_ode_terms,
        continuous_only=True,
        network_evals_per_image=_adaptive,
        settings=_ode_settings,
        check=_importance_weighting_rules,
        # Several dequantization draws are solved as one batch of copies of the images.
        per_example_fns=lambda settings: settings.ode_dequant_samples == 1,
    ),
}
