"""Schedules: monotone for any parameters, exact endpoints, derivatives, stable helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdm_jax import schedules

T_GRID = jnp.linspace(0.0, 1.0, 513)


def _init(name: str, **kwargs):
    module = schedules.make_schedule(name, **kwargs)
    return module, module.init(jax.random.key(0), T_GRID)


def _randomise(params, seed: int, scale: float):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [
        leaf + scale * jax.random.normal(k, leaf.shape)
        for leaf, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, noisy)


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(["learned_linear", "monotone_net"]),
    seed=st.integers(0, 2**30),
    scale=st.floats(0.1, 5.0),
)
def test_strictly_increasing_for_random_parameters(name, seed, scale):
    module, params = _init(name, **({"width": 64} if name == "monotone_net" else {}))
    params = _randomise(params, seed, scale)
    gamma, dgamma = jax.jvp(lambda t: module.apply(params, t), (T_GRID,), (jnp.ones_like(T_GRID),))
    assert np.all(np.isfinite(gamma))
    assert np.all(np.diff(np.asarray(gamma)) >= 0.0)
    assert np.all(np.asarray(dgamma) > 0.0)


@pytest.mark.parametrize("name", ["learned_linear", "monotone_net"])
def test_endpoints_are_the_parameters(name):
    module, params = _init(name)
    params = _randomise(params, 3, 1.0)
    p = params["params"]
    gamma_0, gamma_1 = module.apply(params, jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(gamma_0, p["gamma_min"], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(
        gamma_1, p["gamma_min"] + np.exp(p["log_gamma_range"]), rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize("name", ["fixed_linear", "learned_linear", "monotone_net"])
def test_initial_endpoints_match_the_paper(name):
    module, params = _init(name)
    gamma = module.apply(params, jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(gamma, [-13.3, 5.0], atol=1e-4)


def test_derivative_matches_finite_differences():
    module, params = _init("monotone_net", width=128)
    params = _randomise(params, 7, 1.0)
    t = jnp.linspace(0.05, 0.95, 19)
    _, dgamma = schedules.gamma_and_derivative(lambda u: module.apply(params, u), t)
    h = 1e-3
    fd = (module.apply(params, t + h) - module.apply(params, t - h)) / (2 * h)
    np.testing.assert_allclose(dgamma, fd, rtol=2e-2, atol=2e-2)


def test_helpers_are_accurate_in_float32_far_outside_the_paper_range():
    g64 = np.linspace(-40.0, 40.0, 321)
    g = jnp.asarray(g64, jnp.float32)
    ref_alpha2 = 1.0 / (1.0 + np.exp(g64))  # float64 reference
    ref_sigma2 = 1.0 / (1.0 + np.exp(-g64))
    np.testing.assert_allclose(schedules.alpha2(g), ref_alpha2, rtol=1e-5)
    np.testing.assert_allclose(schedules.sigma2(g), ref_sigma2, rtol=1e-5)
    np.testing.assert_allclose(schedules.log_alpha2(g), np.log(ref_alpha2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(schedules.log_sigma2(g), np.log(ref_sigma2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(schedules.snr(g), np.exp(-g64), rtol=1e-5)
    np.testing.assert_allclose(schedules.log_snr(g), -g64, rtol=1e-6)


def test_fixed_linear_has_no_parameters_and_bad_settings_raise():
    _, params = _init("fixed_linear")
    assert jax.tree.leaves(params) == []
    with pytest.raises(ValueError, match="gamma_max > gamma_min"):
        schedules.FixedLinearSchedule(gamma_min=1.0, gamma_max=-1.0)
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        schedules.make_schedule("cosine")


@pytest.mark.parametrize("name", sorted(schedules.SCHEDULES))
def test_every_registered_schedule_keeps_its_declared_properties(name):
    """Non-decreasing for random parameters; ``splits_endpoints``: the interior parameters
    leave gamma(0) and gamma(1) exactly where the endpoint parameters put them."""
    kind = schedules.SCHEDULES[name]
    module = kind.build(-13.3, 5.0, width=16, event_shape=(2, 3, 1))
    if not kind.per_dimension:
        assert (getattr(module, "width", None) == 16) == kind.takes_width
    params = module.init(jax.random.key(0), T_GRID)
    for seed in range(3):
        noisy = _randomise(params, seed, 1.0)
        gamma = np.asarray(module.apply(noisy, T_GRID))
        assert gamma.shape == ((len(T_GRID), 2, 3, 1) if kind.per_dimension else T_GRID.shape)
        assert np.all(np.diff(gamma, axis=0) >= 0), name
    if not jax.tree.leaves(params):
        return  # A fixed schedule: nothing to split.

    def interior_only(path, leaf, noisy_leaf):
        return leaf if path[-1].key in schedules.ENDPOINT_PARAMS else noisy_leaf

    moved = jax.tree_util.tree_map_with_path(interior_only, params, _randomise(params, 7, 1.0))
    ends = jnp.array([0.0, 1.0])
    same = np.allclose(module.apply(moved, ends), module.apply(params, ends), atol=1e-5)
    assert same == kind.splits_endpoints, name
