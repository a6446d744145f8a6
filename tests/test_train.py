"""End-to-end tests of the runner: train, resume, evaluate, sample; devices; errors."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
import tfds_tiny
from runner_helpers import (
    REPO,
    assert_trees_close,
    eval_record,
    eval_run,
    flag_overrides,
    latest_step,
    main_command,
    read_events,
    restore,
    sample_run,
    subprocess_env,
    tiny_config,
    train_run,
)

from vdm_jax.runner import (
    checkpoint,
    conditioning,
    data,
    evaluate,
    experiment,
    outputs,
    sharding,
    state,
    train,
)

# Evaluation and sampling only where a test looks at them (each costs a compilation).
NO_EVAL = {"training.eval_every": 10**6, "training.sample_every": 10**6}


@pytest.mark.slow
def test_train_resume_evaluate_sample(tmp_path):
    workdir = str(tmp_path)
    config = tiny_config()  # 4 steps, checkpoints every 2, eval and samples at step 4.
    first = train_run(config, workdir)
    assert int(first.step) == 4
    assert latest_step(workdir) == 4
    events = read_events(workdir)
    for name in train.LOGGED_METRICS:
        assert events[f"train/{name}"] == [2, 4], name
    assert not any(tag.startswith("eval/") for tag in events)  # In the protocol's own run.
    during_training = eval_record(workdir, 4)
    eval_events = read_events(workdir, os.path.join("eval", during_training["protocol_id"]))
    for name in ("bpd", "bpd_stderr", "bpd_prior", "bpd_recon", "bpd_diff"):
        assert eval_events[f"eval/{name}"] == [4], name
    assert eval_events["eval/protocol/text_summary"] == [4]  # tensorboardX's text tag.
    assert events["samples"] == [4]
    assert events["samples/frechet_distance"] == [4]
    assert during_training["num_examples"] == 297  # The whole split, padding masked out.

    # Resume: a longer run continues from step 4 instead of starting over.
    config.training.num_steps = 6
    config.training.eval_every = 3
    resumed = train_run(config, workdir)
    assert int(resumed.step) == 6
    assert latest_step(workdir) == 6
    assert eval_record(workdir, 6) is not None  # 6 % 3 == 0.
    assert eval_record(workdir, 3) is None  # Not re-run.

    # --mode=eval reproduces the number the training run wrote for the same step and seed.
    results = eval_run(config, workdir)
    assert results == eval_record(workdir, 6)  # The same protocol: its own record, replaced.
    assert results["step"] == 6 and results["num_examples"] == 297
    for name in ("bpd", "bpd_prior", "bpd_recon", "bpd_diff"):
        assert np.isfinite(results[name]) and results[f"{name}_stderr"] >= 0
    assert results["bpd_stderr"] > 0
    terms = results["bpd_prior"] + results["bpd_recon"] + results["bpd_diff"]
    assert results["bpd"] == pytest.approx(terms, rel=1e-5)

    # --mode=sample: a PNG grid and the integers.
    samples = sample_run(config, workdir)
    assert samples.shape == (16, 8, 8, 1) and samples.dtype == np.int32
    assert samples.min() >= 0 and samples.max() < 17
    assert os.path.getsize(os.path.join(workdir, "samples", "step_6.png")) > 0
    saved = np.load(os.path.join(workdir, "samples", "step_6.npz"))["samples"]
    np.testing.assert_array_equal(saved, samples)
    during = np.load(os.path.join(workdir, "samples", "step_4.npz"))["samples"]
    assert during.shape == samples.shape


def test_adaptive_time_tracks_the_integrand_in_the_train_state():
    """model.adaptive_time: the state carries per-bin second moments from the first step on,
    updated where the batch's times fell (and only there)."""
    config = tiny_config(**{"model.adaptive_time": True})
    exp = experiment.build(config, jax.devices()[:1])
    train_state = state.create_train_state(exp)
    np.testing.assert_array_equal(train_state.time_moments, np.ones(state.TIME_BINS))
    step_fn = train.make_train_step(exp)
    batch = next(data.train_iterator("digits", global_batch_size=16, seed=0, prefetch=0))
    new_state, metrics = step_fn(train_state, train.train_inputs(exp, batch))
    moments = np.asarray(new_state.time_moments)
    assert bool(metrics["finite"]) and np.all(np.isfinite(moments)) and np.all(moments > 0)
    changed = moments != 1.0
    assert 0 < changed.sum() <= 16  # one bin per example at most
    uniform = tiny_config(**{"model.adaptive_time": False})  # uniform times: no state field
    assert state.create_train_state(experiment.build(uniform)).time_moments is None


