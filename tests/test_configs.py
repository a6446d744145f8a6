"""Tests of the configs: they load, validate, override from flags, and bad values are named."""

from __future__ import annotations

import importlib
import os

import jax
import pytest
from absl import flags
from ml_collections import config_flags
from runner_helpers import REPO, tiny_config, train_run

from vdm_jax import unet
from vdm_jax.runner import config_validation, data, experiment, state

CONFIGS = (
    "base",
    "cifar10",
    "cifar10_aug",
    "imagenet32",
    "imagenet64",
    "digits",
    "digits_v1",
    "digits_v2",
    "digits_v3",
    "digits_v4",
    "digits_ensemble",
    "test",
)
# Facts of the TFDS datasets, so that no data has to be present to check their configs.
INFOS = {
    "cifar10": data.DatasetInfo("cifar10", (32, 32, 3), 256, 10, 50000, 10000),
    "imagenet32": data.DatasetInfo("imagenet32", (32, 32, 3), 256, 0, 1281149, 49999),
    "imagenet64": data.DatasetInfo("imagenet64", (64, 64, 3), 256, 0, 1281149, 49999),
    "digits": data.DatasetInfo("digits", (8, 8, 1), 17, 10, 1500, 297),
}


def load(name: str):
    return importlib.import_module(f"configs.{name}").get_config()


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_valid_and_documented(name):
    config = load(name)
    module = importlib.import_module(f"configs.{name}")
    config_validation.validate(config, num_devices=8, process_count=1, info=INFOS[config.data.name])
    if name != "base":
        assert "python -m experiments.main" in module.__doc__
        assert "bpd" in module.__doc__


def test_derived_configs_change_only_a_few_fields():
    base = load("base").to_dict()

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    base_flat = dict(flat(base))
    for name in ("cifar10", "cifar10_aug", "imagenet32", "imagenet64"):
        changed = {k for k, v in flat(load(name).to_dict()) if base_flat[k] != v}
        assert len(changed) <= 8, (name, changed)
    assert dict(flat(load("cifar10").to_dict())) == base_flat  # The base is the paper's run.


def test_paper_models_have_the_paper_sizes():
    for name, expected in (("cifar10", 30_586_243), ("imagenet64", 237_636_355)):
        config = load(name)
        exp = experiment.build(config, info=INFOS[config.data.name])
        shapes = jax.eval_shape(
            lambda exp=exp: exp.vdm.init(jax.random.PRNGKey(0), *state.dummy_inputs(exp))
        )
        assert unet.count_params(shapes["params"]["score_net"]) == expected


def test_augmentation_config_conditions_on_the_d4_index():
    config = load("cifar10_aug")
    assert config.data.augment
    exp = experiment.build(config, info=INFOS["cifar10"])
    assert exp.num_classes == data.NUM_AUGMENTATIONS == 8


