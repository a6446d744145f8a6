"""docs/reproduce.md's recipes stay runnable: every evaluation command parses, its config is
valid, and its evaluation flags evaluate a just-trained test workdir on the digits."""

from __future__ import annotations

import importlib
import math
import os
import re
import shlex

import ml_collections
import pytest
from runner_helpers import REPO, eval_run, tiny_config, train_run

from experiments import prepare_data
from experiments.benchmark import sweep
from vdm_jax.runner import config_validation

DOC = os.path.join(REPO, "docs", "reproduce.md")
# Every published figure the docs give a recipe for; a recipe that disappears fails here.
RECIPES = {
    "cifar10",
    "cifar10_released",
    "cifar10_aug_released",
    "imagenet32",
    "imagenet32_resized",
    "imagenet64",
    "cifar10_mulan",
}


def recipes() -> dict[str, list[str]]:
    """``# eval: NAME`` fenced blocks of the doc -> the command's arguments."""
    with open(DOC) as f:
        text = f.read()
    out = {}
    for name, body in re.findall(r"```bash\n# eval: (\S+)\n(.*?)```", text, re.S):
        out[name] = shlex.split(body.replace("\\\n", " "))
    return out


def flags_of(argv: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in argv if a.startswith("--"))


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``configs/NAME.py[:VARIANT]`` as experiments.main loads it."""
    path, _, variant = spec.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return module.get_config(variant) if variant else module.get_config()


def override(config: ml_collections.ConfigDict, flags: dict[str, str], sections: tuple) -> None:
    """Applies the ``config.SECTION.FIELD`` flags of ``sections``, typed as the field is."""
    for key, text in flags.items():
        parts = key.split(".")
        if parts[0] != "config" or len(parts) < 3 or parts[1] not in sections:
            continue
        node = config
        for p in parts[1:-1]:
            node = node[p]
        old = node[parts[-1]]
        if isinstance(old, bool):
            assert text in ("true", "false"), key
            value = text == "true"
        else:
            value = type(old)(text) if old is not None else text
        node[parts[-1]] = value


def test_every_recipe_is_there_and_runs_experiments_main_in_eval_mode():
    found = recipes()
    assert set(found) == RECIPES
    for name, argv in found.items():
        assert argv[:3] == ["python", "-m", "experiments.main"], name
        flags = flags_of(argv)
        assert flags["mode"] == "eval" and flags["config"].startswith("configs/"), name


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_is_valid_for_its_paper_config(name):
    flags = flags_of(recipes()[name])
    config = load_config(flags["config"])
    override(config, flags, ("data", "eval", "model", "training", "sharding"))
    info = sweep.dataset_info(config)
    config_validation.validate(config, num_devices=8, process_count=1, info=info)


def test_imagenet_configs_read_the_set_their_docstring_names():
    assert load_config("configs/imagenet32.py").data.name == "imagenet32"
    assert load_config("configs/imagenet32.py:resized").data.name == "imagenet32_resized"
    assert load_config("configs/imagenet64.py").data.name == "imagenet64"
    assert load_config("configs/imagenet64.py:resized").data.name == "imagenet64_resized"
    with pytest.raises(ValueError, match="unknown variant 'x' of imagenet32"):
        load_config("configs/imagenet32.py:x")


def test_prepare_commands_name_registered_datasets():
    with open(DOC) as f:
        names = set(re.findall(r"python -m experiments\.prepare_data (\S+)", f.read()))
    assert names == set(prepare_data.SOURCES)


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory) -> str:
    workdir = str(tmp_path_factory.mktemp("reproduce"))
    train_run(tiny_config(**{"training.num_steps": 2}), workdir)
    return workdir


def evaluate_recipe(name: str, workdir: str) -> dict:
    config = tiny_config()
    override(config, flags_of(recipes()[name]), ("eval",))
    return eval_run(config, workdir)


ELBO_RECIPES = sorted(RECIPES - {"cifar10_mulan"})


@pytest.mark.slow  # The module's training run and six evaluations: ~70 s on a busy 2-core host.
@pytest.mark.parametrize("name", ELBO_RECIPES)
def test_recipe_eval_flags_evaluate_a_trained_workdir(name, trained_workdir):
    record = evaluate_recipe(name, trained_workdir)
    assert math.isfinite(record["bpd"]) and record["bpd"] > 0


@pytest.mark.slow
def test_mulan_ode_recipe_evaluates_a_trained_workdir(trained_workdir):
    record = evaluate_recipe("cifar10_mulan", trained_workdir)
    assert math.isfinite(record["bpd"]) and record["bpd"] > 0
