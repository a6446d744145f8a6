"""Long runs that cannot be poisoned, silently mixed or stranded: divergence, unreadable and
corrupt checkpoints, the workdir's config record, prompt preemption, errors that name their
cause."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import flax.struct
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from runner_helpers import (
    REPO,
    assert_trees_close,
    eval_record,
    eval_run,
    flag_overrides,
    latest_step,
    main_command,
    restore,
    subprocess_env,
    tiny_config,
    train_run,
)

from configs import base as base_config
from vdm_jax.runner import (
    checkpoint,
    config_validation,
    evaluate,
    experiment,
    preemption,
    reference,
    sampling,
    specs,
    state,
    workdir,
    workdir_lock,
)

NO_EVAL = {"training.eval_every": 10**6, "training.sample_every": 10**6}


def _run(workdir_path: str, *args: str, mode: str = "train") -> subprocess.CompletedProcess:
    return subprocess.run(
        main_command(workdir_path, *args, mode=mode),
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _steps(workdir_path: str, folder: str = "checkpoints") -> list[int]:
    path = os.path.join(workdir_path, folder)
    return sorted(int(n.split(".")[0]) for n in os.listdir(path)) if os.path.isdir(path) else []


# ---- 1. a divergent update is never saved, so a plain resume works ---------------------------


@pytest.mark.slow
def test_divergent_update_is_not_saved_and_resume_with_a_sane_rate_works(tmp_path):
    path = str(tmp_path)
    steady = {**NO_EVAL, "training.checkpoint_every": 1, "training.max_to_keep": 2}
    good = jax.device_get(train_run(tiny_config(**steady, **{"training.num_steps": 2}), path))
    assert _steps(path) == [1, 2]
    exploding = {"optimizer.learning_rate": 1e30, "optimizer.warmup_steps": 0}
    with pytest.raises(
        FloatingPointError, match=r"step 3 .*diverged.*last good checkpoint is step 2"
    ):
        train_run(tiny_config(**steady, **exploding, **{"training.num_steps": 4}), path)
    # Nothing was saved from the diverged state, and no good checkpoint was rotated out.
    assert _steps(path) == [1, 2]
    assert_trees_close(restore(tiny_config(), path), good, rtol=0, atol=0)
    final = train_run(tiny_config(**steady, **{"training.num_steps": 4}), path)
    assert (
        int(final.step) == 4
        and np.isfinite(jax.device_get(final.params["score_net"]["conv_in"]["kernel"])).all()
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("optimizer.learning_rate", 1e39),
        ("optimizer.eps", float("nan")),
        ("model.gamma_max", float("inf")),
    ],
)
def test_non_finite_or_float32_overflowing_numbers_are_refused(field, value):
    with pytest.raises(
        config_validation.ConfigError, match=rf"config\.{field}=.*not a finite float32"
    ):
        config_validation.validate(tiny_config(**{field: value}), num_devices=1, process_count=1)


# ---- 2 and 3. unreadable and corrupt checkpoints: named, set aside, older ones used ----------


def _corrupt_silently(path: str, step: int) -> None:
    """Rewrites checkpoint ``step`` with one parameter value changed and the digest of the
    original: what a storage fault that flips bits in array data leaves behind, a file that
    decodes without error into different values."""
    exp = experiment.build(tiny_config(), jax.devices()[:1])
    with checkpoint.make_manager(path, read_only=True) as manager:
        original = checkpoint._restore_verified(manager, step, state.abstract_train_state(exp))
    digest = checkpoint.state_digest(original)
    kernel = np.array(original.params["score_net"]["conv_in"]["kernel"])
    kernel.reshape(-1)[7] = 7.35e37
    damaged = original.replace(
        params={
            **original.params,
            "score_net": {
                **original.params["score_net"],
                "conv_in": {**original.params["score_net"]["conv_in"], "kernel": kernel},
            },
        }
    )
    shutil.rmtree(os.path.join(checkpoint.checkpoint_dir(path), str(step)))
    with checkpoint.make_manager(path, max_to_keep=100) as manager:
        manager.save(
            step,
            args=ocp.args.StandardSave(checkpoint._saved_tree(damaged)),
            force=True,
            custom_metadata={checkpoint.DIGEST_KEY: digest},
        )


@pytest.mark.slow
def test_unreadable_and_corrupt_checkpoints_fall_back_to_the_newest_readable(tmp_path):
    path = str(tmp_path)
    config = tiny_config(
        **NO_EVAL,
        **{"training.num_steps": 4, "training.checkpoint_every": 1, "training.max_to_keep": 10},
    )
    train_run(config, path)
    good = restore(tiny_config(), path)  # Step 4, before any damage.
    ckpts = checkpoint.checkpoint_dir(path)
    os.makedirs(os.path.join(ckpts, "7"))  # An empty step folder.
    os.makedirs(os.path.join(ckpts, "6", "default"))  # A save interrupted before metadata.
    os.remove(os.path.join(ckpts, "4", "default", "_METADATA"))  # Metadata lost.
    with open(os.path.join(ckpts, "3", "default", "manifest.ocdbt"), "wb"):
        pass  # A zero-length data file.
    _corrupt_silently(path, 2)  # Decodes fine: only the digest can tell.

    # Evaluation skips them with one warning each and uses step 1; it moves nothing.
    result = _run(path, mode="eval")
    assert result.returncode == 0, result.stderr
    for step, reason in (
        (7, "the folder is empty"),
        (6, "missing"),
        (4, "missing default/_METADATA"),
        (3, ""),
        (2, "do not match the digest"),
    ):
        warnings = [
            line
            for line in result.stderr.splitlines()
            if f"Cannot read checkpoint {ckpts}/{step} (" in line
        ]
        assert len(warnings) == 1 and reason in warnings[0], (step, warnings)
    assert eval_record(path, 1)["step"] == 1
    assert _steps(path) == [1, 2, 3, 4, 6, 7]

    # Training sets each aside (nothing deleted) and resumes from step 1.
    final = train_run(config, path)
    assert int(final.step) == 4
    assert _steps(path, "checkpoints_unreadable") == [2, 3, 4, 6, 7]
    assert _steps(path) == [1, 2, 3, 4]  # Saved again, no collision with the set-aside ones.
    assert_trees_close(restore(tiny_config(), path), good, rtol=1e-6)  # The same run again.


@pytest.mark.slow
def test_a_tampered_digest_is_named_as_corruption(tmp_path):
    path = str(tmp_path)
    train_run(tiny_config(**NO_EVAL, **{"training.num_steps": 2}), path)
    meta_path = os.path.join(checkpoint.checkpoint_dir(path), "2", "_CHECKPOINT_METADATA")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["custom_metadata"][checkpoint.DIGEST_KEY][1][0] += 1
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    exp = experiment.build(tiny_config(), jax.devices()[:1])
    with checkpoint.make_manager(path, read_only=True) as manager:
        with pytest.raises(checkpoint.CorruptCheckpointError, match="digest"):
            checkpoint._restore_verified(manager, 2, state.abstract_train_state(exp))


@flax.struct.dataclass
class _StateBeforeTimeMoments:
    """TrainState's layout before its optional ``time_moments`` field existed."""

    step: jax.Array
    params: object
    ema_params: object
    opt_state: object
    rng: jax.Array


