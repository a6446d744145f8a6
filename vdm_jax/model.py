"""The VDM: a schedule and a noise predictor, and the gradients that train them.

:class:`VDM` is a thin Flax module holding the two parameterised parts (params
``{"schedule": ..., "score_net": ...}``). :func:`loss_and_grads` is the training objective
for any schedule and denoiser given as plain functions of their parameters; it returns the
gradient of the (optionally weighted, :mod:`vdm_jax.weightings`) objective for the denoiser,
the ELBO gradient for the schedule's endpoints and, with ``schedule_grad="variance"``, the
gradient of the second moment of the diffusion-loss estimate for the schedule's interior
(paper section 5): the interior cannot change the expected ELBO in continuous time, only the
variance of its estimate.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm_jax import (
    diffusion,
    elbo_estimators,
    latents,
    parameterizations,
    schedules,
    weightings,
)
from vdm_jax.settings import Settings, is_int, out_of_range, unknown_name

Params = Any
# (params, t[, context]) -> gamma_t
ScheduleFn = Callable[..., jax.Array]
# (params, z_t, gamma_t[, context]) -> eps_hat
DenoiseFn = Callable[..., jax.Array]
# (schedule-side params, f [B, ...], key) -> (context [B, L], KL(q(c | x) || p(c)) [B] nats)
LatentFn = Callable[[Params, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]

SCHEDULE_GRADS = ("elbo", "variance")


@dataclasses.dataclass(frozen=True)
class LossConfig(Settings):
    """What the objective needs to know, and nothing else; it checks its own values.

    Attributes:
      vocab_size: K, the number of values each data dimension takes (``config.data``).
      timesteps: 0 for the continuous-time loss, else the number of discrete steps T.
      antithetic_time: low-discrepancy times ``(u + i / B) mod 1`` over the batch.
      schedule_grad: ``"elbo"`` trains the whole schedule on the ELBO; ``"variance"`` trains
        the parameters ``variance_params`` on the variance of the (weighted) diffusion loss
        and every other one on the ELBO.
      weighting: a :data:`vdm_jax.weightings.WEIGHTINGS` key: the denoiser trains on the
        diffusion loss weighted by ``w(log-SNR)`` (``"elbo"``: w = 1, the ELBO itself).
      weighting_bias: ``b`` of the ``"sigmoid"`` weighting.
      adaptive_time: draw training times from a proposal q(t) proportional to the root mean
        square of the (weighted) diffusion integrand, tracked during training (VDM++'s
        adaptive importance distribution; continuous time only). The train state keeps the
        per-bin second moments (:func:`vdm_jax.elbo_estimators.update_moments`).
      variance_params: the schedule's declared
        :attr:`vdm_jax.schedules.ScheduleKind.variance_params` (names of parameter leaves);
        None: the schedule has none, and ``"variance"`` is refused.
      per_dimension: the schedule's declared
        :attr:`vdm_jax.schedules.ScheduleKind.per_dimension`: its paths change the bound, so
        only the ``"elbo"`` weighting is allowed.

    The fields besides ``vocab_size`` and the schedule's two are ``config.model``'s.
    """

    vocab_size: int
    timesteps: int = 0
    antithetic_time: bool = True
    schedule_grad: str = "elbo"
    weighting: str = "elbo"
    weighting_bias: float = 0.0
    adaptive_time: bool = False
    variance_params: frozenset[str] | None = frozenset()
    per_dimension: bool = False

    def problems(self) -> list[str]:
        vocab, steps, weighting = self.vocab_size, self.timesteps, self.weighting
        problems = [
            *out_of_range(
                "data.vocab_size", vocab, is_int(vocab) and vocab >= 2, "an integer >= 2"
            ),
            *out_of_range(
                "model.timesteps",
                steps,
                is_int(steps) and steps >= 0,
                "0 (continuous time) or an integer T >= 1",
            ),
            *unknown_name("model.schedule_grad", self.schedule_grad, SCHEDULE_GRADS),
            *unknown_name("model.weighting", weighting, weightings.WEIGHTINGS),
        ]
        if self.adaptive_time and is_int(steps) and steps > 0:
            problems.append(
                f"config.model.adaptive_time=True needs continuous time, and "
                f"config.model.timesteps={steps} (allowed: timesteps 0, or adaptive_time False)"
            )
        if self.schedule_grad == "variance" and self.variance_params is None:
            problems.append(
                "config.model.schedule_grad='variance' needs a schedule with endpoint "
                "parameters, and config.model.schedule has none (allowed: 'elbo')"
            )
        if self.per_dimension and weighting != "elbo":
            problems.append(
                f"config.model.weighting={weighting!r}: a per-dimension schedule's paths "
                "change the bound, so it trains on the ELBO (allowed: 'elbo')"
            )
        return problems


class VDM(nn.Module):
    """A schedule module and a score network under one parameter tree.

    Attributes:
      schedule: ``t -> gamma_t`` module (see :mod:`vdm_jax.schedules`): elementwise, or per
        dimension; with an ``encoder``, it also takes the context ``c``.
      score_net: ``(z [B, ...], gamma_t, label [B] | None, train, context) -> [B, ...]``,
        the prediction that ``parameterization`` names.
      parameterization: a :data:`vdm_jax.parameterizations.PARAMETERIZATIONS` key (``eps``,
        ``x``, ``v`` or ``categorical``); :meth:`eps` converts the network's output into
        ``eps_hat``.
      encoder: None, or the :class:`vdm_jax.latents.LatentEncoder` of an input-adaptive
        schedule's auxiliary latent (params ``encoder``).
      vocab_size: K, the number of values each data dimension takes: read by the
        ``categorical`` parameterisation (whose network outputs K logits per channel).
      ensemble_size: M, the number of independent score networks. The module itself holds
        one; with M > 1 the stored ``score_net`` parameters stack M of them on a leading
        axis (:func:`init_params`), :func:`inference_fns` averages their eps_hat and
        :mod:`vdm_jax.runner.ensemble` trains each on its own loss.
    """

    schedule: nn.Module
    score_net: nn.Module
    parameterization: str = "eps"
    encoder: nn.Module | None = None
    vocab_size: int = 0
    ensemble_size: int = 1

    def gamma(self, t: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """gamma(t) (given the context ``c`` [B, L] for an input-adaptive schedule)."""
        return self.schedule(t) if context is None else self.schedule(t, context)

    def eps(
        self,
        z: jax.Array,
        gamma_t: jax.Array,
        label: jax.Array | None = None,
        context: jax.Array | None = None,
        *,
        train: bool,
    ) -> jax.Array:
        """Predicted noise, [B, ...], whatever the network predicts."""
        if context is None:
            out = self.score_net(z, gamma_t, label, train=train)
        else:
            out = self.score_net(z, gamma_t, label, train=train, context=context)
        return parameterizations.PARAMETERIZATIONS[self.parameterization].to_eps(
            out, z, gamma_t, self.vocab_size
        )

    def posterior(self, f: jax.Array) -> tuple[jax.Array, jax.Array]:
        """q(c | x) from the encoded data f [B, ...]: (mean, log_var), each [B, L]."""
        return self.encoder(f)

    def __call__(
        self, z: jax.Array, t: jax.Array, label: jax.Array | None = None, *, train: bool = False
    ) -> jax.Array:
        """eps_hat(z_t; gamma(t)): used to initialise every part."""
        context = None if self.encoder is None else self.posterior(z)[0]
        return self.eps(z, self.gamma(t, context), label, context, train=train)


def init_params(model: VDM, key: jax.Array, *inputs: jax.Array | None) -> Params:
    """The model's parameters, initialised from ``key`` with example ``inputs``
    (``(z [b, ...], t [b], label [b] | None)``).

    With ``model.ensemble_size`` M > 1, member m is initialised from the m-th of
    ``jax.random.split(key, M)``, and the ``score_net`` leaves stack the members on a
    leading [M] axis; the schedule (and encoder) are member 0's. With M = 1, the parameters
    are those of ``model.init`` from ``key``.
    """
    if model.ensemble_size == 1:
        return model.init({"params": key}, *inputs)["params"]
    members = [
        model.init({"params": k}, *inputs)["params"]
        for k in jax.random.split(key, model.ensemble_size)
    ]
    nets = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(m["score_net"] for m in members))
    return {**members[0], "score_net": nets}


def member_params(params: Params, member: int) -> Params:
    """Member ``member``'s parameters, as a one-network model's, from an ensemble's."""
    return {**params, "score_net": jax.tree.map(lambda x: x[member], params["score_net"])}


