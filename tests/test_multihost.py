"""Two processes over 127.0.0.1 (2 CPU devices each) agree with one process, with the train
state replicated or split over both hosts' devices."""

from __future__ import annotations

import subprocess

import pytest
from runner_helpers import (
    REPO,
    assert_trees_close,
    eval_record,
    flag_overrides,
    free_port,
    main_command,
    restore,
    subprocess_env,
    tiny_config,
)

# Same global batch (16) everywhere; eval at the last step to cover the sharded eval too.
OVERRIDES = {"training.num_steps": 3, "training.eval_every": 3, "training.sample_every": 10**6}


def _start(workdir: str, num_devices: int, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        main_command(workdir, *flag_overrides(**OVERRIDES), *flags),
        cwd=REPO,
        env=subprocess_env(num_devices=num_devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [1, 4])
def test_two_processes_match_one_process(tmp_path, fsdp):
    """fsdp=4: every array of the state split over the 4 devices of the 2 hosts, saved and
    evaluated from both; against one process with the state replicated."""
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    address = f"127.0.0.1:{free_port()}"
    joined = (
        "--num_processes=2",
        f"--coordinator_address={address}",
        *flag_overrides(**{"sharding.fsdp": fsdp, "sharding.min_shard_bytes": 0}),
    )
    processes = [
        _start(multi, 2, *joined, "--process_id=0"),
        _start(multi, 2, *joined, "--process_id=1"),
        _start(single, 4),  # The same 4 devices in one process.
    ]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in processes]
    finally:
        for p in processes:
            p.kill()
    for p, out in zip(processes, outputs, strict=True):
        assert p.returncode == 0, out
    assert "Process 1 of 2; 2 local and 4 global devices" in outputs[1]

    config = tiny_config(**OVERRIDES)
    # Split, the gradients are summed in another order; Adam amplifies that in tiny moments.
    tolerance = dict(rtol=1e-5, atol=1e-6) if fsdp == 1 else dict(rtol=1e-4, atol=1e-5)
    assert_trees_close(restore(config, multi), restore(config, single), **tolerance)
    multi_eval, single_eval = eval_record(multi, 3), eval_record(single, 3)
    assert multi_eval["num_examples"] == single_eval["num_examples"] == 297
    for k in ("bpd", "bpd_prior", "bpd_recon", "bpd_diff"):
        assert multi_eval[k] == pytest.approx(single_eval[k], rel=1e-5), k
