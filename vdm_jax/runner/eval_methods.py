"""Evaluation estimators, chosen by ``eval.method`` from :data:`EVAL_METHODS`.

Each entry is a pure per-batch function of the model as plain functions (``gamma_fn``,
``eps_fn``, so an analytic denoiser plugs in too), the settings record it reads from
``config.eval`` (an :class:`EvalSettings`: it checks its own values and declares the terms,
the network evaluations per image and what is recorded with the results), whether it needs
a continuous-time model, and an optional ``prepare`` step run once per evaluation on the
first batch (the importance pilot). :mod:`vdm_jax.runner.evaluate` runs an entry over the
whole split; adding an estimator is one entry here, its function, its settings record (its
own fields listed in ``configs/base.py``) and its test.

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
from vdm_jax.runner.specs import may_change
from vdm_jax.settings import Settings, is_int, is_number, out_of_range, unknown_name

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
        (:meth:`EvalSettings.network_evals_per_image`).
    """

    terms: dict[str, jax.Array]
    mc_stderr: jax.Array | None = None
    num_function_evals: jax.Array | None = None


Estimator = Callable[..., Estimate]
Prepare = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class EvalSettings(Settings):
    """Base of an estimator's settings record (fields: keys of ``config.eval``).

    Its fields are recorded with the results (:meth:`as_dict`) and may change between runs
    of a workdir (:func:`vdm_jax.runner.specs.may_change`); its methods declare what the
    runner and the config checks read.
    """

    def term_names(self) -> tuple[str, ...]:
        """The keys of :attr:`Estimate.terms`."""
        return ("bpd", *TERM_NAMES.values())

    def network_evals_per_image(self) -> int | None:
        """Network evaluations per image, or None when adaptive (reported per batch)."""
        return None

    def per_example_fns(self) -> bool:
        """The estimate calls ``gamma_fn`` and ``eps_fn`` on the batch's own examples only
        (not on copies of them), so functions that carry one row per example (an
        input-adaptive model's latent) work."""
        return True


@dataclasses.dataclass(frozen=True)
class ElboSettings(EvalSettings):
    """An ELBO estimator: ``num_time_samples`` network evaluations per image."""

    num_time_samples: int = may_change()

    def problems(self) -> list[str]:
        n = self.num_time_samples
        return out_of_range("eval.num_time_samples", n, is_int(n) and n >= 1, "an integer >= 1")

    def network_evals_per_image(self) -> int:
        return self.num_time_samples


@dataclasses.dataclass(frozen=True)
class PerImageElboSettings(ElboSettings):
    """Per-image times in two replicates, whose difference gives the Monte Carlo error."""

    def problems(self) -> list[str]:
        n, problems = self.num_time_samples, super().problems()
        if problems or n % 2 == 0:
            return problems
        return [
            f"config.eval.num_time_samples={n!r} must be even: this config.eval.method draws "
            "two replicates per image, whose difference gives its standard error (allowed: "
            "an even integer >= 2)"
        ]


@dataclasses.dataclass(frozen=True)
class ImportanceSettings(PerImageElboSettings):
    """As :class:`PerImageElboSettings`, under a proposal q(t) of ``proposal_bins`` equal
    time bins fitted on a pilot batch (:func:`fit_time_proposal`)."""

    proposal_bins: int = may_change()

    def problems(self) -> list[str]:
        m = self.proposal_bins
        ok = is_int(m) and m >= 1
        return super().problems() + out_of_range("eval.proposal_bins", m, ok, "an integer >= 1")


@dataclasses.dataclass(frozen=True)
class OdeSettings(EvalSettings):
    """The probability-flow ODE's bound: tolerances, traces, dequantization and its draws.

    The importance-weighted bound needs several draws, and exact traces: ``exp`` of a
    Hutchinson estimate of the log-density is biased upwards, so the weighted figure falls
    below the bound (by 0.26 bpd on the digits model with 4 draws).
    """

    ode_rtol: float = may_change()
    ode_atol: float = may_change()
    ode_divergence: str = may_change()
    ode_dequant_samples: int = may_change()
    ode_dequantization: str = may_change()
    ode_importance_weighted: bool = may_change()

    def problems(self) -> list[str]:
        draws = self.ode_dequant_samples
        problems = [
            *out_of_range("eval.ode_rtol", self.ode_rtol, _positive(self.ode_rtol), "a number > 0"),
            *out_of_range("eval.ode_atol", self.ode_atol, _positive(self.ode_atol), "a number > 0"),
            *unknown_name("eval.ode_divergence", self.ode_divergence, ode_likelihood.DIVERGENCES),
            *out_of_range(
                "eval.ode_dequant_samples", draws, is_int(draws) and draws >= 1, "an integer >= 1"
            ),
            *unknown_name(
                "eval.ode_dequantization",
                self.ode_dequantization,
                ode_likelihood.DEQUANTIZATIONS,
            ),
        ]
        if not self.ode_importance_weighted:
            return problems
        if is_int(draws) and draws < 2:
            problems.append(
                f"config.eval.ode_importance_weighted=True needs config.eval.ode_dequant_samples "
                f">= 2 to weight, got {draws!r} (allowed: >= 2, or False)"
            )
        if self.ode_divergence != "exact":
            problems.append(
                "config.eval.ode_importance_weighted=True needs exact traces: with "
                f"config.eval.ode_divergence={self.ode_divergence!r} the trace noise biases "
                "the weighted figure below the bound (allowed: 'exact', or False)"
            )
        return problems

    def term_names(self) -> tuple[str, ...]:
        names = ("bpd",)
        if self.ode_importance_weighted:
            names += ("bpd_per_draw",)
        if ode_likelihood.DEQUANTIZATIONS[self.ode_dequantization].has_decoder:
            names += ("bpd_recon",)
        return names

    def per_example_fns(self) -> bool:
        # Several dequantization draws are solved as one batch of copies of the images.
        return self.ode_dequant_samples == 1


