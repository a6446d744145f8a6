"""The sharded train state (FSDP): its layout rule, and that it changes where the state lives,
never what training computes. Eight simulated CPU devices (``conftest.py``)."""

from __future__ import annotations

import subprocess

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from runner_helpers import (
    REPO,
    assert_trees_close,
    flag_overrides,
    main_command,
    restore,
    subprocess_env,
    tiny_config,
)

from configs import cifar10
from vdm_jax.runner import data, evaluate, experiment, sampling, sharding, state, train

CIFAR10 = data.DatasetInfo("cifar10", (32, 32, 3), 256, 10, 50000, 10000)
# Evaluation and sampling only where a test looks at them (each costs a compilation).
NO_EVAL = {"training.eval_every": 10**6, "training.sample_every": 10**6}


@pytest.mark.parametrize(
    "shape, num_bytes, fsdp, min_bytes, expected",
    [
        ((3, 3, 16, 32), 10**6, 8, 0, P(None, None, None, "fsdp")),  # The largest dimension.
        ((3, 3, 16, 16), 10**6, 8, 0, P(None, None, None, "fsdp")),  # Ties: the last one.
        ((3, 3, 24, 20), 10**6, 8, 0, P(None, None, "fsdp", None)),  # 8 does not divide 20.
        ((1024, 6), 10**6, 4, 0, P("fsdp", None)),
        ((5, 7), 10**6, 8, 0, P()),  # No dimension divides.
        ((), 4, 8, 0, P()),  # Scalars.
        ((64, 64), 100, 8, 1 << 16, P()),  # Too small to be worth a gather.
        ((64, 64), 1 << 16, 8, 1 << 16, P(None, "fsdp")),  # At the threshold: split.
        ((64, 64), 10**6, 1, 0, P()),  # fsdp=1: data parallelism, replicated.
    ],
)
def test_fsdp_spec_splits_one_divisible_dimension(shape, num_bytes, fsdp, min_bytes, expected):
    assert sharding.fsdp_spec(shape, num_bytes, fsdp, min_bytes) == expected


def test_mesh_layout_and_bad_shard_counts():
    devices = jax.devices()
    mesh = sharding.make_mesh(devices, fsdp=4)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    # Row by row: the batch's rows follow the devices' (process, id) order.
    assert [d.id for d in mesh.devices.reshape(-1)] == sorted(d.id for d in devices)
    assert dict(sharding.make_mesh(devices, fsdp=-1).shape) == {"data": 1, "fsdp": 8}
    assert dict(sharding.make_mesh(devices).shape) == {"data": 8, "fsdp": 1}
    with pytest.raises(ValueError, match="fsdp=3 does not divide the 8 devices"):
        sharding.make_mesh(devices, fsdp=3)


def _cifar10_state(fsdp: int) -> state.TrainState:
    config = cifar10.get_config()
    config.sharding.fsdp = fsdp
    return state.abstract_train_state(experiment.build(config, info=CIFAR10))


def test_paper_cifar10_state_per_device_falls_by_the_shard_count():
    replicated, sharded = _cifar10_state(1), _cifar10_state(8)
    total = state.num_bytes(replicated)
    assert sharding.bytes_per_device(replicated) == total  # Every device holds it all.
    per_device = sharding.bytes_per_device(sharded)
    # Only arrays under sharding.min_shard_bytes (norms, biases, the schedule) stay whole.
    assert total / 8 < per_device < 1.02 * total / 8, per_device / total

    # Parameters, EMA and Adam's moments are split alike, so updates need no communication.
    adam = sharded.opt_state[0]
    specs = [jax.tree.map(lambda x: x.sharding.spec, t) for t in (adam.mu, adam.nu)]
    params_specs = jax.tree.map(lambda x: x.sharding.spec, sharded.params)
    assert specs[0] == specs[1] == params_specs
    assert jax.tree.map(lambda x: x.sharding.spec, sharded.ema_params) == params_specs
    kernel = sharded.params["score_net"]["down_0"]["conv_0"]["kernel"]
    assert kernel.shape == (3, 3, 128, 128) and kernel.sharding.spec == P(None, None, None, "fsdp")
    assert sharded.step.sharding.spec == P() and sharded.rng.sharding.spec == P()