def _merge_schedule_grads(
    elbo_grads: Params, variance_grads: Params, variance_params: frozenset[str]
) -> Params:
    """The leaves named in ``variance_params`` from the variance gradient, every other leaf
    from the ELBO's (the schedule kind's declared split)."""

    def pick(path, g_elbo, g_var):
        return g_var if getattr(path[-1], "key", None) in variance_params else g_elbo

    return jax.tree_util.tree_map_with_path(pick, elbo_grads, variance_grads)


def loss_and_grads(
    schedule_fn: ScheduleFn,
    schedule_params: Params,
    denoise_fn: DenoiseFn,
    denoise_params: Params,
    x: jax.Array,
    key: jax.Array,
    cfg: LossConfig,
    proposal: elbo_estimators.TimeProposal | None = None,
    latent_fn: LatentFn | None = None,
) -> tuple[tuple[jax.Array, dict[str, jax.Array]], tuple[Params, Params]]:
    """Mean negative ELBO in bits/dim over a batch, its terms, and the training gradients.

    The denoiser's gradient is that of the training objective: prior + reconstruction + the
    diffusion term weighted by ``w(log-SNR)`` (:mod:`vdm_jax.weightings`; ``w = 1`` is the
    ELBO). The schedule's gradient is the ELBO's (``schedule_grad="elbo"``), or the ELBO's
    for the endpoints and that of the second moment of the weighted diffusion estimate for
    the interior (``"variance"``, paper section 5: in continuous time the interior cannot
    change the expected objective, only its estimate's variance; this is also VDM++'s
    adaptive importance distribution of the log-SNR).

    One forward and one backward pass through the denoiser; the schedule, which is cheap,
    is pulled back once or twice. Example ``i`` alone depends on ``gamma_t[i]`` and
    ``weight[i]``, and the cotangent reaching them from the mean objective is
    ``(w_i / B) dL_i``; dividing by ``w_i`` gives the ELBO's, and scaling by ``2 w_i L_i``
    (with the weight's own slope) gives that of ``mean_i (w_i L_i)^2``, exactly. (This needs
    a denoiser without cross-example coupling, e.g. no BatchNorm.)

    A per-dimension schedule (:mod:`vdm_jax.diffusion`) changes the expected ELBO through
    its interior too, unless the denoiser is exact (then the diffusion loss is a line
    integral of a gradient field, the I-MMSE relation, and depends on the endpoints only).
    Only the speed along its paths cannot: with ``"variance"`` its shared time warp
    (its kind's ``variance_params``, :data:`vdm_jax.schedules.TIME_WARP`) trains on the
    variance and every other parameter on the ELBO; with ``"elbo"`` all train on the ELBO.
    Weightings other than ``"elbo"`` are refused for it (``cfg.per_dimension``). With
    ``latent_fn`` (an input-adaptive schedule) the context ``c ~ q(c | x)`` is drawn on the
    schedule's side, its KL term joins the objective, and both the schedule and the denoiser
    are conditioned on ``c``.

    Args:
      schedule_fn: ``(schedule_params, t) -> gamma_t``, elementwise in ``t``.
      schedule_params: the schedule's parameters (may be an empty dict).
      denoise_fn: ``(denoise_params, z_t [B, ...], gamma_t [B]) -> eps_hat [B, ...]``.
      denoise_params: the denoiser's parameters.
      x: [B, ...] integer data in {0..K-1}.
      key: PRNG key for times and noise.
      cfg: loss configuration.
      proposal: continuous time only: draw the times from this q(t) (the batch's uniforms,
        antithetic or not, through its inverse CDF) and divide each diffusion weight by
        q(t), which keeps every estimate unbiased; None: uniform times.
      latent_fn: for an input-adaptive schedule, ``(schedule_params, f, key) -> (c [B, L],
        KL [B] nats)``; then ``schedule_fn`` is ``(params, t, c)`` and ``denoise_fn``
        ``(params, z_t, gamma_t, c)``, and ``terms`` has ``latent``, the KL in bits/dim.

    Returns:
      ``((loss, terms), (schedule_grads, denoise_grads))`` where ``loss`` is the mean
      negative ELBO in bits/dim and ``terms`` maps ``prior``, ``recon``, ``diffusion`` to
      per-example bits/dim, [B], and, for a weighting other than ``"elbo"``,
      ``diffusion_weighted`` to the weighted diffusion term in the same units; with a
      proposal, also ``time`` to each example's t and ``time_density`` to q(t), [B].
    """
    key_t, key_noise = jax.random.split(key)
    batch = x.shape[0]
    num_dims = math.prod(x.shape[1:])
    t = diffusion.sample_times(key_t, batch, cfg.antithetic_time)
    if proposal is not None:
        if cfg.timesteps:
            raise ValueError("a time proposal needs continuous time (timesteps = 0)")
        t, density = elbo_estimators.sample_proposal(proposal, t)

    def values_of(p: Params):
        if latent_fn is None:
            context, kl = None, None
            gamma_fn = lambda u: schedule_fn(p, u)  # noqa: E731
        else:
            f = diffusion.encode(x, cfg.vocab_size)
            context, kl = latent_fn(p, f, jax.random.fold_in(key_noise, 1))
            gamma_fn = lambda u: schedule_fn(p, u, context)  # noqa: E731
        values = diffusion.schedule_values(gamma_fn, t, cfg.timesteps)
        if proposal is not None:
            weight = values.weight / diffusion.broadcast_batch(density, values.weight)
            values = values._replace(weight=weight)
        return values, context, kl

    (values, context, kl), schedule_vjp = jax.vjp(values_of, schedule_params)
    if cfg.weighting == "elbo":  # w = 1: also every per-dimension schedule's (cfg checks it)
        w, dw_dgamma = jnp.ones(()), jnp.zeros(())
    else:
        w, dw_dgamma = weightings.weight_and_slope(
            cfg.weighting, cfg.weighting_bias, values.gamma_t
        )

    def objective_of(values: diffusion.ScheduleValues, context: jax.Array | None, p: Params):
        if context is None:
            eps_fn = lambda z, g: denoise_fn(p, z, g)  # noqa: E731
        else:
            eps_fn = lambda z, g: denoise_fn(p, z, g, context)  # noqa: E731
        nats = diffusion.elbo_terms(x, values, key_noise, eps_fn, cfg.vocab_size)
        terms = {k: diffusion.bits_per_dim(v, num_dims) for k, v in nats.items()}
        weighted = w * terms["diffusion"]
        return jnp.mean(terms["prior"] + terms["recon"] + weighted), (terms, weighted)

    _, objective_vjp, (terms, weighted) = jax.vjp(
        objective_of, values, context, denoise_params, has_aux=True
    )
    d_values, d_context, denoise_grads = objective_vjp(jnp.ones(()))
    elbo_d_values = d_values._replace(gamma_t=d_values.gamma_t / w, weight=d_values.weight / w)
    d_kl = None
    if kl is not None:  # the KL's own share of the mean objective, in bits/dim
        terms = {**terms, "latent": diffusion.bits_per_dim(kl, num_dims)}
        d_kl = jnp.full_like(kl, 1.0 / (batch * num_dims * math.log(2.0)))
    (schedule_grads,) = schedule_vjp((elbo_d_values, d_context, d_kl))
    if cfg.schedule_grad == "variance":
        scale = diffusion.broadcast_batch(2.0 * jax.lax.stop_gradient(weighted), d_values.weight)
        slope = diffusion.broadcast_batch(dw_dgamma * terms["diffusion"] / batch, scale)
        d_variance = diffusion.ScheduleValues(
            gamma_0=jnp.zeros_like(d_values.gamma_0),
            gamma_1=jnp.zeros_like(d_values.gamma_1),
            gamma_t=scale * (d_values.gamma_t + slope),
            weight=scale * d_values.weight,
        )
        d_context = None if d_context is None else jnp.zeros_like(d_context)
        d_kl = None if d_kl is None else jnp.zeros_like(d_kl)
        (variance_grads,) = schedule_vjp((d_variance, d_context, d_kl))
        schedule_grads = _merge_schedule_grads(schedule_grads, variance_grads, cfg.variance_params)
    loss = jnp.mean(sum(terms.values()))
    if cfg.weighting != "elbo":
        terms = {**terms, "diffusion_weighted": weighted}
    if proposal is not None:
        terms = {**terms, "time": t, "time_density": density}
    return (loss, terms), (schedule_grads, denoise_grads)