@pytest.mark.slow
def test_eight_devices_match_one_device():
    config = tiny_config(**{"eval.num_time_samples": 2})
    batches = data.train_iterator("digits", global_batch_size=16, seed=0, prefetch=0)
    batches = [next(batches) for _ in range(3)]
    runs = {}
    for n in (1, 8):
        exp = experiment.build(config, jax.devices()[:n])
        train_state = state.create_train_state(exp)
        eval_before = evaluate.Evaluator(exp)(train_state.ema_params).record(step=0)
        step_fn = train.make_train_step(exp)
        history = []
        for batch in batches:
            train_state, metrics = step_fn(train_state, train.train_inputs(exp, batch))
            history.append(jax.device_get(metrics))
        assert step_fn._cache_size() == 1  # One compilation for every step.
        runs[n] = (jax.device_get(train_state), history, eval_before)
    (state_1, history_1, eval_1), (state_8, history_8, eval_8) = runs[1], runs[8]
    for m1, m8 in zip(history_1, history_8, strict=True):
        assert m1.keys() == m8.keys()
        for k in m1:
            # atol: bpd_recon is ~1e-6 here, the tail of a log-softmax.
            np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-5, err_msg=k)
    # Adam divides by the root of tiny second moments, which amplifies reduction-order noise.
    assert_trees_close(state_8, state_1, rtol=1e-4, atol=1e-5)
    # Evaluation: the same numbers on 1 and 8 devices (and deterministic for the seed).
    assert eval_1.keys() == eval_8.keys()
    for k, v in eval_1.items():
        if isinstance(v, str | dict):  # Names and the protocol: the same on any mesh.
            assert eval_8[k] == v, k
        elif k != "seconds":  # wall time of the evaluation
            assert eval_8[k] == pytest.approx(v, rel=1e-5), k


