"""Evaluation records: one per checkpoint step and protocol, never overwritten by another.

A bits/dim is comparable only with its protocol: the data (dataset, version, split, number of
examples, bits per value) and the estimator (ELBO in continuous time or with T steps, its time
samples per image and how they are drawn; the ODE's dequantization, draws, importance
weighting, trace estimator and tolerances), the checkpoint step and whether the EMA
parameters were used. Soft-Truncation's withdrawn likelihood (a missing entropy term) and
score_sde's negative bits/dim (no dequantization) are what an unrecorded protocol lets
through.

:func:`protocol` writes that down; :func:`protocol_id` names it (the method and a digest of
everything but the checkpoint), and a result is kept at
``{workdir}/eval/{protocol_id}/step_{step}.json``, so the ELBO, ODE and importance-weighted
figures of one checkpoint sit side by side. TensorBoard scalars of a protocol go to its own
run, ``{workdir}/tensorboard/eval/{protocol_id}``. :func:`table` prints a workdir's records
(``python -m experiments.results --workdir=DIR``).
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

RECORDS_DIR = "eval"
# Records written before protocols were kept apart: ``eval_step_{step}.json``.
LEGACY_PATTERN = "eval_step_*.json"


def protocol(
    *,
    dataset: Mapping[str, Any],
    estimator: Mapping[str, Any],
    seed: int,
    batch_size: int,
    step: int,
    ema: bool,
) -> dict[str, Any]:
    """What makes a bits/dim comparable, as one JSON-able dict.

    Args:
      dataset: name, version, split, num_examples, shape, vocab_size (bits per value is
        added: ``log2 vocab_size``).
      estimator: the eval method and its settings (time discretisation, time samples and
        their sampling; or the ODE's dequantization, draws, weighting, traces, tolerances).
      seed: the evaluation's seed; with ``batch_size`` it makes the figure reproducible.
      batch_size: the global eval batch.
      step: the checkpoint step evaluated.
      ema: whether the EMA parameters were evaluated.
    """
    return {
        "dataset": {**dataset, "bits_per_value": math.log2(dataset["vocab_size"])},
        "estimator": dict(estimator),
        "seed": seed,
        "batch_size": batch_size,
        "checkpoint": {"step": step, "ema": ema},
    }


def protocol_id(spec: Mapping[str, Any]) -> str:
    """``"{method}-{digest}"``: the same for every checkpoint evaluated by one protocol.

    The digest (8 hex digits of SHA-256) covers the dataset, estimator, seed and batch size
    of :func:`protocol`, not the checkpoint: a protocol's records over training share it.
    """
    key = {k: v for k, v in spec.items() if k != "checkpoint"}
    canonical = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:8]
    return f"{spec['estimator']['method']}-{digest}"


def record_path(workdir: str, identifier: str, step: int) -> str:
    """Where the record of ``step`` under protocol ``identifier`` lives."""
    return os.path.join(workdir, RECORDS_DIR, identifier, f"step_{step}.json")


def write(record: Mapping[str, Any], workdir: str) -> tuple[str, dict[str, Any] | None]:
    """Writes ``record`` (with ``protocol_id`` and ``step``) to its own file, atomically.

    Returns:
      ``(path, previous)``: ``previous`` is the record of the same protocol and step that
      this one replaces (an identical protocol re-run), or None.
    """
    path = record_path(workdir, record["protocol_id"], record["step"])
    previous = _read(path) if os.path.exists(path) else None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        json.dump(dict(record), f, indent=2, sort_keys=True)
    os.replace(temporary, path)
    return path, previous


def _read(path: str) -> dict[str, Any] | None:
    """The record at ``path``, or None if it cannot be read as one."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def load(workdir: str, step: int | None = None) -> list[tuple[str, dict[str, Any]]]:
    """A workdir's records as ``(path, record)``, by step then protocol; ``step`` selects
    one checkpoint. Records from before protocols were kept apart are included; unreadable
    files are skipped."""
    paths = glob.glob(os.path.join(workdir, RECORDS_DIR, "*", "step_*.json"))
    paths += glob.glob(os.path.join(workdir, LEGACY_PATTERN))
    found = []
    for path in paths:
        record = _read(path)
        if record is None or "bpd" not in record:
            continue
        if step is None or record.get("step") == step:
            found.append((path, record))
    return sorted(found, key=lambda item: (item[1].get("step", -1), _estimator_text(item[1])))


def _estimator_text(record: Mapping[str, Any]) -> str:
    """The estimator in a few words: the method and the settings that set its figure."""
    estimator = record.get("protocol", {}).get("estimator")
    if estimator is None:  # A record from before protocols were written down.
        return f"{record.get('method', '?')} (protocol not recorded)"
    method = estimator["method"]
    if method == "ode":
        parts = [
            f"dequant={estimator['ode_dequantization']}",
            f"draws={estimator['ode_dequant_samples']}",
        ]
        if estimator["ode_importance_weighted"]:
            parts.append("importance-weighted")
        parts += [
            f"trace={estimator['ode_divergence']}",
            f"tol={estimator['ode_rtol']:g}/{estimator['ode_atol']:g}",
        ]
    else:
        parts = [f"t/image={estimator['num_time_samples']}", estimator["time"]]
    return f"{method} ({', '.join(parts)})"


def table(records: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """The records as one plain-text table: step, estimator, bpd +- standard error, Monte
    Carlo error, examples, seconds, protocol id."""
    header = ("step", "estimator", "bpd", "+- se", "MC error", "examples", "seconds", "protocol")
    rows = [header]
    for path, record in records:
        mc = record.get("bpd_mc_stderr")
        rows.append(
            (
                str(record.get("step", "?")),
                _estimator_text(record),
                f"{record['bpd']:.4f}",
                f"{record.get('bpd_stderr', float('nan')):.4f}",
                "-" if mc is None else f"{mc:.4f}",
                str(record.get("num_examples", "?")),
                f"{record.get('seconds', float('nan')):.1f}",
                record.get("protocol_id", os.path.basename(path)),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)