def vdm_loss_and_grads(
    model: VDM,
    params: Params,
    batch: dict[str, jax.Array],
    key: jax.Array,
    cfg: LossConfig,
    *,
    train: bool = True,
    proposal: elbo_estimators.TimeProposal | None = None,
) -> tuple[tuple[jax.Array, dict[str, jax.Array]], Params]:
    """:func:`loss_and_grads` for a :class:`VDM`; grads have the structure of ``params``.

    Args:
      model: the VDM module.
      params: ``{"schedule": ..., "score_net": ...}`` (``schedule`` absent for a fixed one;
        ``encoder`` too for an input-adaptive schedule).
      batch: ``{"image": int [B, ...], "label": int [B] (optional)}``.
      key: PRNG key for times, noise and dropout.
      cfg: loss configuration.
      train: enables dropout.
      proposal: training times' q(t) (see :func:`loss_and_grads`).
    """
    key_loss, key_dropout = jax.random.split(key)
    label = batch.get("label")
    adaptive = model.encoder is not None

    def schedule_fn(p: Params, t: jax.Array, context: jax.Array | None = None) -> jax.Array:
        schedule_params = p["schedule"] if adaptive else p
        return model.apply({"params": {"schedule": schedule_params}}, t, context, method=VDM.gamma)

    def latent_fn(p: Params, f: jax.Array, key_c: jax.Array) -> tuple[jax.Array, jax.Array]:
        mean, log_var = model.apply({"params": {"encoder": p["encoder"]}}, f, method=VDM.posterior)
        return latents.sample_posterior(key_c, mean, log_var), latents.gaussian_kl(mean, log_var)

    def denoise_fn(
        p: Params, z: jax.Array, gamma_t: jax.Array, context: jax.Array | None = None
    ) -> jax.Array:
        return model.apply(
            {"params": {"score_net": p}},
            z,
            gamma_t,
            label,
            context,
            train=train,
            method=VDM.eps,
            rngs={"dropout": key_dropout},
        )

    schedule_side = params.get("schedule", {})
    if adaptive:
        schedule_side = {"schedule": params["schedule"], "encoder": params["encoder"]}
    aux, (schedule_grads, net_grads) = loss_and_grads(
        schedule_fn,
        schedule_side,
        denoise_fn,
        params["score_net"],
        batch["image"],
        key_loss,
        cfg,
        proposal,
        latent_fn if adaptive else None,
    )
    grads = {"score_net": net_grads}
    if adaptive:
        grads.update(schedule_grads)
    elif "schedule" in params:
        grads["schedule"] = schedule_grads
    return aux, grads