def test_checkpoints_from_before_an_optional_state_field_still_restore(tmp_path):
    """A state without ``time_moments`` saves the old layout, and an old checkpoint (the
    dataclass without the field) restores into today's state, digest verified."""
    exp = experiment.build(tiny_config(**{"model.adaptive_time": False}), jax.devices()[:1])
    fresh = state.create_train_state(exp)
    old = _StateBeforeTimeMoments(**{k: getattr(fresh, k) for k in _OLD_FIELDS})
    path = str(tmp_path)
    with checkpoint.make_manager(path) as manager:
        manager.save(
            3,
            args=ocp.args.StandardSave(old),
            custom_metadata={checkpoint.DIGEST_KEY: checkpoint.state_digest(old)},
        )
        manager.wait_until_finished()
    restored = checkpoint.restore_latest(path, state.abstract_train_state(exp))
    assert restored is not None and restored.time_moments is None
    assert_trees_close(restored, fresh, rtol=0, atol=0)


_OLD_FIELDS = ("step", "params", "ema_params", "opt_state", "rng")


def test_state_digest_changes_with_any_single_word():
    tree = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.int32)}
    base = checkpoint.state_digest(tree)
    assert base == checkpoint.state_digest(jax.tree.map(np.copy, tree))
    for leaf in ("a", "b"):
        for index in range(tree[leaf].size):
            changed = jax.tree.map(np.copy, tree)
            flat = changed[leaf].reshape(-1).view(np.uint32)
            flat[index] ^= np.uint32(1 << (index % 32))
            assert checkpoint.state_digest(changed) != base, (leaf, index)
    swapped = jax.tree.map(np.copy, tree)
    swapped["a"].reshape(-1)[[0, 1]] = swapped["a"].reshape(-1)[[1, 0]]
    assert checkpoint.state_digest(swapped) != base  # Order matters, not only the sum.


