"""Evaluation records: one per step and protocol, the protocol written down, shown as a table.

End to end through ``experiments.main``: several estimators on one checkpoint keep their own
records and TensorBoard runs; the identical protocol re-run replaces only its own record and
says so; ``experiments.results`` prints them side by side.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from runner_helpers import REPO, eval_records, read_events, run_main, subprocess_env

from vdm_jax.runner import results

DATASET = {
    "name": "digits",
    "version": "v",
    "split": "test",
    "num_examples": 297,
    "shape": [8, 8, 1],
    "vocab_size": 17,
}
ELBO = {"method": "elbo", "num_time_samples": 4, "time": "continuous"}


def _spec(estimator=ELBO, seed=0, batch_size=64, step=1):
    return results.protocol(
        dataset=DATASET, estimator=estimator, seed=seed, batch_size=batch_size, step=step, ema=True
    )


def test_protocol_records_what_makes_a_figure_comparable():
    spec = _spec()
    assert spec["dataset"]["bits_per_value"] == pytest.approx(math.log2(17))
    assert spec["checkpoint"] == {"step": 1, "ema": True}
    assert spec["estimator"] == ELBO and spec["seed"] == 0 and spec["batch_size"] == 64


def test_protocol_id_names_the_protocol_not_the_checkpoint():
    base = results.protocol_id(_spec())
    assert base.startswith("elbo-") and len(base) == len("elbo-") + 8
    assert results.protocol_id(_spec(step=1000)) == base  # One protocol over training.
    changed = [
        _spec(estimator={**ELBO, "num_time_samples": 8}),
        _spec(estimator={**ELBO, "time": "1000 steps"}),
        _spec(seed=1),
        _spec(batch_size=32),
        results.protocol(
            dataset={**DATASET, "version": "w"},
            estimator=ELBO,
            seed=0,
            batch_size=64,
            step=1,
            ema=True,
        ),
    ]
    ids = {results.protocol_id(s) for s in changed}
    assert len(ids) == len(changed) and base not in ids


def test_write_keeps_other_protocols_and_reports_what_it_replaces(tmp_path):
    workdir = str(tmp_path)
    first = {"step": 5, "bpd": 1.5, "protocol_id": "elbo-00000000"}
    other = {"step": 5, "bpd": 1.4, "protocol_id": "ode-11111111"}
    path, previous = results.write(first, workdir)
    assert previous is None and path == results.record_path(workdir, "elbo-00000000", 5)
    assert results.write(other, workdir)[1] is None
    _, previous = results.write({**first, "bpd": 1.6}, workdir)
    assert previous == first
    assert sorted(r["bpd"] for _, r in results.load(workdir, step=5)) == [1.4, 1.6]
    assert not [p for p in os.listdir(os.path.dirname(path)) if p.endswith(".tmp")]


def test_table_lists_legacy_records_and_skips_unreadable_files(tmp_path):
    workdir = str(tmp_path)
    with open(os.path.join(workdir, "eval_step_7.json"), "w") as f:
        json.dump({"step": 7, "method": "elbo", "bpd": 1.25, "bpd_stderr": 0.01}, f)
    os.makedirs(os.path.join(workdir, "eval", "x"))
    with open(os.path.join(workdir, "eval", "x", "step_7.json"), "w") as f:
        f.write('{"step": 7, "bp')  # Truncated.
    records = results.load(workdir)
    assert len(records) == 1
    lines = results.table(records).splitlines()
    assert lines[0].split()[:3] == ["step", "estimator", "bpd"]
    assert "elbo (protocol not recorded)" in lines[2] and "1.2500" in lines[2]


@pytest.mark.slow
def test_estimators_on_one_checkpoint_keep_their_own_records(tmp_path):
    """The issue's case: the default's figure, then another estimator on the same
    checkpoint: both records stay, each with its protocol; re-running one replaces it."""
    workdir = str(tmp_path / "run")
    no_periodic_eval = ["--config.training.eval_every=1000000"]
    run_main(workdir, *no_periodic_eval, "--config.training.sample_every=1000000")
    importance = ["--config.eval.method=elbo_importance", "--config.eval.num_time_samples=4"]
    stratified = ["--config.eval.method=elbo_stratified", "--config.eval.num_time_samples=4"]
    first = run_main(workdir, *no_periodic_eval, *importance, mode="eval")
    assert "Replaced" not in first
    run_main(workdir, *no_periodic_eval, *stratified, mode="eval")

    records = {r["method"]: r for r in eval_records(workdir, 4)}
    assert set(records) == {"elbo_importance", "elbo_stratified"}
    for method, record in records.items():
        spec = record["protocol"]
        assert spec["dataset"]["name"] == "digits" and spec["dataset"]["split"] == "test"
        assert spec["dataset"]["num_examples"] == record["num_examples"] == 297
        assert spec["dataset"]["bits_per_value"] == pytest.approx(math.log2(17))
        assert "load_digits" in spec["dataset"]["version"]
        assert spec["estimator"]["method"] == method
        assert spec["estimator"]["num_time_samples"] == 4
        assert spec["estimator"]["time"] == "continuous"
        assert "2 replicates" in spec["estimator"]["time_sampling"]
        assert spec["checkpoint"] == {"step": 4, "ema": True}
        assert record["protocol_id"] == results.protocol_id(spec)
        events = read_events(workdir, os.path.join("eval", record["protocol_id"]))
        assert events["eval/bpd"] == [4] and events["eval/protocol/text_summary"] == [4]
    proposal = records["elbo_importance"]["protocol"]["estimator"]
    assert "q(t) of proposal_bins bins fitted" in proposal["time_sampling"]
    assert proposal["proposal_bins"] == 32

    again = run_main(workdir, *no_periodic_eval, *importance, mode="eval")
    replaced = records["elbo_importance"]["protocol_id"]
    assert f"Replaced the earlier record of {replaced} at step 4." in again
    after = {r["method"]: r for r in eval_records(workdir, 4)}
    assert after["elbo_stratified"] == records["elbo_stratified"]  # Untouched.
    assert after["elbo_importance"]["bpd"] == records["elbo_importance"]["bpd"]  # Same seed.

    table = subprocess.run(
        [sys.executable, "-m", "experiments.results", f"--workdir={workdir}"],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert table[0].split()[:4] == ["step", "estimator", "bpd", "+-"]
    rows = table[2:]
    assert len(rows) == 2
    for row, method in zip(rows, sorted(records), strict=True):
        record = records[method]
        assert row.startswith("4 ") and f" {method} (t/image=4" in row
        assert f"{record['bpd']:.4f}" in row and f"{record['bpd_mc_stderr']:.4f}" in row
        assert row.endswith(record["protocol_id"])