def inference_fns(
    model: VDM,
    params: Params,
    label: jax.Array | None = None,
    context: jax.Array | None = None,
) -> tuple[schedules.GammaFn, diffusion.EpsFn]:
    """The model as the plain functions the loss, samplers and likelihoods take (no dropout).

    An input-adaptive model (one with an ``encoder``) needs its ``context`` c [B, L]: a
    draw of q(c | x) for a bound (:func:`posterior_context`), of p(c) for sampling.

    Returns:
      ``gamma_fn(t) -> gamma_t`` (elementwise, or per dimension) and ``eps_fn(z_t [B, ...],
      gamma_t) -> eps_hat [B, ...]``, conditioned on ``label`` [B] and ``context`` when given.
      For an ensemble, ``eps_fn`` is the mean of the members' eps_hat (equally, since
      eps_hat is affine in x_hat, of their x_hat): a denoiser like any other, so every bound
      and sampler applies to it as it is.
    """
    if (model.encoder is None) != (context is None):
        raise ValueError("an input-adaptive model needs a context, and only it takes one")

    def gamma_fn(t: jax.Array) -> jax.Array:
        return model.apply({"params": params}, t, context, method=VDM.gamma)

    def member_eps(p: Params, z: jax.Array, gamma_t: jax.Array) -> jax.Array:
        return model.apply({"params": p}, z, gamma_t, label, context, train=False, method=VDM.eps)

    def eps_fn(z: jax.Array, gamma_t: jax.Array) -> jax.Array:
        if model.ensemble_size == 1:
            return member_eps(params, z, gamma_t)
        # A loop, not a vmap: a vmap over the members' weights makes each convolution a
        # grouped one, several times slower on CPU.
        members = range(model.ensemble_size)
        return sum(member_eps(member_params(params, m), z, gamma_t) for m in members) / len(members)

    return gamma_fn, eps_fn


