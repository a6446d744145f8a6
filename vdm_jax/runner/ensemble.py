"""Ensembles: M score networks trained independently under one schedule, averaged to denoise.

A model with ``model.ensemble_size`` M > 1 stores M score networks stacked on a leading axis
(:func:`vdm_jax.model.init_params`, each member from its own key). Each member trains on its
own negative ELBO, exactly as a one-network model would: its own times, noise and dropout
(the step's key folded with the member's index), the same batch. Its gradient is its own
loss's, so Adam, weight decay and the EMA (all per parameter) keep the members independent.
The schedule they share trains on the mean of their losses. Evaluation and sampling use the
mean of the members' eps_hat (:func:`vdm_jax.model.inference_fns`): any denoiser defines a
valid bound, and by convexity of the squared error the mean's diffusion loss is at most the
mean of the members' at the same times and noise, so averaging never loosens the bound; how
much it gains depends on how independent the members' errors are.

On a mesh whose ``"data"`` axis D divides M (and exceeds 1), each device trains M / D of the
members on the whole batch (:func:`jax.shard_map` over ``"data"``) and keeps their part of
the train state (:func:`vdm_jax.runner.state.state_shardings`). Otherwise every device computes
every member on its part of the batch, as one network would be computed, with the state
replicated. Both give the same gradients. On two CPU devices, the digits step of two split
members runs at 0.68 of a plain conv stack's FLOP rate, as one network's (0.67): the
ensemble costs its FLOPs (the benchmark: 147 ms against 63 ms per step at batch 64); both
members computed on each device's half of the batch took 158 ms against 123 ms split, in
one measurement of the loss and gradients alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from vdm_jax import elbo_estimators, model
from vdm_jax.runner import sharding

Params = model.Params


def member_parallel(mesh: Mesh | None, ensemble_size: int) -> bool:
    """Whether the members are split over ``mesh``'s ``"data"`` axis (it divides M and is > 1)."""
    if mesh is None or ensemble_size == 1:
        return False
    devices = mesh.shape[sharding.DATA_AXIS]
    return devices > 1 and ensemble_size % devices == 0


def loss_and_grads(
    vdm: model.VDM,
    params: Params,
    batch: dict[str, jax.Array],
    key: jax.Array,
    cfg: model.LossConfig,
    *,
    proposal: elbo_estimators.TimeProposal | None = None,
    mesh: Mesh | None = None,
) -> tuple[tuple[jax.Array, dict[str, jax.Array]], Params]:
    """:func:`vdm_jax.model.vdm_loss_and_grads` for a model of one network or of an ensemble.

    Args:
      vdm: the model; ``vdm.ensemble_size`` M.
      params: its parameters (:func:`vdm_jax.model.init_params`).
      batch: ``{"image": int [B, ...], "label": int [B] (optional)}``, every member's batch.
      key: PRNG key; member m draws from ``fold_in(key, m)``.
      cfg: loss configuration.
      proposal: training times' q(t), shared by the members.
      mesh: the mesh the step runs on, to split the members over its ``"data"`` axis
        (:func:`member_parallel`); None computes them one after another.

    Returns:
      ``((loss, terms), grads)``. With M = 1, those of ``vdm_loss_and_grads``. With M > 1:
      ``loss`` is the mean of the members' losses; each term is per member and example,
      [M * B] (member-major); ``grads["score_net"]`` stacks each member's gradient of its
      own loss, and the shared parameters' gradients are the mean of the members'.
    """
    members = vdm.ensemble_size
    if members == 1:
        return model.vdm_loss_and_grads(vdm, params, batch, key, cfg, proposal=proposal)
    shared = {k: v for k, v in params.items() if k != "score_net"}

    def local(nets, indices, shared, batch, key, proposal):
        """The members whose networks are ``nets`` (stacked) and indices ``indices``."""
        outputs = []
        for j in range(indices.shape[0]):
            outputs.append(
                model.vdm_loss_and_grads(
                    vdm,
                    model.member_params({**shared, "score_net": nets}, j),
                    batch,
                    jax.random.fold_in(key, indices[j]),
                    cfg,
                    proposal=proposal,
                )
            )
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)

    if member_parallel(mesh, members):
        # Gradients are taken inside, per device, so nothing here is differentiated through
        # the map, and its replication checks are not needed.
        local = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(sharding.DATA_AXIS), P(sharding.DATA_AXIS), P(), P(), P(), P()),
            out_specs=P(sharding.DATA_AXIS),
            check_vma=False,
        )
    (losses, terms), grads = local(
        params["score_net"], jnp.arange(members), shared, batch, key, proposal
    )
    grads = {
        k: g if k == "score_net" else jax.tree.map(lambda x: jnp.mean(x, axis=0), g)
        for k, g in grads.items()
    }
    terms = {k: v.reshape(-1) for k, v in terms.items()}
    return (jnp.mean(losses), terms), grads