# ---- 4. the workdir records its config; a change that mixes runs is refused -------------------


@pytest.mark.slow
def test_a_record_from_before_a_field_existed_reads_as_its_former_value(tmp_path):
    """Fields added later (``specs.added``): a record without them is compared as the value
    the code had then, which is also the base config's default; another value is refused."""
    path = str(tmp_path)
    base = base_config.get_config()
    former = {}  # every added field at the value it had before it existed
    for section, cls in specs.SECTIONS.items():
        for field in dataclasses.fields(cls):
            if "before" in field.metadata:
                assert field.metadata["before"] == base[section][field.name], field.name
                former[f"{section}.{field.name}"] = field.metadata["before"]
    assert len(former) >= 4
    exp = experiment.build(tiny_config(**former), jax.devices()[:1])
    workdir.write_config_record(exp, path)
    record_path = os.path.join(path, workdir.RECORD)
    with open(record_path) as f:
        record = json.load(f)
    for name in former:
        section, field = name.split(".")
        del record[section][field]
    with open(record_path, "w") as f:
        json.dump(record, f)
    workdir.check_config_record(exp, path)  # the former values: accepted
    edm = {**former, "model.weighting": "edm"}
    other = experiment.build(tiny_config(**edm), jax.devices()[:1])
    with pytest.raises(config_validation.ConfigError, match=r"model\.weighting: 'elbo' -> 'edm'"):
        workdir.check_config_record(other, path)


@pytest.mark.slow
def test_config_record_refuses_changes_that_mix_runs(tmp_path):
    path = str(tmp_path)
    train_run(tiny_config(**NO_EVAL, **{"training.num_steps": 2}), path)
    with open(os.path.join(path, workdir.RECORD)) as f:
        assert json.load(f)["model"]["num_groups"] == 4
    changed = {"model.num_groups": 2, "seed": 3, "training.batch_size": 32}
    with pytest.raises(config_validation.ConfigError) as error:
        train_run(tiny_config(**NO_EVAL, **changed, **{"training.num_steps": 4}), path)
    message = str(error.value)
    for line in (
        "config.model.num_groups: 4 -> 2",
        "config.seed: 0 -> 3",
        "config.training.batch_size: 16 -> 32",
    ):
        assert line in message
    assert latest_step(path) == 2  # Nothing rotated.
    # A shape-changing change is named too, before orbax sees it.
    with pytest.raises(config_validation.ConfigError, match=r"config\.model\.channels: 16 -> 32"):
        train_run(tiny_config(**NO_EVAL, **{"model.channels": 32}), path)
    # Evaluation with another model is refused and writes nothing.
    with pytest.raises(config_validation.ConfigError, match="num_groups"):
        eval_run(tiny_config(**{"model.num_groups": 2}), path)
    assert eval_record(path, 2) is None
    # Allowed changes pass: length, intervals, evaluation settings, remat.
    allowed = {
        "training.num_steps": 3,
        "training.log_every": 1,
        "eval.method": "elbo_stratified",
        "model.remat": True,
    }
    assert int(train_run(tiny_config(**NO_EVAL, **allowed), path).step) == 3


# ---- 5. prompt preemption -------------------------------------------------------------------


def _sigterm_when(path: str, overrides: dict, marker: str) -> tuple[int, str]:
    """Runs ``experiments.main``, sends SIGTERM once ``marker`` is in its log, and returns
    its exit status and log."""
    flags = [f"--config.{k}={v}" for k, v in overrides.items()]
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        process = subprocess.Popen(
            main_command(path, *flags),
            cwd=REPO,
            env=subprocess_env(),
            stdout=subprocess.DEVNULL,
            stderr=log,
            text=True,
        )
        try:
            deadline = time.monotonic() + 240
            while marker not in open(log.name).read():
                assert process.poll() is None, open(log.name).read()
                assert time.monotonic() < deadline, f"no {marker!r} within 240 s"
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)
        finally:
            process.kill()
        return process.returncode, open(log.name).read()