def posterior_context(
    model: VDM, params: Params, x: jax.Array, vocab_size: int, key: jax.Array
) -> tuple[jax.Array | None, jax.Array]:
    """``c ~ q(c | x)`` [B, L] and ``KL(q(c | x) || p(c))`` [B] in nats for integer data x.

    (None, zeros) for a model without an auxiliary latent, whose bound has no such term.
    """
    if model.encoder is None:
        return None, jnp.zeros(x.shape[:1], jnp.float32)
    f = diffusion.encode(x, vocab_size)
    mean, log_var = model.apply({"params": params}, f, method=VDM.posterior)
    return latents.sample_posterior(key, mean, log_var), latents.gaussian_kl(mean, log_var)


def vdm_terms(
    model: VDM,
    params: Params,
    batch: dict[str, jax.Array],
    key: jax.Array,
    cfg: LossConfig,
) -> dict[str, jax.Array]:
    """Per-example negative-ELBO terms in bits/dim for evaluation (no dropout), each [B].

    An input-adaptive model adds ``latent``, the KL of its auxiliary latent.
    """
    x = batch["image"]
    label = batch.get("label")
    num_dims = math.prod(x.shape[1:])
    context = None
    if model.encoder is not None:
        key, key_c = jax.random.split(key)
        context, kl = posterior_context(model, params, x, cfg.vocab_size, key_c)
    gamma_fn, eps_fn = inference_fns(model, params, label, context)
    nats = diffusion.vdm_terms(
        x,
        key,
        gamma_fn,
        eps_fn,
        vocab_size=cfg.vocab_size,
        timesteps=cfg.timesteps,
        antithetic_time=cfg.antithetic_time,
    )
    if context is not None:
        nats = {**nats, "latent": kl}
    return {k: diffusion.bits_per_dim(v, num_dims) for k, v in nats.items()}
