"""Ensembles (model.ensemble_size): independent members, their own losses, one mean denoiser."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from runner_helpers import eval_run, sample_run, tiny_config, train_run
from test_model import assert_grads_close

from vdm_jax import elbo_estimators, model
from vdm_jax.runner import data, ensemble, experiment, sharding, state, train

# An input-adaptive schedule (MuLAN): the members share its encoder as well.
ADAPTIVE = {"model.schedule": "per_dim_polynomial", "model.latent_dim": 4}


def _experiment(members: int, devices: int = 1, **overrides) -> experiment.Experiment:
    config = tiny_config(**{"model.ensemble_size": members, **overrides})
    return experiment.build(config, jax.devices()[:devices])


def _batch(exp: experiment.Experiment, size: int = 16) -> dict[str, jax.Array]:
    batch = next(data.train_iterator("digits", global_batch_size=size, seed=0, prefetch=0))
    return {"image": jnp.asarray(batch["image"])}


def _init(exp: experiment.Experiment, seed: int = 0) -> model.Params:
    return model.init_params(exp.vdm, jax.random.key(seed), *state.dummy_inputs(exp))


def test_members_are_independent_initialisations_under_one_schedule():
    """Member m's network is exactly the one-network model's initialised from the m-th split
    key; the schedule, which all members share, is member 0's."""
    ens, single = _experiment(3), _experiment(1)
    params = _init(ens)
    keys = jax.random.split(jax.random.key(0), 3)
    for m, key in enumerate(keys):
        alone = model.init_params(single.vdm, key, *state.dummy_inputs(single))
        member = model.member_params(params, m)
        jax.tree.map(np.testing.assert_array_equal, member["score_net"], alone["score_net"])
        if m == 0:
            jax.tree.map(np.testing.assert_array_equal, member, alone)
    kernels = params["score_net"]["conv_in"]["kernel"]
    assert kernels.shape[0] == 3
    assert not np.allclose(kernels[0], kernels[1]) and not np.allclose(kernels[1], kernels[2])


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides", [{}, pytest.param(ADAPTIVE, marks=pytest.mark.slow)], ids=["scalar", "adaptive"]
)
def test_each_member_trains_on_its_own_loss(overrides):
    """The ensemble's loss and gradients are those of its members computed alone: member m
    with key fold_in(key, m), its gradient kept apart, the shared schedule's (and an
    input-adaptive schedule's encoder's) averaged."""
    ens, single = _experiment(2, **overrides), _experiment(1, **overrides)
    params, batch, key = _init(ens), _batch(ens), jax.random.key(3)
    proposal = elbo_estimators.proposal_from_moments(
        jnp.linspace(0.5, 2.0, state.TIME_BINS)
    )  # a non-uniform q(t), as adaptive times give
    (loss, terms), grads = ensemble.loss_and_grads(
        ens.vdm, params, batch, key, ens.loss, proposal=proposal
    )
    alone = [
        model.vdm_loss_and_grads(
            single.vdm,
            model.member_params(params, m),
            batch,
            jax.random.fold_in(key, m),
            single.loss,
            proposal=proposal,
        )
        for m in range(2)
    ]
    np.testing.assert_allclose(loss, np.mean([a[0][0] for a in alone]), rtol=1e-6)
    for name, values in terms.items():
        assert values.shape == (2 * 16,), name
        np.testing.assert_allclose(values, np.concatenate([a[0][1][name] for a in alone]))
    for m in range(2):
        member_grads = jax.tree.map(lambda g, m=m: g[m], grads["score_net"])
        assert_grads_close(member_grads, alone[m][1]["score_net"])
    shared = sorted(k for k in grads if k != "score_net")
    assert shared == (["encoder", "schedule"] if overrides else ["schedule"])
    for name in shared:
        mean = jax.tree.map(lambda *g: np.mean(g, axis=0), *(a[1][name] for a in alone))
        assert_grads_close(grads[name], mean)
    # The members' losses differ (their own networks, times and noise): not one loss twice.
    assert abs(float(alone[0][0][0] - alone[1][0][0])) > 1e-4


@pytest.mark.slow  # The fast tier steps split members in the train-step test below.
@pytest.mark.parametrize("members", [2, 4])
def test_members_split_over_devices_match_the_loop(members):
    """On a 2-device mesh each device trains its own members on the whole batch
    (shard_map); the gradients are those of computing every member everywhere."""
    exp = _experiment(members, devices=2)
    assert ensemble.member_parallel(exp.mesh, members)
    assert not ensemble.member_parallel(_experiment(2, devices=8).mesh, 2)
    params, batch, key = _init(exp), _batch(exp), jax.random.key(5)

    def run(mesh):
        fn = jax.jit(lambda p, b, k: ensemble.loss_and_grads(exp.vdm, p, b, k, exp.loss, mesh=mesh))
        return jax.device_get(fn(params, batch, key))

    (loss_split, terms_split), grads_split = run(exp.mesh)
    (loss_loop, terms_loop), grads_loop = run(None)
    np.testing.assert_allclose(loss_split, loss_loop, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 terms_split, terms_loop)  # fmt: skip
    assert_grads_close(grads_split, grads_loop)