def _positive(value: Any) -> bool:
    return is_number(value) and value > 0


@dataclasses.dataclass(frozen=True)
class EvalMethod:
    """A registered estimator.

    Attributes:
      estimate: the per-batch function (see the module docstring), ``settings=`` a record
        of its :attr:`settings` type.
      settings: the record of the ``config.eval`` fields it reads.
      continuous_only: needs a continuous-time model (``model.timesteps = 0``).
      prepare: ``(gamma_fn, eps_fn, x, key, *, loss, settings) -> pytree`` run once per
        evaluation on the first batch and passed to every ``estimate`` as ``prepared``;
        None: ``prepared`` is None.
      time_sampling: how the estimator picks its times, recorded with every result (part of
        the protocol that makes a bits/dim comparable); None for the ODE's adaptive solver.
    """

    estimate: Estimator
    settings: type[EvalSettings]
    continuous_only: bool
    prepare: Prepare | None = None
    time_sampling: str | None = None


def training_estimator(
    gamma_fn: schedules.GammaFn,
    eps_fn: diffusion.EpsFn,
    x: jax.Array,
    key: jax.Array,
    prepared: None,
    *,
    loss: LossConfig,
    settings: ElboSettings,
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
    settings: ElboSettings,
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
    settings: ElboSettings,
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
    settings: ElboSettings,
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
    settings: ImportanceSettings,
) -> elbo_estimators.TimeProposal:
    """q(t) for importance sampling, fitted on one pilot batch, [proposal_bins] bins.

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
    return elbo_estimators.fit_proposal(
        samples.t, samples.integrand, num_bins=settings.proposal_bins
    )


def probability_flow(
    gamma_fn: schedules.GammaFn,
    eps_fn: diffusion.EpsFn,
    x: jax.Array,
    key: jax.Array,
    prepared: None,
    *,
    loss: LossConfig,
    settings: OdeSettings,
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
        {k: terms[k] for k in settings.term_names()},
        mc_stderr=result.bpd_stderr if settings.ode_dequant_samples > 1 and not weighted else None,
        num_function_evals=nfe,
    )


EVAL_METHODS: dict[str, EvalMethod] = {
    # The negative ELBO with the training estimator (antithetic times over the batch).
    "elbo": EvalMethod(
        training_estimator,
        ElboSettings,
        continuous_only=False,
        time_sampling="antithetic over the batch, t_i = (u + i / B) mod 1 (the training estimator)",
    ),
    # The same bound, stratified times per image in two replicates: a Monte Carlo error.
    "elbo_stratified": EvalMethod(
        per_image_elbo,
        PerImageElboSettings,
        continuous_only=True,
        time_sampling="stratified per image, uniform proposal, 2 replicates",
    ),
    # The same bound, a randomly shifted even grid of times per image in two replicates.
    "elbo_shifted": EvalMethod(
        shifted_grid_elbo,
        PerImageElboSettings,
        continuous_only=True,
        time_sampling="randomly shifted even grid per image, 2 replicates",
    ),
    # As "elbo_stratified", with t from q(t) fitted on a pilot batch.
    "elbo_importance": EvalMethod(
        per_image_elbo,
        ImportanceSettings,
        continuous_only=True,
        prepare=fit_time_proposal,
        time_sampling=(
            "stratified per image under q(t) of proposal_bins bins fitted on the first batch, "
            "2 replicates"
        ),
    ),
    # The probability-flow ODE's dequantized bound.
    "ode": EvalMethod(probability_flow, OdeSettings, continuous_only=True),
}