@pytest.mark.slow
def test_sigterm_during_evaluation_saves_and_stops_between_batches(tmp_path):
    path = str(tmp_path)
    # A slow evaluation right after the step-2 checkpoint: 297 images x 64 network calls.
    overrides = {
        "training.num_steps": 1000,
        "training.eval_every": 2,
        "training.sample_every": 10**6,
        "eval.num_time_samples": 64,
        "eval.batch_size": 8,
    }
    status, output = _sigterm_when(path, overrides, "eval:")
    assert status == 0, output
    assert "Preempted at step 2 during evaluation or sampling; checkpoint saved." in output
    assert latest_step(path) == 2
    assert eval_record(path, 2) is None  # Not finished.


@pytest.mark.slow
def test_sigterm_before_any_new_step_exits_without_writing(tmp_path):
    path = str(tmp_path)
    # Signalled while the first step is being compiled.
    status, output = _sigterm_when(path, {"training.num_steps": 1000}, "Starting at step 0")
    assert status == 0, output
    assert "Preempted before a new step finished; nothing written." in output
    assert _steps(path) == [] and not os.path.exists(os.path.join(path, workdir.RECORD))
    assert not os.path.exists(os.path.join(path, "tensorboard"))


class _SignalledWhileCompiling(preemption.Preemption):
    """A preemption requested from inside the worker thread of :meth:`wait_for`, which then
    holds its work until released: the SIGTERM that arrives during a compilation."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def wait_for(self, fn):
        def signalled():
            self.request()
            self.release.wait(120)
            return fn()

        return super().wait_for(signalled)


def test_a_sigterm_during_the_eval_or_sampler_compilation_is_seen_at_once():
    """The first evaluation batch and sampler call compile in the worker thread, so the
    signal interrupts them while the compilation still runs (as the training step's does)."""
    exp = experiment.build(tiny_config(), jax.devices()[:1])
    params = state.create_train_state(exp).ema_params
    runs = {
        "eval": lambda p: evaluate.Evaluator(exp)(params, p),
        "sample": lambda p: sampling.draw(exp, params, sampling.make_sample_fn(exp), p),
    }
    for name, run in runs.items():
        signalled = _SignalledWhileCompiling()
        with pytest.raises(preemption.Interrupted):
            run(signalled)
        assert preemption.work_left_behind(), name  # The compilation still runs.
        signalled.release.set()
        for thread in threading.enumerate():
            if thread.name == "vdm_jax-compile":
                thread.join()


# ---- 6. errors that name their cause, before any work -----------------------------------------


@pytest.mark.parametrize(
    ("flag", "line"),
    [
        (
            "--config.training.bogus=1",
            "FATAL: config.training.bogus is not a config field "
            "(every field is listed in configs/base.py)",
        ),
        (
            "--config.eval.num_examples=3",
            "FATAL: config.eval.num_examples is not a config field; did you mean "
            "config.eval.num_time_samples? (every field is listed in configs/base.py)",
        ),
        (
            "--config.training.num_stepz=3",
            "FATAL: config.training.num_stepz is not a config field; did you mean "
            "config.training.num_steps? (every field is listed in configs/base.py)",
        ),
    ],
)
def test_unknown_config_field_is_one_clear_line(tmp_path, flag, line):
    result = _run(str(tmp_path), flag)
    assert _error_line(result) == line
    assert result.stderr.strip() == line  # Nothing else: no escapes, no second line.


def test_garbage_reference_checkpoint_names_its_file(tmp_path):
    bad = tmp_path / "ckpt-3.flax"
    bad.write_bytes(b"\x93not msgpack at all" * 10)
    with pytest.raises(reference.ReferenceCheckpointError, match=rf"{bad}.*does not decode"):
        reference.load_reference_checkpoint(str(bad))


def test_workdir_that_is_a_file_or_read_only_fails_before_any_work(tmp_path):
    as_file = tmp_path / "file"
    as_file.write_text("")
    line = _error_line(_run(str(as_file), mode="eval"))
    assert line == f"WorkdirError: workdir {str(as_file)!r} is a file, not a directory"
    with pytest.raises(workdir.WorkdirError, match="is a file"):
        workdir.prepare(str(as_file), create=True)


def test_evaluating_a_workdir_without_checkpoints_is_one_line(tmp_path):
    missing = str(tmp_path / "missing")
    line = _error_line(_run(missing, mode="eval"))
    assert line == f"WorkdirError: workdir {missing!r} does not exist; run --mode=train first"
    line = _error_line(_run(str(tmp_path), mode="sample"))
    assert line == (
        f"FileNotFoundError: no readable checkpoint in {tmp_path}/checkpoints; "
        "run --mode=train first"
    )


def _mount_tmpfs(target: str, options: str) -> bool:
    if os.geteuid() != 0 or sys.platform != "linux":
        return False
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", target], capture_output=True
        ).returncode
        == 0
    )


