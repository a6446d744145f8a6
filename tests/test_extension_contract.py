"""The extension contract of the registries, shown with their newest entries.

A schedule or an eval method is its code, its registry entry and its settings record: the
record names the config fields the entry reads and checks their values. A config override
alone selects the entry (``--config.model.schedule=learned_cosine
--config.model.cosine_s=0.02``); :func:`vdm_jax.runner.experiment.build` looks the name up
once, and everything below holds the entry. A field only one entry reads is checked only
when that entry is chosen, and must be listed in ``configs/base.py`` (so that a flag can
set it): the config checks name it when it is not.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from runner_helpers import tiny_config

from vdm_jax import model, schedules
from vdm_jax.runner import config_validation, eval_methods, experiment, state, workdir


@pytest.mark.slow
def test_a_schedule_chosen_by_config_overrides_alone_trains_and_evaluates():
    config = tiny_config(**{"model.schedule": "learned_cosine", "model.cosine_s": 0.02})
    exp = experiment.build(config, jax.devices()[:1])
    assert exp.schedule is schedules.SCHEDULES["learned_cosine"]
    assert exp.schedule_settings == schedules.CosineSettings(
        gamma_min=config.model.gamma_min, gamma_max=config.model.gamma_max, cosine_s=0.02
    )
    assert exp.vdm.schedule.s == 0.02
    assert exp.loss.variance_params == frozenset()  # its interior has no parameters

    params = exp.vdm.init(jax.random.key(0), *state.dummy_inputs(exp))["params"]
    x = jax.random.randint(jax.random.key(1), (4, *exp.info.shape), 0, exp.info.vocab_size)
    (loss, terms), grads = model.vdm_loss_and_grads(
        exp.vdm, params, {"image": x}, jax.random.key(2), exp.loss
    )
    assert np.isfinite(loss) and set(terms) == {"prior", "recon", "diffusion"}
    assert set(grads["schedule"]) == schedules.LEARNED_ENDPOINTS
    for g in jax.tree.leaves(grads["schedule"]):
        assert np.isfinite(g) and g != 0

    gamma_fn, eps_fn = model.inference_fns(exp.vdm, params)
    estimate = exp.eval_method.estimate(
        gamma_fn, eps_fn, x, jax.random.key(3), None, loss=exp.loss, settings=exp.eval_settings
    )
    np.testing.assert_allclose(
        estimate.terms["bpd"],
        sum(estimate.terms[k] for k in ("bpd_prior", "bpd_recon", "bpd_diff")),
        rtol=1e-5,
    )


def test_an_out_of_range_setting_is_one_line_naming_its_field():
    config = tiny_config(**{"model.schedule": "learned_cosine", "model.cosine_s": 2.0})
    with pytest.raises(config_validation.ConfigError) as error:
        experiment.build(config, jax.devices()[:1])
    assert error.value.problems == (
        "config.model.cosine_s=2.0 is out of range (allowed: a number in [0, 1])",
    )
    # The record checks itself wherever it is built.
    with pytest.raises(config_validation.ConfigError, match=r"config\.model\.cosine_s=-1"):
        schedules.CosineSettings(cosine_s=-1.0)
    # Another schedule does not read the field, so it does not check it.
    exp = experiment.build(tiny_config(**{"model.cosine_s": 2.0}), jax.devices()[:1])
    assert not hasattr(exp.schedule_settings, "cosine_s")


def test_a_workdir_records_an_entry_setting_and_refuses_its_change(tmp_path):
    """The schedule's own field defines the model: a run that resumes the workdir with
    another value is refused; an eval method's settings may change."""
    cosine = {"model.schedule": "learned_cosine", "model.cosine_s": 0.02}
    exp = experiment.build(tiny_config(**cosine), jax.devices()[:1])
    workdir.write_config_record(exp, str(tmp_path))
    assert workdir.config_record(exp)["model"]["cosine_s"] == 0.02
    other = experiment.build(tiny_config(**{**cosine, "model.cosine_s": 0.1}), jax.devices()[:1])
    with pytest.raises(
        config_validation.ConfigError, match=r"config\.model\.cosine_s: 0\.02 -> 0\.1"
    ):
        workdir.check_config_record(other, str(tmp_path))
    more = experiment.build(
        tiny_config(**{**cosine, "eval.num_time_samples": 6}), jax.devices()[:1]
    )
    workdir.check_config_record(more, str(tmp_path))  # allowed, and logged


def test_an_entry_field_missing_from_the_config_is_named():
    config = tiny_config()
    with config.unlocked():
        del config.model["cosine_s"]
    with pytest.raises(config_validation.ConfigError, match=r"config\.model\.cosine_s is missing"):
        config_validation.validate(config, num_devices=1, process_count=1)


def test_an_eval_method_setting_of_its_own():
    """``eval.proposal_bins`` is read by ``elbo_importance`` alone: its q(t) has that many
    bins, and the value is recorded with its results."""
    overrides = {
        "eval.method": "elbo_importance",
        "eval.num_time_samples": 4,
        "eval.proposal_bins": 8,
    }
    exp = experiment.build(tiny_config(**overrides), jax.devices()[:1])
    assert isinstance(exp.eval_settings, eval_methods.ImportanceSettings)
    assert exp.eval_settings.as_dict() == {"num_time_samples": 4, "proposal_bins": 8}
    x = jnp.zeros((6, *exp.info.shape), jnp.int32)
    proposal = jax.eval_shape(
        lambda key: exp.eval_method.prepare(
            lambda t: -13.3 + 18.3 * t,
            lambda z, g: jnp.zeros_like(z),
            x,
            key,
            loss=exp.loss,
            settings=exp.eval_settings,
        ),
        jax.random.key(0),
    )
    assert proposal.bin_probs.shape == (8,)
    stratified = experiment.build(tiny_config(**{**overrides, "eval.method": "elbo_stratified"}))
    assert "proposal_bins" not in stratified.eval_settings.as_dict()
