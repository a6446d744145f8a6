"""Tests of the configs: they load, validate, override from flags, and bad values are named."""

from __future__ import annotations

import ast
import importlib
import os
import pathlib

import jax
import pytest
from absl import flags
from ml_collections import config_flags
from runner_helpers import REPO, tiny_config, train_run

from configs import digits
from vdm_jax import unet
from vdm_jax.runner import config_validation, data, experiment, state

CONFIG_DIR = pathlib.Path(REPO) / "configs"
CONFIG_FILES = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem != "__init__")
# What each config may import besides configs.base: digits_mulan starts from a digits variant.
ALLOWED_CONFIG_IMPORTS = {"digits_mulan": {"configs.digits"}}


def _specs() -> list[tuple[str, str | None]]:
    """Every (config file, variant) pair: each file's default (None) and its ``VARIANTS``."""
    specs = []
    for name in CONFIG_FILES:
        specs.append((name, None))
        module = importlib.import_module(f"configs.{name}")
        specs.extend((name, variant) for variant in getattr(module, "VARIANTS", {}))
    return specs


SPECS = _specs()
# Facts of the TFDS datasets, so that no data has to be present to check their configs.
INFOS = {
    "cifar10": data.DatasetInfo("cifar10", (32, 32, 3), 256, 10, 50000, 10000),
    "imagenet32": data.DatasetInfo("imagenet32", (32, 32, 3), 256, 0, 1281149, 49999),
    "imagenet32_resized": data.DatasetInfo(
        "imagenet32_resized", (32, 32, 3), 256, 0, 1281167, 50000
    ),
    "imagenet64_resized": data.DatasetInfo(
        "imagenet64_resized", (64, 64, 3), 256, 0, 1281167, 50000
    ),
    "imagenet64": data.DatasetInfo("imagenet64", (64, 64, 3), 256, 0, 1281149, 49999),
    "digits": data.DatasetInfo("digits", (8, 8, 1), 17, 10, 1500, 297),
}


def load(name: str, variant: str | None = None):
    module = importlib.import_module(f"configs.{name}")
    return module.get_config(variant) if variant else module.get_config()


def test_every_config_file_and_variant_is_checked():
    assert {"base", "digits", "digits_mulan", "test", "cifar10", "imagenet64"} <= set(CONFIG_FILES)
    assert {v for n, v in SPECS if n == "digits"} == {None, "v4", "ensemble_b64", "v3", "v2", "v1"}


@pytest.mark.parametrize(("name", "variant"), SPECS, ids=[f"{n}:{v or ''}" for n, v in SPECS])
def test_config_is_valid_and_documented(name, variant):
    config = load(name, variant)
    module = importlib.import_module(f"configs.{name}")
    config_validation.validate(config, num_devices=8, process_count=1, info=INFOS[config.data.name])
    if name != "base":
        assert "python -m experiments.main" in module.__doc__
        assert "bpd" in module.__doc__
    if variant:  # The module docstring's list of variants has a line for it.
        assert f"\n  {variant}: " in module.__doc__


def _imported_configs(path: pathlib.Path) -> set[str]:
    """The ``configs.*`` modules that ``path`` imports; a relative import counts as one."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # Relative: from within configs/.
                module = f"configs.{module}" if module else "configs"
            names.update(f"{module}.{alias.name}" for alias in node.names)
            names.add(module)
    return {n for n in names if n.startswith("configs.")}


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_configs_derive_from_base_only(name):
    """Each config states its values against configs/base.py: no chain of configs to read."""
    allowed = {"configs.base"} | ALLOWED_CONFIG_IMPORTS.get(name, set())
    extra = {
        n
        for n in _imported_configs(CONFIG_DIR / f"{name}.py")
        if not any(n == a or n.startswith(f"{a}.") for a in allowed)
    }
    assert not extra, f"configs/{name}.py imports {sorted(extra)}; only configs.base is allowed"


def test_the_import_check_sees_other_configs(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from configs import base, digits\nimport configs.test\nfrom . import cifar10\n")
    assert _imported_configs(bad) == {
        "configs.base",
        "configs.digits",
        "configs.test",
        "configs.cifar10",
    }


def test_digits_variants_and_unknown_ones():
    default = load("digits")
    assert (default.model.ensemble_size, default.training.batch_size) == (2, 48)
    assert default.optimizer.learning_rate == 2.6e-3
    v4 = load("digits", "v4")
    assert (v4.model.ensemble_size, v4.training.batch_size) == (1, 64)
    for variant, changes in digits.VARIANTS.items():
        config = load("digits", variant).to_dict()
        for path, value in changes.items():
            section, field = path.split(".")
            assert config[section][field] == value, (variant, path)
    with pytest.raises(ValueError, match=r"unknown variant 'v5'.*allowed: \['ensemble_b64', 'v1'"):
        digits.get_config("v5")
    with pytest.raises(KeyError, match=r"model\.chanels is not a config field"):
        digits.override(digits.get_config(), {"model.chanels": 8})


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


def test_a_variant_comes_after_a_colon():
    argv = [
        "prog",
        f"--config={os.path.join(REPO, 'configs', 'digits.py')}:v4",
        "--config.training.num_steps=10",
    ]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=values, sys_argv=argv)
    values(argv)
    expected = load("digits", "v4")
    expected.training.num_steps = 10
    assert values.config.to_dict() == expected.to_dict()


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