def test_command_line_overrides():
    argv = [
        "prog",
        f"--config={os.path.join(REPO, 'configs', 'digits.py')}",
        "--config.training.batch_size=32",
        "--config.model.schedule=fixed_linear",
        "--config.optimizer.grad_clip_norm=1.0",
    ]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=values, sys_argv=argv)
    values(argv)
    config = values.config
    assert config.training.batch_size == 32
    assert config.model.schedule == "fixed_linear"
    assert config.optimizer.grad_clip_norm == 1.0
    assert config.data.name == "digits"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"training.batch_size": 12}, r"config\.training\.batch_size=12 must be .* the 8 devices"),
        ({"eval.batch_size": 100}, r"config\.eval\.batch_size=100 .* 8 devices"),
        (
            {"model.schedule": "cosine"},
            r"config\.model\.schedule='cosine' .*allowed: \['fixed_linear', 'learned_cosine', "
            r"'learned_linear', 'monotone_net'",
        ),
        ({"sample.sampler": "euler"}, r"config\.sample\.sampler='euler'.*'ancestral', 'ddim'"),
        ({"sample.decode": "mean"}, r"config\.sample\.decode='mean'.*'argmax', 'sample'"),
        ({"data.name": "mnist"}, r"config\.data\.name='mnist'.*'digits'"),
        ({"model.dtype": "float16"}, r"config\.model\.dtype='float16'.*'bfloat16', 'float32'"),
        ({"model.schedule_grad": "both"}, r"config\.model\.schedule_grad='both'.*'elbo'"),
        ({"model.attention": "none"}, r"config\.model\.attention='none'.*'all', 'middle'"),
        (
            {"model.parameterization": "score"},
            r"config\.model\.parameterization='score'.*'eps', 'v', 'x'",
        ),
        (
            {"model.parameterization": "categorical", "model.add_z_to_eps": True},
            r"config\.model\.parameterization='categorical' outputs a distribution .* "
            r"add_z_to_eps",
        ),
        (
            {"model.adaptive_time": True, "model.timesteps": 10, "sample.num_steps": 10},
            r"config\.model\.adaptive_time=True needs continuous time",
        ),
        ({"model.weighting": "p2"}, r"config\.model\.weighting='p2'.*'edm', 'elbo', 'sigmoid'"),
        ({"data.vocab_size": 256}, r"config\.data\.vocab_size=256 does not match .*allowed: 17"),
        ({"training.num_steps": -5}, r"config\.training\.num_steps=-5 .*integer >= 1"),
        ({"training.log_every": 0}, r"config\.training\.log_every=0"),
        ({"eval.num_time_samples": 0}, r"config\.eval\.num_time_samples=0"),
        ({"model.timesteps": -1}, r"config\.model\.timesteps=-1"),
        ({"model.timesteps": 10}, r"config\.sample\.num_steps=8 must equal .*timesteps=10"),
        ({"optimizer.learning_rate": -1.0}, r"config\.optimizer\.learning_rate=-1\.0"),
        ({"optimizer.ema_rate": 1.0}, r"config\.optimizer\.ema_rate=1\.0 .*\[0, 1\)"),
        ({"optimizer.decay_steps": -1}, r"config\.optimizer\.decay_steps=-1 .*integer >= 0"),
        ({"model.gamma_min": 6.0}, r"config\.model\.gamma_min=6\.0 must be below"),
        ({"model.schedule_width": 0}, r"config\.model\.schedule_width=0 .*integer >= 1"),
        (
            {"model.schedule": "learned_cosine", "model.cosine_s": -0.5},
            r"config\.model\.cosine_s=-0\.5 is out of range \(allowed: a number in \[0, 1\]\)",
        ),
        ({"seed": -1}, r"config\.seed=-1"),
        ({"model.schedule": "reference_net"}, r"schedule_grad='variance' needs .*'elbo'"),
        ({"model.conditioning": "class"}, r"config\.model\.conditioning='class'.*'augmentation'"),
        ({"model.conditioning": "augmentation"}, r"conditioning='augmentation' does not fit"),
        ({"data.augment": True, "model.conditioning": "label"}, r"conditioning='label' does not"),
        ({"sharding.fsdp": 3}, r"config\.sharding\.fsdp=3 must divide the 8 devices .*1, 2, 4, 8"),
        ({"sharding.fsdp": 0}, r"config\.sharding\.fsdp=0 must divide"),
        ({"sharding.min_shard_bytes": -1}, r"config\.sharding\.min_shard_bytes=-1"),
        ({"model.ensemble_size": 0}, r"config\.model\.ensemble_size=0 .*integer >= 1"),
        (
            {"model.ensemble_size": 2, "sharding.fsdp": 2},
            r"config\.sharding\.fsdp=2: an ensemble .* keeps each member whole",
        ),
        (
            {"model.ensemble_size": 2, "optimizer.grad_clip_norm": 1.0},
            r"config\.optimizer\.grad_clip_norm=1\.0: a global norm .* couple",
        ),
        (
            {"model.ensemble_size": 2, "eval.reference_checkpoint": "/ckpt"},
            r"config\.eval\.reference_checkpoint='/ckpt' holds one score network",
        ),
    ],
)
def test_bad_values_are_named(overrides, message):
    config = tiny_config(**overrides)
    with pytest.raises(config_validation.ConfigError, match=message):
        config_validation.validate(config, num_devices=8, process_count=1, info=INFOS["digits"])


def test_every_problem_is_reported_at_once():
    config = tiny_config(**{"training.batch_size": 12, "model.schedule": "cosine"})
    with pytest.raises(config_validation.ConfigError) as error:
        config_validation.validate(config, num_devices=8, process_count=1)
    assert "training.batch_size" in str(error.value) and "model.schedule" in str(error.value)


def test_label_conditioning_needs_labels():
    config = tiny_config(**{"data.name": "imagenet32", "data.vocab_size": 256})
    config.model.conditioning = "label"
    with pytest.raises(config_validation.ConfigError, match=r"needs labels.*'imagenet32'"):
        config_validation.validate(config, num_devices=8, process_count=1, info=INFOS["imagenet32"])


def test_bad_config_stops_before_any_work(tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(config_validation.ConfigError, match=r"batch_size=12 .* 8 devices"):
        train_run(tiny_config(**{"training.batch_size": 12}), str(workdir))
    assert not workdir.exists()