@pytest.mark.slow
def test_the_mean_denoiser_never_loosens_the_bound():
    """At the same times and noise, the mean of the members' eps_hat has a diffusion loss of
    at most the mean of theirs, example by example (the squared error is convex); the prior
    and reconstruction terms do not involve the denoiser. Identical members reduce the
    ensemble to the one network, exactly."""
    ens, single = _experiment(2), _experiment(1)
    params, batch, key = _init(ens), _batch(ens, 64), jax.random.key(7)
    # Initialised, every member is the same function (the output layer starts at zero):
    # perturb each member's weights on its own.
    leaves, tree = jax.tree.flatten(params["score_net"])
    noise_keys = jax.random.split(jax.random.key(8), len(leaves))
    noisy = [
        x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, noise_keys, strict=True)
    ]
    params = {**params, "score_net": jax.tree.unflatten(tree, noisy)}
    together = model.vdm_terms(ens.vdm, params, batch, key, ens.loss)
    alone = [
        model.vdm_terms(single.vdm, model.member_params(params, m), batch, key, single.loss)
        for m in range(2)
    ]
    mean_alone = jax.tree.map(lambda a, b: (a + b) / 2, *alone)
    for name in ("prior", "recon"):
        np.testing.assert_allclose(together[name], mean_alone[name], rtol=1e-6, atol=1e-9)
    gap = np.asarray(mean_alone["diffusion"] - together["diffusion"])
    assert np.all(gap >= -1e-5 * np.asarray(mean_alone["diffusion"]))
    assert gap.mean() > 1e-3 * float(np.mean(mean_alone["diffusion"]))  # members differ

    twins = {**params, "score_net": jax.tree.map(
        lambda x: jnp.stack([x[0], x[0]]), params["score_net"])}  # fmt: skip
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9),
        model.vdm_terms(ens.vdm, twins, batch, key, ens.loss),
        alone[0],
    )


@pytest.mark.slow
def test_an_ensemble_trains_evaluates_and_samples(tmp_path):
    """The runner end to end with two members, one on each of two devices: the state keeps
    both members, training updates both, and evaluation and sampling use their mean."""
    workdir = str(tmp_path)
    config = tiny_config(**{"model.ensemble_size": 2, "training.eval_every": 10**6})
    devices = jax.devices()[:2]
    exp = experiment.build(config, devices)
    start = state.create_train_state(exp)
    final = train_run(config, workdir, devices)
    assert int(final.step) == 4
    moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).reshape(2, -1).max(1),
                         final.params["score_net"], start.params["score_net"])  # fmt: skip
    assert all(np.all(v > 0) for v in jax.tree.leaves(moved))  # both members trained
    results = eval_run(config, workdir, devices)
    assert results["num_examples"] == 297 and np.isfinite(results["bpd"])
    samples = sample_run(config, workdir)
    assert samples.shape == (16, 8, 8, 1) and 0 <= samples.min() and samples.max() < 17
    # The train step's metrics are the members' mean loss, its state both members'.
    step = train.make_train_step(exp)
    _, metrics = step(final, train.train_inputs(exp, next(data.train_iterator(
        "digits", global_batch_size=16, seed=1, prefetch=0))))  # fmt: skip
    assert bool(metrics["finite"]) and np.isfinite(float(metrics["bpd"]))


@pytest.mark.slow
def test_split_members_keep_their_own_state_and_step_as_on_one_device():
    """With the members split over two devices, each keeps its members' networks, EMA and
    Adam moments (half the state per device), and a train step there equals the step on one
    device: the same loss, and the same first moments (the gradients, scaled)."""
    one, two = _experiment(2, devices=1), _experiment(2, devices=2)
    layout = state.state_shardings(two)
    for tree in (layout.params, layout.ema_params, layout.opt_state):
        for path, leaf_sharding in jax.tree_util.tree_leaves_with_path(tree):
            in_a_network = any(getattr(k, "key", None) == "score_net" for k in path)
            expected = PartitionSpec("data") if in_a_network else PartitionSpec()
            assert leaf_sharding.spec == expected, path
    per_device = sharding.bytes_per_device(state.abstract_train_state(two))
    assert per_device < 0.6 * state.num_bytes(state.abstract_train_state(one))

    raw = next(data.train_iterator("digits", global_batch_size=16, seed=0, prefetch=0))
    stepped = []
    for exp in (one, two):
        new_state, metrics = train.make_train_step(exp)(
            state.create_train_state(exp), train.train_inputs(exp, raw)
        )
        stepped.append(jax.device_get((new_state, metrics)))
    (state_one, metrics_one), (state_two, metrics_two) = stepped
    np.testing.assert_allclose(metrics_two["bpd"], metrics_one["bpd"], rtol=1e-6)
    assert_grads_close(state_two.opt_state, state_one.opt_state)
    assert_grads_close(state_two.time_moments, state_one.time_moments)
