"""The benchmark harness runs on the tiny config and writes well-formed JSON.

Speed and memory are measured by the harness, never asserted here; these tests check only
that the figures exist, are positive and have the documented structure, and that the FLOP
counts agree with each other.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from runner_helpers import tiny_config  # noqa: F401 (sets up the shared compilation cache)

from configs import test as test_config
from experiments.benchmark import harness, memory, options, parts, report, sweep
from vdm_jax import unet
from vdm_jax.runner import experiment, flops, state

PART_KEYS = {"part", "batch_size", "num_devices", "compile_s", "step_s", "images_per_s",
             "flops", "flops_per_s", "memory", "device_kind", "platform"}  # fmt: skip
STEP_KEYS = {"median", "p25", "p75", "min", "max", "mean", "n", "all"}


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_blocks=2, channels=16),
        dict(num_blocks=1, channels=32, attention="all", fourier_features=False),
        dict(num_blocks=1, channels=16, num_classes=3, label_input="flag"),
        dict(num_blocks=1, channels=16, outputs_per_channel=5),
    ],
)
def test_analytic_flops_match_the_traced_program(kwargs):
    net = unet.ScoreUNet(**kwargs)
    z, g = jnp.zeros((3, 8, 8, 2)), jnp.zeros((3,))
    label = jnp.zeros((3,), jnp.int32) if net.num_classes else None
    params = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), z, g, label, train=False))
    forward = flops.unet_forward_flops(net, 3, (8, 8, 2))
    assert flops.traced_flops(lambda p: net.apply(p, z, g, label, train=False), params) == forward

    def loss(p, z):
        return jnp.sum(net.apply(p, z, g, label, train=False) ** 2)

    # Forward, input gradients and weight gradients: 3x, less the conditioning's input grads.
    train = flops.traced_flops(jax.grad(loss, argnums=(0, 1)), params, z)
    assert 2.99 * forward < train <= flops.TRAIN_FLOPS_PER_FORWARD * forward


def test_jaxpr_flops_counts_scan_iterations():
    w = jnp.ones((4, 4))

    def f(x):
        return jax.lax.fori_loop(0, 5, lambda i, h: h @ w, x)

    assert flops.traced_flops(f, jnp.ones((2, 4))) == 5 * 2 * 2 * 4 * 4


def _check_record(rec):
    assert PART_KEYS <= set(rec), rec
    assert STEP_KEYS <= set(rec["step_s"])
    assert rec["step_s"]["n"] == 2 and len(rec["step_s"]["all"]) == 2
    assert 0 < rec["step_s"]["min"] <= rec["step_s"]["median"] <= rec["step_s"]["max"]
    for key in ("compile_s", "images_per_s"):
        assert rec[key] > 0 and math.isfinite(rec[key]), (key, rec[key])
    for method in ("analytic", "jaxpr", "xla"):
        assert rec["flops"][method] > 0 and rec["flops_per_s"][method] > 0, method
    assert rec["memory"]["peak_bytes"] > 0 and rec["process_cpu_per_wall"] > 0
    analysis = rec["memory"]["memory_analysis_per_device"]
    assert analysis["total_bytes"] > 0 and analysis["argument_bytes"] > 0


@pytest.mark.slow
def test_harness_runs_on_the_tiny_config_and_writes_json(tmp_path):
    config = test_config.get_config()
    opts = options.make_options(
        steps=2, warmup=1, batch_sizes=[8], device_counts=[2], peak_flops=1e12
    )
    result = sweep.run(config, opts)  # In-process: the first 2 of 8 simulated devices.
    path = tmp_path / "bench.json"
    report.write_json(result, str(path))
    loaded = json.loads(path.read_text())

    env = loaded["environment"]
    assert env["jax_version"] == jax.__version__
    assert env["device_kind"] and env["backend"] == jax.default_backend()
    assert loaded["options"]["steps"] == 2
    assert loaded["config"]["model"]["channels"] == config.model.channels
    records = {r["part"]: r for r in loaded["results"]}
    assert set(records) == set(parts.DEFAULT_PARTS), loaded["results"]
    for rec in records.values():
        _check_record(rec)
        assert rec["batch_size"] == 8 and rec["num_devices"] == 2
        # Against --peak_flops=1e12 per device, summed over the 2 devices.
        mfu = rec["flops_per_s"]["analytic"] / 2e12
        assert rec["model_flops_utilization"] == pytest.approx(mfu)
    net = experiment.build(config, info=sweep.dataset_info(config)).vdm.score_net
    forward = flops.unet_forward_flops(net, 8, (8, 8, 1))
    assert records["train"]["flops"]["analytic"] == pytest.approx(3 * forward)
    assert records["eval"]["flops"]["analytic"] == config.eval.num_time_samples * forward
    assert records["sample"]["flops"]["analytic"] == forward
    assert records["train"]["flops"]["jaxpr"] == pytest.approx(3 * forward, rel=0.01)
    stack = records["conv_stack"]
    assert stack["depth"] == round(flops.equivalent_conv_layers(net, 8, (8, 8, 1)))
    stack_s = np.array(stack["step_s"]["all"])
    for part in ("train", "eval", "sample"):
        rec = records[part]
        ratio = rec["ratio_vs_conv_stack"]["analytic"]
        per_round = (rec["flops"]["analytic"] / np.array(rec["step_s"]["all"])) / (
            stack["flops"]["analytic"] / stack_s
        )
        assert ratio == pytest.approx(float(np.median(per_round))) and ratio > 0
        q25, q75 = rec["ratio_vs_conv_stack_quartiles"]["analytic"]
        assert q25 <= ratio <= q75
    table = report.format_table(loaded)
    assert "conv_stack" in table and "train" in table


@pytest.mark.slow  # compiles two train steps
def test_train_scalar_times_the_scalar_schedules_step_in_the_same_rounds():
    """A per-dimension, input-adaptive config beside the same network with the base scalar
    schedule: the report's ratio is the median of the rounds' time ratios."""
    config = test_config.get_config()
    config.model.schedule, config.model.schedule_grad = "per_dim_polynomial", "elbo"
    config.model.latent_dim = 4
    opts = options.make_options(
        steps=3, warmup=1, batch_sizes=[8], device_counts=[1], parts=["train", "train_scalar"]
    )
    result = sweep.run(config, opts)
    records = {r["part"]: r for r in result["results"]}
    assert set(records) == {"train", "train_scalar"}, result["results"]
    ratios = np.array(records["train"]["step_s"]["all"]) / records["train_scalar"]["step_s"]["all"]
    (cost,) = result["train_vs_train_scalar"]
    assert cost["median"] == pytest.approx(float(np.median(ratios)))
    assert cost["p25"] <= cost["median"] <= cost["p75"]
    assert "train / train_scalar" in report.format_table(result)
    scalar = parts.scalar_schedule(experiment.build(config, info=sweep.dataset_info(config)))
    assert scalar.vdm.encoder is None and scalar.model.schedule == "monotone_net"


def test_memory_only_compiles_without_running():
    # The training step of the test above, on abstract inputs: a compilation-cache hit.
    config = test_config.get_config()
    config.sharding.min_shard_bytes = 0
    opts = options.make_options(batch_sizes=[8], memory_only=True, device_counts=[2])
    result = sweep.run(config, opts)
    (rec,) = result["results"]
    assert rec["memory_only"] and "step_s" not in rec
    assert rec["memory"]["memory_analysis_per_device"]["temp_bytes"] > 0
    assert rec["flops"]["analytic"] > 0 and rec["num_params"] > 0
    est = rec["memory"]["residual_estimate_per_device"]
    # Parameters, EMA and Adam's two moments (float32), plus Adam's step count and the
    # adaptive time distribution's per-bin moments.
    low = 4 * 4 * rec["num_params"]
    assert config.model.adaptive_time
    assert low <= est["train_state_bytes"] <= low + 64 + 4 * state.TIME_BINS
    assert est["gradient_bytes"] == 4 * rec["num_params"]
    assert est["total_bytes"] == sum(v for k, v in est.items() if k != "total_bytes")
    assert est["gathered_param_bytes"] == 0  # Replicated: the state's own copy is used.
    assert rec["state_bytes_per_device"] == est["train_state_bytes"]
    # The same step with the state split over both devices (min_shard_bytes=0: every array
    # with an even dimension): half the state each, plus the gathered parameters.
    layouts = rec["memory"]["residual_estimate_per_device_by_layout"]
    assert layouts["replicated"] == est
    split = layouts["fsdp"]
    assert (
        est["train_state_bytes"] / 2 <= split["train_state_bytes"] < 0.51 * est["train_state_bytes"]
    )
    assert 0.98 * est["gradient_bytes"] < split["gathered_param_bytes"] <= est["gradient_bytes"]
    for k in ("gradient_bytes", "saved_activation_bytes"):
        assert split[k] == est[k], k
    json.dumps(result)  # JSON-able as is.


def test_widest_fitting_width_fits_and_the_next_does_not():
    config = test_config.get_config()
    config.sharding.min_shard_bytes = 0
    exp = experiment.build(config, jax.devices()[:4], info=sweep.dataset_info(config))
    budget = 40 * 2**20
    fits = memory.widest_fitting(exp, 8, budget)
    assert fits["fsdp"].channels > fits["replicated"].channels  # Splitting fits a wider net.

    def total(layout: str, channels: int) -> int:
        spec = dataclasses.replace(exp.model, channels=channels)
        wide = exp.replace(
            model=spec, vdm=spec.build(exp.vdm.schedule, exp.num_classes, exp.info.vocab_size)
        )
        shapes = state.state_shapes(wide)
        activations = memory.saved_activation_bytes(
            wide, shapes.params, parts.abstract_batch(wide, 8)
        )
        return memory.layout_estimates(wide, shapes, activations)[layout].total_bytes

    for layout, fit in fits.items():
        assert fit.estimate.total_bytes == total(layout, fit.channels) <= budget
        assert total(layout, fit.channels + memory.WIDTH_STEP) > budget


def test_saved_activations_are_linear_in_the_batch_and_shrink_with_remat_and_bfloat16():
    """Measured on the test config with an eps output: per image, remat keeps 0.30x and
    bfloat16 0.62x of the float32 activations (both: 0.22x). A grid head (categorical or
    discretised logistic) adds per-value intermediates that remat does not cover: 0.42x with
    the logistic."""
    devices = jax.devices()[:1]

    def saved(batch_size, **model_overrides):
        config = test_config.get_config()
        config.model.parameterization = "eps"
        config.model.update(model_overrides)
        exp = experiment.build(config, devices, info=sweep.dataset_info(config))
        params = state.abstract_train_state(exp).params
        batch = parts.abstract_batch(exp, batch_size)
        return memory.saved_activation_bytes(exp, params, batch)

    per_image = {}
    for name, overrides in (
        ("float32", {}),
        ("remat", {"remat": True}),
        ("bfloat16", {"dtype": "bfloat16"}),
    ):
        one, two, four = (saved(b, **overrides) for b in (1, 2, 4))
        assert four - two == 2 * (two - one)  # a fixed part plus the same bytes per image
        per_image[name] = two - one
    assert per_image["remat"] < 0.4 * per_image["float32"]
    assert 0.5 * per_image["float32"] < per_image["bfloat16"] < 0.8 * per_image["float32"]


def test_child_command_line_replaces_the_sweep_flags():
    argv = ["benchmark.py", "--config=configs/test.py", "--json", "out.json",
            "--device_counts=1,2", "--config.model.channels=8", "--steps=3"]  # fmt: skip
    child = sweep._child_argv(argv, 4, "/tmp/x.json")
    assert child[-3:] == ["--device_counts=4", "--json=/tmp/x.json", "--device_count_mode=submesh"]
    assert "--config.model.channels=8" in child and "--steps=3" in child
    assert "out.json" not in child and "--device_counts=1,2" not in child
    env = sweep._child_env(4)
    assert env["XLA_FLAGS"].count("--xla_force_host_platform_device_count") == 1
    assert env["XLA_FLAGS"].endswith("--xla_force_host_platform_device_count=4")


def test_model_flop_utilization_is_against_the_chips_bfloat16_peak():
    assert harness.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert harness.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert harness.peak_bf16_flops("TPU v5 lite") == 197e12
    assert harness.peak_bf16_flops("TPU v5") == 459e12
    assert harness.peak_bf16_flops("cpu") is None
    h200 = harness.Placement(128, 4, "NVIDIA H200", "gpu", harness.peak_bf16_flops("NVIDIA H200"))
    assert h200.utilization(0.45 * 4 * 989e12) == pytest.approx(0.45)
    cpu = harness.Placement(128, 1, "cpu", "cpu")
    assert cpu.utilization(1e11) is None  # No peak known: not reported.


def test_options_are_checked():
    with pytest.raises(ValueError, match="unknown parts"):
        options.make_options(parts=["train", "nope"])
    with pytest.raises(ValueError, match="unknown benchmark options"):
        options.make_options(step=3)