@pytest.mark.slow
def test_read_only_workdir_is_refused_before_the_evaluation(tmp_path):
    path = str(tmp_path / "ro")
    os.makedirs(path)
    if not _mount_tmpfs(path, "size=1m,ro"):
        pytest.skip("needs root to mount a read-only tmpfs")
    try:
        with pytest.raises(workdir.WorkdirError, match="not writable"):
            eval_run(tiny_config(), path)
    finally:
        subprocess.run(["umount", path], check=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("size", "when"),
    [("256k", "before any work"), ("800k", "while saving, after the free-space check passed")],
)
def test_full_disk_is_one_clear_error(tmp_path, size, when):
    """The tiny model's state is 0.64 MiB; a checkpoint of it takes about 1 MiB on disk."""
    path = str(tmp_path / "tiny")
    os.makedirs(path)
    if not _mount_tmpfs(path, f"size={size}"):
        pytest.skip("needs root to mount a small tmpfs")
    overrides = [f"--config.{k}={v}" for k, v in {**NO_EVAL, "training.num_steps": 2}.items()]
    try:
        for attempt in range(2):  # The second run meets the same full disk.
            result = _run(path, *overrides)
            assert result.returncode == 1, (when, attempt)
            last = result.stderr.strip().splitlines()[-1]
            assert "No space left on device" in last and path in last, (when, last)
            assert "handle is closed" not in result.stderr, (when, attempt)
            # The first mid-run failure trains; its partial save then fills the disk, so the
            # second run stops before any work too.
            started = "Starting at step" in result.stderr
            assert started == (when != "before any work" and attempt == 0), (when, attempt)
            assert latest_step(path) is None
    finally:
        subprocess.run(["umount", path], check=False)


# ---- 7. one training per workdir --------------------------------------------------------------

# The absl prefix of an error line: "E0131 14:02:07.123456 12345 main.py:97] ".
_ABSL_ERROR = r"E\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ main\.py:\d+\] "
_HOLDER = r"host (?P<host>\S+), pid (?P<pid>\d+), since \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d"


def _error_line(result: subprocess.CompletedProcess) -> str:
    """The one error line of a failed run as the terminal shows it (absl's prefix removed):
    the last line of stderr, with no traceback and no backslash escapes anywhere."""
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    line = result.stderr.rstrip("\n").splitlines()[-1]
    assert "\\" not in line, line
    return re.sub(f"^{_ABSL_ERROR}", "", line)


def _locked_message(path: str) -> str:
    lock = os.path.join(path, workdir_lock.LOCK_FILE)
    return (
        rf"workdir {re.escape(path)} is being trained by another run \({_HOLDER}; lock file "
        rf"{re.escape(lock)}\): wait for it to finish, or stop it \(kill (?P=pid) on "
        r"(?P=host)\) and run this command again to resume; --mode=eval and --mode=sample "
        r"need no lock"
    )


def test_a_second_holder_is_refused_and_a_released_lock_is_free(tmp_path):
    path = str(tmp_path)
    with workdir_lock.hold(path):
        with pytest.raises(workdir_lock.WorkdirLockedError) as error:
            with workdir_lock.hold(path):
                pass
        message = re.fullmatch(_locked_message(path), str(error.value))
        assert message, str(error.value)
        assert message["host"] == socket.gethostname() and message["pid"] == str(os.getpid())
    assert open(os.path.join(path, workdir_lock.LOCK_FILE)).read() == ""  # Released: empty.
    with workdir_lock.hold(path):  # Free again.
        pass


