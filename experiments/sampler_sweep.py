r"""Sample quality against sampler cost: the Fréchet distance for each sampler and step count.

  python -m experiments.sampler_sweep --config=configs/digits.py --workdir=workdir/digits

Draws ``--num_samples`` samples from the workdir's latest checkpoint with each grid sampler
of ``--samplers`` at each of ``--steps``, and with the adaptive probability-flow ODE sampler
at each of ``--tolerances``; records the network evaluations, the seconds per draw (after
compilation) and the Fréchet distance to the held-out images (:mod:`vdm_jax.runner.sample_quality`,
the datasets it knows). Writes ``{out}/sampler_sweep.json``, ``{out}/sampler_sweep.png`` (the
distance against network evaluations, one line per sampler, with the real-data floor) and
prints the table as Markdown. ``--out`` defaults to ``{workdir}/sampler_sweep``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
from absl import app, flags
from ml_collections import config_flags

from vdm_jax import latents, model, ode_likelihood, samplers
from vdm_jax.runner import checkpoint, experiment, sample_quality, sampling

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A trained workdir.")
_SAMPLERS = flags.DEFINE_list("samplers", ["ancestral", "ddim", "dpm_solver_2m"], "Grid samplers.")
_STEPS = flags.DEFINE_list("steps", ["8", "16", "32", "64", "128", "256"], "Grid step counts.")
_TOLERANCES = flags.DEFINE_list("tolerances", ["1e-2", "1e-3", "1e-4"], "ODE sampler tolerances.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 512, "Samples per setting.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: {workdir}/sampler_sweep).")
flags.mark_flags_as_required(["config", "workdir"])


def _ode_network_evals(exp: experiment.Experiment, params: Any, tolerance: float) -> int:
    """Network evaluations of the adaptive ODE sampler's solve of one batch of latents from
    the prior (its own draw: the sampler does not report its count; the solver's error
    control is over the whole batch, so the count is per batch)."""
    batch = exp.sample.batch_size
    label = None
    if exp.conditioning.conditional:
        label = exp.conditioning.sample_labels(batch, exp.num_classes)
    context = None
    if exp.vdm.encoder is not None:  # an input-adaptive schedule: c ~ p(c), as the sampler
        context = latents.sample_prior(jax.random.key(exp.seed + 1), batch, exp.model.latent_dim)
    gamma_fn, eps_fn = model.inference_fns(exp.vdm, params, label, context)
    z_1 = jax.random.normal(jax.random.key(exp.seed), (batch, *exp.info.shape))
    solve = jax.jit(
        lambda z: (
            ode_likelihood.probability_flow(
                z, gamma_fn, eps_fn, t_start=1.0, t_end=0.0, rtol=tolerance, atol=tolerance
            ).num_function_evals
        )
    )
    return int(solve(z_1))


def measure(
    exp: experiment.Experiment, params: Any, workdir: str, sampler: str, steps: int, tol: float
) -> dict[str, Any]:
    """One row: the sampler's samples, its cost and their Fréchet distance."""
    spec = dataclasses.replace(exp.sample, sampler=sampler, num_steps=steps, ode_tolerance=tol)
    exp = dataclasses.replace(exp, sample=spec)
    sample_fn = sampling.make_sample_fn(exp)
    key = jax.random.PRNGKey(0)
    compiled = sample_fn.lower(params, key).compile()  # Compilation is not timed.
    start = time.perf_counter()
    samples = sampling.draw(exp, params, compiled)
    seconds = time.perf_counter() - start
    adaptive = sampler in samplers.ADAPTIVE_SAMPLERS
    evals = _ode_network_evals(exp, params, tol) if adaptive else steps
    figures = sampling.quality(exp, samples, workdir)
    return {
        "sampler": sampler,
        "steps": None if adaptive else steps,
        "tolerance": tol if adaptive else None,
        "network_evals": evals,
        "seconds": seconds,
        "frechet_distance": figures["samples/frechet_distance"],
        "frechet_distance_real": figures["samples/frechet_distance_real"],
    }


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """The distance against network evaluations (log scale), one line per sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name in dict.fromkeys(r["sampler"] for r in rows):
        mine = sorted((r for r in rows if r["sampler"] == name), key=lambda r: r["network_evals"])
        label = f"{name} (adaptive)" if mine[0]["steps"] is None else name
        x = [r["network_evals"] for r in mine]
        ax.plot(x, [r["frechet_distance"] for r in mine], marker="o", label=label)
    ax.axhline(rows[0]["frechet_distance_real"], color="gray", linestyle="--", label="real images")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("network evaluations per sample")
    ax.set_ylabel("Fréchet distance to held-out images")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| sampler | steps (tolerance) | network evals | seconds | Fréchet distance |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        steps = r["steps"] if r["steps"] is not None else f"({r['tolerance']:g})"
        lines.append(
            f"| {r['sampler']} | {steps} | {r['network_evals']} | {r['seconds']:.1f} | "
            f"{r['frechet_distance']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    config.sample.num_samples = config.sample.batch_size = _NUM_SAMPLES.value
    exp = experiment.build(config)
    if exp.info.name not in sample_quality.FEATURE_NETS:
        raise app.UsageError(
            f"dataset {exp.info.name!r} has no feature network "
            f"(allowed: {sorted(sample_quality.FEATURE_NETS)})"
        )
    params, step = checkpoint.restore_eval_params(exp, _WORKDIR.value)
    settings = [(s, int(n), 0.0) for s in _SAMPLERS.value for n in _STEPS.value]
    settings += [("ode", 1, float(tol)) for tol in _TOLERANCES.value]
    rows = []
    for sampler, steps, tol in settings:
        rows.append(measure(exp, params, _WORKDIR.value, sampler, steps, tol))
        print(json.dumps(rows[-1]), flush=True)
    out = _OUT.value or os.path.join(_WORKDIR.value, "sampler_sweep")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "sampler_sweep.json"), "w") as f:
        json.dump({"step": step, "num_samples": _NUM_SAMPLES.value, "rows": rows}, f, indent=1)
    plot(rows, os.path.join(out, "sampler_sweep.png"))
    real = rows[0]["frechet_distance_real"]
    print(f"\n{_NUM_SAMPLES.value} samples of step {step}; real images: {real:.2f}\n")
    print(markdown(rows))
    print(f"\nWrote {out}/sampler_sweep.json and .png")


if __name__ == "__main__":
    app.run(main)