def _layout_run(fsdp: int, batches: list[data.Batch], outputs: bool) -> tuple:
    """Three steps on a mesh of 8 devices with ``sharding.fsdp=fsdp`` (every array it can
    split, split), then (``outputs``) a whole-split evaluation and samples."""
    config = tiny_config(**{"sharding.fsdp": fsdp, "sharding.min_shard_bytes": 0})
    exp = experiment.build(config)
    train_state = state.create_train_state(exp)
    total = state.num_bytes(train_state)
    # All but the few arrays no fsdp divides (scalars, the [2] key, ...) are split.
    assert sharding.bytes_per_device(train_state) < 1.02 * total / fsdp
    kernel = train_state.params["score_net"]["conv_in"]["kernel"]
    assert kernel.sharding.shard_shape(kernel.shape) == (3, 3, 7, 16 // fsdp)
    step_fn = train.make_train_step(exp)
    history = []
    for batch in batches:
        train_state, metrics = step_fn(train_state, train.train_inputs(exp, batch))
        history.append(jax.device_get(metrics))
    assert sharding.bytes_per_device(train_state) < 1.02 * total / fsdp  # Stays sharded.
    if not outputs:
        return jax.device_get(train_state), history
    values = evaluate.Evaluator(exp)(train_state.ema_params).values
    samples = sampling.draw(exp, train_state.ema_params, sampling.make_sample_fn(exp))
    return jax.device_get(train_state), history, values, samples


def _assert_same_run(sharded: tuple, replicated: tuple) -> None:
    for m1, m in zip(replicated[1], sharded[1], strict=True):
        for k in m1:  # atol: bpd_recon is ~1e-6 here, the tail of a log-softmax.
            np.testing.assert_allclose(m[k], m1[k], rtol=1e-5, atol=1e-5, err_msg=k)
    # Adam divides by the root of tiny second moments, which amplifies reduction noise.
    assert_trees_close(sharded[0], replicated[0], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def batches() -> list[data.Batch]:
    iterator = data.train_iterator("digits", global_batch_size=16, seed=0, prefetch=0)
    return [next(iterator) for _ in range(3)]


@pytest.mark.slow
def test_sharded_state_takes_the_same_steps_as_replicated(batches):
    """A 2x4 mesh (batch over all 8 devices, the state split in 4): each device holds a
    quarter of the state, and the steps are those of the replicated 8x1 layout."""
    _assert_same_run(_layout_run(4, batches, False), _layout_run(1, batches, False))


@pytest.mark.slow
def test_fully_sharded_state_trains_evaluates_and_samples_as_replicated(batches):
    """1x8 (the state split over every device) against 8x1: steps, evaluation, samples."""
    sharded, replicated = _layout_run(8, batches, True), _layout_run(1, batches, True)
    _assert_same_run(sharded, replicated)
    assert sharded[2].keys() == replicated[2].keys()
    for k, v in replicated[2].items():
        assert sharded[2][k] == pytest.approx(v, rel=1e-5), k
    # Integer samples: at most a pixel or two may round the other way.
    assert np.mean(sharded[3] != replicated[3]) < 0.01


def _train(workdir: str, num_devices: int, **overrides: object) -> subprocess.Popen:
    """``--mode=train`` of the tiny config in a child with ``num_devices`` CPU devices."""
    flags = flag_overrides(**{**NO_EVAL, "sharding.min_shard_bytes": 0, **overrides})
    return subprocess.Popen(
        main_command(workdir, *flags),
        cwd=REPO,
        env=subprocess_env(num_devices=num_devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(*processes: subprocess.Popen) -> list[str]:
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    for p, out in zip(processes, outputs, strict=True):
        assert p.returncode == 0, out
    return outputs


@pytest.mark.slow
def test_resume_onto_a_different_mesh_continues_the_same_run(tmp_path):
    """Steps 1-2 with the state split over 8 devices, 3-4 on a 2x2 mesh of 4 devices: the
    state of a straight replicated run on one device (the checkpoint restores onto any
    layout and device count)."""
    moved, straight = str(tmp_path / "moved"), str(tmp_path / "straight")
    _finish(
        _train(moved, 8, **{"training.num_steps": 2, "sharding.fsdp": 8}),
        _train(straight, 1),
    )
    (resumed,) = _finish(_train(moved, 4, **{"sharding.fsdp": 2}))
    assert "Starting at step 2 of 4" in resumed
    assert "on mesh {'data': 2, 'fsdp': 2}" in resumed
    config = tiny_config()
    # restore() lays each checkpoint out on one device; they were written from 4 and 1.
    assert_trees_close(restore(config, moved), restore(config, straight), rtol=1e-4, atol=1e-5)