_HOLD_SCRIPT = """
import sys, time
from vdm_jax.runner import workdir_lock
with workdir_lock.hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_holder_killed_with_sigkill_never_blocks_the_next_run(tmp_path, caplog):
    path = str(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_SCRIPT, path],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {holder.pid}, since"):
            with workdir_lock.hold(path):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs.
        holder.wait()
    with caplog.at_level(logging.WARNING), workdir_lock.hold(path):
        pass
    assert f"ended without releasing it (host {socket.gethostname()}, pid {holder.pid}" in (
        caplog.text
    )


def test_file_systems_without_shared_locks_use_a_heartbeat(tmp_path, monkeypatch, caplog):
    """gcsfuse and the like: flock only sees this host, so a fresh heartbeat of another host
    refuses, a stale one is taken over; without flock at all, a live pid here refuses too."""
    path = str(tmp_path)
    lock_file = os.path.join(path, workdir_lock.LOCK_FILE)
    monkeypatch.setattr(workdir_lock, "filesystem_type", lambda _: "fuse.gcsfuse")

    def holder(host: str, pid: int, age: float) -> None:
        body = {"host": host, "pid": pid, "since": "2025-01-31T14:02:07+00:00"}
        with open(lock_file, "w") as f:
            json.dump({**body, "heartbeat": time.time() - age}, f)

    holder("other-host", 4242, age=10)
    with pytest.raises(workdir_lock.WorkdirLockedError, match=r"last heartbeat 1\d s ago"):
        with workdir_lock.hold(path):
            pass
    holder("other-host", 4242, age=workdir_lock.STALE_SECONDS + 1)
    monkeypatch.setattr(workdir_lock, "HEARTBEAT_SECONDS", 0.05)
    with caplog.at_level(logging.WARNING), workdir_lock.hold(path):
        assert "host other-host, pid 4242" in caplog.text
        first = json.load(open(lock_file))["heartbeat"]
        time.sleep(0.5)
        assert json.load(open(lock_file))["heartbeat"] > first  # The heartbeat runs.

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(workdir_lock.fcntl, "flock", no_locks)
    holder(socket.gethostname(), os.getppid(), age=10)  # Alive, on this host.
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {os.getppid()}"):
        with workdir_lock.hold(path):
            pass
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    holder(socket.gethostname(), dead.pid, age=10)
    with caplog.at_level(logging.WARNING), workdir_lock.hold(path):
        assert "gives no locks" in caplog.text


def test_filesystem_type_is_read_from_the_mount_table():
    if not os.path.exists("/proc/self/mountinfo"):
        pytest.skip("no /proc/self/mountinfo")
    assert workdir_lock.filesystem_type("/proc/self") == "proc"
    assert workdir_lock.filesystem_type(tempfile.gettempdir())


def _wait_for(condition, what: str, process: subprocess.Popen, log: str) -> None:
    deadline = time.monotonic() + 240
    while not condition():
        assert process.poll() is None, open(log).read()
        assert time.monotonic() < deadline, f"no {what} within 240 s"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_second_training_is_refused_eval_runs_and_a_killed_one_resumes(tmp_path):
    """Training 1 saves step 2 and then samples for minutes (holding the lock); training 2
    is refused with one line; an evaluation runs alongside; training 1 is killed with
    SIGKILL and training 3 resumes from step 2."""
    path, log = str(tmp_path / "run"), str(tmp_path / "first.log")
    slow = {
        **NO_EVAL,
        "training.sample_every": 2,
        "sample.num_steps": 1000,
        "sample.num_samples": 16 * 1000,
    }
    with open(log, "w") as out:
        first = subprocess.Popen(
            main_command(path, *flag_overrides(**slow)),
            cwd=REPO,
            env=subprocess_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for(lambda: latest_step(path) == 2, "checkpoint 2", first, log)
        second = _run(path, *flag_overrides(**slow))
        line = _error_line(second)
        message = re.fullmatch("WorkdirLockedError: " + _locked_message(path), line)
        assert message and message["pid"] == str(first.pid), second.stderr
        assert "Starting at step" not in second.stderr
        assert _run(path, mode="eval").returncode == 0  # Readers need no lock.
        assert eval_record(path, 2) is not None
        assert first.poll() is None, open(log).read()  # Still training all along.
    finally:
        first.kill()
        first.wait()
    third = _run(path, "--config.training.num_steps=4", *flag_overrides(**NO_EVAL))
    assert third.returncode == 0, third.stderr
    assert f"pid {first.pid}" in third.stderr and "Starting at step 2 of 4" in third.stderr
    assert latest_step(path) == 4


# ---- 8. records that cannot be misread ------------------------------------------------------


def _damaged_record_line(path: str, problem: str) -> str:
    record = os.path.join(path, workdir.RECORD)
    return (
        f"DamagedRecordError: {record} is damaged ({problem}); it records the config that "
        "wrote this workdir's checkpoints, which every run is checked against. Restore it "
        "from a copy, or run again with --config_record=rewrite to write it anew from this "
        "run's config (the damaged file is kept as config.json.damaged and the fields that "
        "can no longer be checked are listed)"
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "empty"),
        (
            b'{"seed": 0, "model": {"channels": 16,',
            "truncated: its JSON stops mid-record at byte 37",
        ),
        (
            b'{"seed": 0,, }',
            "not valid JSON: Expecting property name enclosed in double quotes at line 1 column 12",
        ),
        (b"\xff\xfe\x00garbage", "not text: invalid start byte at byte 0"),
        (b"[1, 2]", "a JSON list, not an object"),
        (b'{"model": {}}', "it has no seed"),
        (b'{"seed": 0, "model": 3}', "a section is not a JSON object"),
    ],
)
def test_a_damaged_config_record_is_named_with_the_ways_on(tmp_path, content, problem):
    path = str(tmp_path)
    (tmp_path / workdir.RECORD).write_bytes(content)
    exp = experiment.build(tiny_config(), jax.devices()[:1])
    with pytest.raises(workdir.DamagedRecordError) as error:
        workdir.check_config_record(exp, path)
    assert f"{type(error.value).__name__}: {error.value}" == _damaged_record_line(path, problem)
    assert (tmp_path / workdir.RECORD).read_bytes() == content  # Never overwritten.


@pytest.mark.slow
def test_damaged_records_stop_the_run_in_one_line_and_rewrite_is_explicit(tmp_path):
    """A truncated config.json stops training and evaluation with one line and is left as
    it is; --config_record=rewrite keeps it aside and writes it anew. A truncated checkpoint
    metadata file (the digest's record) makes that checkpoint unreadable, not unverified. A
    damaged feature-network cache stops sampling with one line."""
    path = str(tmp_path)
    train_run(
        tiny_config(**NO_EVAL, **{"training.num_steps": 2, "training.checkpoint_every": 1}),
        path,
    )
    record = tmp_path / workdir.RECORD
    original = json.loads(record.read_text())
    with open(record, "r+b") as f:
        f.truncate(100)
    damaged = record.read_bytes()
    for mode in ("train", "eval"):
        result = _run(path, mode=mode)
        line = _damaged_record_line(path, "truncated: its JSON stops mid-record at byte 100")
        assert _error_line(result) == line, mode
        assert record.read_bytes() == damaged and latest_step(path) == 2

    ckpts = checkpoint.checkpoint_dir(path)
    with open(os.path.join(ckpts, "2", checkpoint.METADATA_FILE), "r+b") as f:
        f.truncate(100)
    result = _run(path, "--config_record=rewrite", mode="eval")
    assert result.returncode == 0, result.stderr
    assert "can no longer be checked" in result.stderr
    assert "config.model.channels=16" in result.stderr
    assert (tmp_path / "config.json.damaged").read_bytes() == damaged
    rewritten = json.loads(record.read_text())  # This run's config: configs/test.py.
    assert rewritten == workdir.config_record(experiment.build(tiny_config(), jax.devices()[:1]))
    assert rewritten["model"] == original["model"] and rewritten["seed"] == original["seed"]
    warning = (
        f"Cannot read checkpoint {ckpts}/2 (CorruptCheckpointError: its metadata file "
        "_CHECKPOINT_METADATA is damaged (JSONDecodeError: "
    )
    assert warning in result.stderr
    assert eval_record(path, 1)["step"] == 1

    cache = tmp_path / "sample_quality" / "digits_features.npz"
    cache.parent.mkdir(exist_ok=True)
    cache.write_bytes(b"PK\x03\x04 a zip that stops here")
    line = _error_line(_run(path, mode="sample"))
    assert re.fullmatch(
        rf"DamagedRecordError: {re.escape(str(cache))} is damaged \(\w+: [^()]+\); it caches "
        r"the feature network of this workdir's sample-quality figures, so that they stay "
        r"comparable\. Restore it from a copy, or delete it and the run fits the network "
        r"again \(the same seed; another scikit-learn version may move the figures slightly\)",
        line,
    ), line
    assert cache.read_bytes() == b"PK\x03\x04 a zip that stops here"
