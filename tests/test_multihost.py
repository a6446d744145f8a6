"""Two processes over 127.0.0.1 (2 CPU devices each) agree with one process."""

from __future__ import annotations

import json
import os
import subprocess

import jax
import pytest
from runner_helpers import (
    REPO,
    assert_trees_close,
    flag_overrides,
    free_port,
    main_command,
    restore,
    subprocess_env,
    tiny_config,
)

from vdm_jax import train

# Same global batch (16) everywhere; eval at the last step to cover the sharded eval too.
OVERRIDES = {"training.num_steps": 3, "training.eval_every": 3, "training.sample_every": 10**6}


def test_two_processes_match_one_process(tmp_path):
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    address = f"127.0.0.1:{free_port()}"
    processes = [
        subprocess.Popen(
            main_command(
                multi,
                *flag_overrides(**OVERRIDES),
                f"--coordinator_address={address}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            cwd=REPO,
            env=subprocess_env(num_devices=2),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for p in processes:
            outputs.append(p.communicate(timeout=300)[0])
    finally:
        for p in processes:
            p.kill()
    for p, out in zip(processes, outputs, strict=True):
        assert p.returncode == 0, out
    assert "Process 1 of 2; 2 local and 4 global devices" in outputs[1]

    config = tiny_config(**OVERRIDES)
    one = jax.device_get(train.train_and_evaluate(config, single, devices=jax.devices()[:4]))
    assert_trees_close(restore(config, multi), one, rtol=1e-5, atol=1e-6)
    with open(os.path.join(multi, "eval_step_3.json")) as f:
        multi_eval = json.load(f)
    with open(os.path.join(single, "eval_step_3.json")) as f:
        single_eval = json.load(f)
    assert multi_eval["num_examples"] == single_eval["num_examples"] == 297
    for k in ("bpd", "bpd_prior", "bpd_recon", "bpd_diff"):
        assert multi_eval[k] == pytest.approx(single_eval[k], rel=1e-5), k
