"""Evaluation methods of the runner: per-image time sampling, importance sampling and the ODE
bound, each through ``Evaluator``/``run_eval``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian import exact_eps_fn
from runner_helpers import tiny_config

from vdm_jax import diffusion, ode_likelihood
from vdm_jax.runner import config_validation, eval_methods, evaluate, experiment, state


def _perturbed_state(config):
    """A tiny model whose noise prediction is not zero (the last conv starts at zero)."""
    exp = experiment.build(config, jax.devices()[:1])
    train_state = state.create_train_state(exp)
    leaves, treedef = jax.tree.flatten(train_state.ema_params)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    noisy = [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    return exp, jax.tree.unflatten(treedef, noisy)


@pytest.mark.slow
def test_class_conditional_eval_bounds_the_unconditional_likelihood():
    # A class-conditional model whose label embedding is zero ignores the label: its bound on
    # -log P(x | y) is the unconditional network's, and -log P(x) <= -log P(y) - log P(x | y)
    # adds log2(10) / 64 bits per dimension (a uniform prior over the 10 digit classes).
    exp, params = _perturbed_state(tiny_config(**{"model.conditioning": "label"}))
    params = {**params, "score_net": dict(params["score_net"])}
    embed = params["score_net"]["label_embed"]
    params["score_net"]["label_embed"] = jax.tree.map(jnp.zeros_like, embed)
    conditional = evaluate.Evaluator(exp)(params).values
    del params["score_net"]["label_embed"]
    plain = evaluate.Evaluator(experiment.build(tiny_config(), jax.devices()[:1]))(params).values
    label_bpd = np.log2(10) / 64
    assert conditional["bpd_label"] == pytest.approx(label_bpd, rel=1e-12)
    assert conditional["bpd_conditional"] == pytest.approx(plain["bpd"], rel=1e-5)
    assert conditional["bpd"] == pytest.approx(plain["bpd"] + label_bpd, rel=1e-5)
    assert conditional["bpd_stderr"] == pytest.approx(plain["bpd_stderr"], rel=1e-4)
    assert "bpd_label" not in plain and "bpd_conditional" not in plain


@pytest.mark.slow
def test_per_image_time_sampling_agrees_and_reports_its_monte_carlo_error():
    results = {}
    for method in ("elbo", "elbo_stratified", "elbo_importance"):
        config = tiny_config(**{"eval.method": method, "eval.num_time_samples": 4})
        exp, params = _perturbed_state(config)
        evaluator = evaluate.Evaluator(exp)
        results[method] = evaluator(params).record(step=0)
    # A second evaluation (as during training) reuses the compiled pilot of q(t).
    compiled_pilots = evaluator.prepare._cache_size()
    again = evaluator(params).record(step=0)
    assert evaluator.prepare._cache_size() == compiled_pilots == 1
    assert again["bpd"] == results["elbo_importance"]["bpd"]
    strat, imp = results["elbo_stratified"], results["elbo_importance"]
    anti = results["elbo"]
    for r in results.values():
        assert r["num_examples"] == 297 and r["num_time_samples"] == 4
        assert np.isfinite(r["bpd"]) and r["bpd_stderr"] > 0
    assert "bpd_mc_stderr" not in anti
    assert 0 < strat["bpd_mc_stderr"] and 0 < imp["bpd_mc_stderr"]
    # Same images and model: the estimates differ by Monte Carlo noise only.
    assert abs(strat["bpd"] - imp["bpd"]) < 4 * np.hypot(
        strat["bpd_mc_stderr"], imp["bpd_mc_stderr"]
    )
    assert abs(strat["bpd"] - anti["bpd"]) < 4 * np.hypot(strat["bpd_stderr"], anti["bpd_stderr"])
    # The prior term is exact, so every method gives the same value.
    np.testing.assert_allclose(strat["bpd_prior"], anti["bpd_prior"], rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("dequantization", ["uniform", "decoder"])
def test_ode_eval_reports_the_bound_and_its_cost(dequantization):
    config = tiny_config(
        **{
            "eval.method": "ode",
            "eval.ode_rtol": 1e-2,
            "eval.ode_atol": 1e-2,
            "eval.ode_dequantization": dequantization,
            "eval.ode_dequant_samples": 2 if dequantization == "decoder" else 1,
            "eval.batch_size": 300,
        }
    )
    exp, params = _perturbed_state(config)
    r = evaluate.Evaluator(exp)(params).record(step=0)
    assert r["method"] == "ode" and r["num_examples"] == 297
    assert np.isfinite(r["bpd"]) and r["bpd"] > 0
    assert r["num_function_evals"] > 6 and r["ode_rtol"] == 1e-2
    assert r["ode_dequantization"] == dequantization
    assert "bpd_diff" not in r  # the ODE gives one number, not ELBO terms
    if dequantization == "decoder":
        assert 0 <= r["bpd_recon"] < r["bpd"]
        # Two draws per image. The Monte Carlo error is at most the split's standard error
        # in expectation (equal when the images do not differ, nearly so for this untrained
        # model), and each is estimated from 297 images: 1.5x allows their noise.
        assert 0 < r["bpd_mc_stderr"] < 1.5 * r["bpd_stderr"]
    else:
        assert "bpd_recon" not in r
        assert "bpd_mc_stderr" not in r  # one draw per image: no Monte Carlo error


def test_eval_settings_are_validated():
    for overrides, field in (
        ({"eval.method": "ode", "model.timesteps": 10, "sample.num_steps": 10}, "eval.method"),
        ({"eval.method": "elbo_stratified", "eval.num_time_samples": 3}, "num_time_samples"),
        (
            {"eval.method": "elbo_importance", "model.timesteps": 10, "sample.num_steps": 10},
            "continuous-time",
        ),
        ({"eval.bogus": 1}, "eval.bogus is not a field"),
        ({"eval.method": "exact"}, "eval.method"),
        ({"eval.method": "ode", "eval.ode_rtol": 0.0}, r"config\.eval\.ode_rtol=0\.0 is out of"),
        (
            {"eval.method": "ode", "eval.ode_dequantization": "variational"},
            r"config\.eval\.ode_dequantization='variational' is not a known name",
        ),
        (
            {"eval.method": "elbo_importance", "eval.num_time_samples": 4, "eval.proposal_bins": 0},
            r"config\.eval\.proposal_bins=0 is out of range \(allowed: an integer >= 1\)",
        ),
        (
            {"eval.method": "ode", "eval.ode_importance_weighted": True},
            r"ode_importance_weighted=True needs config\.eval\.ode_dequant_samples >= 2",
        ),
        (
            {
                "eval.method": "ode",
                "eval.ode_importance_weighted": True,
                "eval.ode_dequant_samples": 4,
            },
            r"needs exact traces: with config\.eval\.ode_divergence='hutchinson'",
        ),
    ):
        with pytest.raises(config_validation.ConfigError, match=field):
            config_validation.validate(tiny_config(**overrides), num_devices=1, process_count=1)


def test_shifted_grid_elbo_is_unbiased_and_reports_its_monte_carlo_error():
    """Against the training estimator averaged over many keys (an independent code path):
    same mean over images; its per-image error matches the spread between two keys."""
    exp = experiment.build(
        tiny_config(**{"eval.method": "elbo_shifted", "eval.num_time_samples": 8}),
        jax.devices()[:1],
    )
    x = jax.random.randint(jax.random.key(0), (256, 2, 2, 1), 0, exp.info.vocab_size)
    eps_fn = exact_eps_fn(0.0, 0.6)  # Any denoiser: both estimate the same ELBO.

    def gamma_fn(t):
        return -13.3 + 18.3 * t

    @jax.jit
    def shifted(key):
        method = exp.eval_method
        return method.estimate(
            gamma_fn, eps_fn, x, key, None, loss=exp.loss, settings=exp.eval_settings
        )

    @jax.jit
    def training_estimator(key):
        terms = jax.vmap(
            lambda k: diffusion.vdm_terms(x, k, gamma_fn, eps_fn, vocab_size=exp.info.vocab_size)
        )(jax.random.split(key, 64))
        return diffusion.bits_per_dim(sum(terms.values()), 4)  # [64, N]

    a, b = shifted(jax.random.key(1)), shifted(jax.random.key(2))
    bpd = np.asarray(a.terms["bpd"], np.float64)
    terms = sum(np.asarray(a.terms[k], np.float64) for k in ("bpd_prior", "bpd_recon", "bpd_diff"))
    np.testing.assert_allclose(bpd, terms, rtol=1e-5)
    ref = np.asarray(training_estimator(jax.random.key(3)), np.float64)
    ref_se = ref.mean(axis=1).std(ddof=1) / np.sqrt(ref.shape[0])
    mc_se = np.sqrt(np.sum(np.asarray(a.mc_stderr, np.float64) ** 2)) / bpd.size
    assert abs(bpd.mean() - ref.mean()) < 4 * np.hypot(mc_se, ref_se)
    mc_var = np.mean((bpd - np.asarray(b.terms["bpd"], np.float64)) ** 2) / 2
    assert np.mean(np.asarray(a.mc_stderr, np.float64) ** 2) == pytest.approx(mc_var, rel=0.3)


@pytest.mark.parametrize("dequantization", ["truncated_normal", "decoder"])
def test_ode_eval_reports_the_importance_weighted_bound(dequantization):
    """``eval.ode_importance_weighted``: bpd is ode_bpd's importance-weighted bound over the
    draws (no Monte Carlo error), bpd_per_draw their mean; the first is the smaller."""
    settings = {
        "eval.method": "ode",
        "eval.ode_importance_weighted": True,
        "eval.ode_dequant_samples": 4,
        "eval.ode_dequantization": dequantization,
        "eval.ode_divergence": "exact",
        "eval.ode_rtol": 1e-4,
        "eval.ode_atol": 1e-4,
    }
    exp = experiment.build(tiny_config(**settings), jax.devices()[:1])
    x = jax.random.randint(jax.random.key(0), (3, 2, 2, 1), 0, exp.info.vocab_size)
    eps_fn = exact_eps_fn(0.0, 0.6)

    def gamma_fn(t):
        return -8.0 + 13.0 * t

    method = exp.eval_method
    assert method is eval_methods.EVAL_METHODS["ode"]
    key = jax.random.key(1)
    out = method.estimate(gamma_fn, eps_fn, x, key, None, loss=exp.loss, settings=exp.eval_settings)
    direct = ode_likelihood.ode_bpd(
        key,
        x,
        gamma_fn,
        eps_fn,
        vocab_size=exp.info.vocab_size,
        num_dequant_samples=4,
        dequantization=dequantization,
        divergence="exact",
        rtol=1e-4,
        atol=1e-4,
    )
    np.testing.assert_array_equal(out.terms["bpd"], direct.bpd_importance_weighted)
    np.testing.assert_array_equal(out.terms["bpd_per_draw"], direct.bpd)
    assert np.all(np.asarray(out.terms["bpd"]) < np.asarray(out.terms["bpd_per_draw"]))
    assert out.mc_stderr is None
    assert exp.eval_settings.as_dict()["ode_importance_weighted"] is True


@pytest.mark.parametrize("name", sorted(eval_methods.EVAL_METHODS))
def test_every_eval_method_keeps_its_declared_contract(name):
    """Per-image outputs [B] with the terms its settings declare, for any registry entry
    (traced only); the experiment holds the entry and its settings record, whose fields are
    what the results record."""
    method = eval_methods.EVAL_METHODS[name]
    exp = experiment.build(
        tiny_config(**{"eval.method": name, "eval.num_time_samples": 4}), jax.devices()[:1]
    )
    assert exp.eval_method is method and type(exp.eval_settings) is method.settings
    settings = exp.eval_settings
    x = jnp.zeros((6, 8, 8, 1), jnp.int32)
    eps_fn = exact_eps_fn(0.0, 0.6)

    def gamma_fn(t):
        return -13.3 + 18.3 * t

    def run(key):
        prepared = None
        if method.prepare is not None:
            prepared = method.prepare(gamma_fn, eps_fn, x, key, loss=exp.loss, settings=settings)
        return method.estimate(gamma_fn, eps_fn, x, key, prepared, loss=exp.loss, settings=settings)

    out = jax.eval_shape(run, jax.random.key(0))
    assert set(out.terms) == set(settings.term_names()) and "bpd" in out.terms
    for value in (*out.terms.values(), out.mc_stderr, out.num_function_evals):
        assert value is None or value.shape == (6,)
    evals = settings.network_evals_per_image()
    assert (evals is None) == (out.num_function_evals is not None)
    assert set(settings.as_dict()) <= config_validation.section_fields("eval")