@pytest.mark.slow
def test_sigterm_saves_and_resume_matches_uninterrupted_run(tmp_path):
    preempted, straight = str(tmp_path / "preempted"), str(tmp_path / "straight")
    overrides = {**NO_EVAL, "training.num_steps": 1000, "training.log_every": 1}
    process = subprocess.Popen(
        main_command(preempted, *flag_overrides(**overrides)),
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not os.path.isdir(os.path.join(preempted, "checkpoints", "2")):
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "no checkpoint within the deadline"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert "Preempted at step" in stderr
    stopped_at = latest_step(preempted)
    assert 2 <= stopped_at < 1000

    # Resume to a few steps later; compare with a run that was never interrupted.
    final = {**NO_EVAL, "training.num_steps": stopped_at + 3}
    resumed = train_run(tiny_config(**final), preempted)
    uninterrupted = train_run(tiny_config(**final), straight)
    assert int(resumed.step) == int(uninterrupted.step) == stopped_at + 3
    assert_trees_close(jax.device_get(resumed), jax.device_get(uninterrupted), rtol=1e-6)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    workdir = str(tmp_path)
    config = tiny_config(**NO_EVAL, **{"training.num_steps": 2})
    good = jax.device_get(train_run(config, workdir))
    assert latest_step(workdir) == 2

    # Resume from diverged parameters (NaN): every loss is NaN from then on.
    restore_latest = checkpoint.restore_latest

    def diverged(workdir, abstract, **kwargs):
        restored = restore_latest(workdir, abstract, **kwargs)
        return restored.replace(params=jax.tree.map(lambda x: x * np.nan, restored.params))

    monkeypatch.setattr(checkpoint, "restore_latest", diverged)
    config.training.num_steps = 6
    with pytest.raises(FloatingPointError, match=r"non-finite .* training step 3 .*step 2 in"):
        train_run(config, workdir)
    monkeypatch.undo()
    assert latest_step(workdir) == 2
    assert_trees_close(restore(config, workdir), good, rtol=0, atol=0)


@pytest.mark.slow
def test_tfds_path_trains_evaluates_and_samples_from_real_files(tmp_path, monkeypatch):
    """The runner on a TFDS dataset built into real ArrayRecord files (tests/tfds_tiny.py):
    the whole eval split once, the last batch padded, and samples of its shape."""
    data_dir = str(tmp_path / "tfds")
    tfds_tiny.build(data_dir)
    tfds_tiny.register(monkeypatch)
    workdir = str(tmp_path / "run")
    config = tiny_config(
        **{
            "data.name": tfds_tiny.NAME,
            "data.data_dir": data_dir,
            "training.num_steps": 2,
            "training.eval_every": 2,
            "training.sample_every": 2,
            "eval.batch_size": 8,
            "sample.num_samples": 8,
            "sample.batch_size": 8,
            "sample.num_steps": 2,
        }
    )
    final = train_run(config, workdir)
    assert int(final.step) == 2
    results = eval_record(workdir, 2)
    assert results["num_examples"] == tfds_tiny.NUM_TEST  # Two batches of 8, one padded.
    assert results["protocol"]["dataset"]["version"] == f"tfds {tfds_tiny.TFDS_NAME}:1.0.0"
    assert np.isfinite(results["bpd"])
    samples = np.load(os.path.join(workdir, "samples", "step_2.npz"))["samples"]
    assert samples.shape == (8, 8, 8, 1) and samples.max() < 17
    assert os.path.exists(os.path.join(workdir, "samples", "step_2.png"))


def test_bad_data_is_a_clear_error(tmp_path, monkeypatch):
    """Files whose images do not have the registered shape stop the run with the field named,
    before any checkpoint."""
    data_dir = str(tmp_path / "tfds")
    tfds_tiny.build(data_dir)
    tfds_tiny.register(monkeypatch, shape=(32, 32, 3))
    config = tiny_config(**NO_EVAL, **{"data.name": tfds_tiny.NAME, "data.data_dir": data_dir})
    with pytest.raises(ValueError, match=r"'tiny_tfds'.*'image'.*shape \(32, 32, 3\)"):
        train_run(config, str(tmp_path / "run"))
    assert latest_step(str(tmp_path / "run")) is None


def test_learning_rate_warms_up_linearly():
    spec = experiment.build(tiny_config(**{"optimizer.warmup_steps": 4})).optimizer
    schedule = state.learning_rate_schedule(spec)
    lr = tiny_config().optimizer.learning_rate
    np.testing.assert_allclose(
        [float(schedule(s)) for s in range(6)], [lr / 4, lr / 2, 3 * lr / 4, lr, lr, lr]
    )


def test_learning_rate_decays_along_a_cosine_to_zero():
    spec = experiment.build(
        tiny_config(**{"optimizer.warmup_steps": 2, "optimizer.decay_steps": 8})
    ).optimizer
    schedule = state.learning_rate_schedule(spec)
    lr = tiny_config().optimizer.learning_rate
    warm = [0.5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    cosine = [(1 + math.cos(math.pi * min(s, 8) / 8)) / 2 for s in range(11)]
    expected = [lr * w * c for w, c in zip(warm, cosine, strict=True)]
    np.testing.assert_allclose([float(schedule(s)) for s in range(11)], expected, atol=1e-9)
    assert float(schedule(4)) == pytest.approx(lr / 2) and float(schedule(10)) == 0.0


def test_model_batch_follows_the_conditioning():
    batch = {"image": np.ones((2, 8, 8, 1), np.int32), "label": np.array([3, 5], np.int32)}
    conditionings = conditioning.CONDITIONINGS
    assert conditionings["none"].model_batch(batch, train=True).keys() == {"image"}
    np.testing.assert_array_equal(
        conditionings["label"].model_batch(batch, train=False)["label"], [3, 5]
    )
    aug = conditionings["augmentation"].model_batch(batch, train=False)["label"]
    np.testing.assert_array_equal(aug, [0, 0])  # Evaluate on unaugmented images.
    np.testing.assert_array_equal(
        conditionings["augmentation"].model_batch(batch, train=True)["label"], [3, 5]
    )
    # The evaluated bound's cost of the label, -log P(label): the class under a uniform prior;
    # none for the augmentation identity.
    digits = data.get_info("digits")
    assert conditionings["label"].label_nats(digits) == pytest.approx(math.log(10))
    assert conditionings["none"].label_nats(digits) == 0.0
    assert conditionings["augmentation"].label_nats(digits) == 0.0


def test_image_grid_scales_values_and_upscales_with_visible_gaps():
    samples = np.zeros((5, 8, 8, 1), np.int32)
    samples[0] = 16
    grid = outputs.image_grid(samples, vocab_size=17, gap=2)
    # 2 rows x 3 columns of 64-pixel images (8 x 8) with 2 grey pixels around each.
    assert grid.shape == (2 * 66 + 2, 3 * 66 + 2, 1) and grid.dtype == np.uint8
    assert grid[2:66, 2:66].min() == 255 and grid[2:66, 68:132].max() == 0
    gaps = np.concatenate([grid[:2].ravel(), grid[66:68].ravel(), grid[:, 66:68].ravel()])
    assert (gaps == outputs.GAP_VALUE).all()  # Neither black nor white: tiles stand apart.
    assert outputs.image_grid(samples, vocab_size=17).shape[0] > 2 * 64  # Default gap.


def test_cluster_detection():
    assert not sharding.cluster_detected({})
    assert not sharding.cluster_detected({"SLURM_NTASKS": "1"})
    assert sharding.cluster_detected({"SLURM_NTASKS": "4"})
    assert sharding.cluster_detected({"OMPI_COMM_WORLD_SIZE": "2"})
    assert sharding.cluster_detected({"TPU_WORKER_HOSTNAMES": "a,b"})
    assert not sharding.cluster_detected({"TPU_WORKER_HOSTNAMES": "localhost"})
