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
    """From the entry alone: its default settings build it; non-decreasing for random
    parameters, of the declared shape (``per_dimension``); the declared parameter names
    exist; moving every parameter but ``endpoint_params`` (or only ``variance_params``)
    leaves gamma(0) and gamma(1) exactly where they were; without endpoint parameters,
    moving the others moves them."""
    kind = schedules.SCHEDULES[name]
    module = kind.build(kind.settings(), image_shape=(2, 3, 1))
    params = module.init(jax.random.key(0), T_GRID)
    for seed in range(3):
        noisy = _randomise(params, seed, 1.0)
        gamma = np.asarray(module.apply(noisy, T_GRID))
        assert gamma.shape == ((len(T_GRID), 2, 3, 1) if kind.per_dimension else T_GRID.shape)
        assert np.all(np.diff(gamma, axis=0) >= 0), name
    names = {path[-1].key for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert (kind.endpoint_params is None) == (kind.variance_params is None), name
    if kind.endpoint_params is not None:
        assert kind.endpoint_params | kind.variance_params <= names, name
        assert not kind.endpoint_params & kind.variance_params, name
    if not names:
        return  # A fixed schedule: nothing to split.

    def moved(keep):
        def pick(path, leaf, noisy_leaf):
            return leaf if keep(path[-1].key) else noisy_leaf

        return jax.tree_util.tree_map_with_path(pick, params, _randomise(params, 7, 1.0))

    ends = jnp.array([0.0, 1.0])

    def same_ends(p):
        return np.allclose(module.apply(p, ends), module.apply(params, ends), atol=1e-5)

    declared = kind.endpoint_params or frozenset()
    assert same_ends(moved(lambda n: n in declared)) == (kind.endpoint_params is not None), name
    if kind.variance_params:
        assert same_ends(moved(lambda n: n not in kind.variance_params)), name


def test_learned_cosine_is_improved_ddpm_between_its_endpoints():
    """At its initial endpoints the schedule is -log SNR of Nichol & Dhariwal's
    alpha_bar(tau) = cos^2(((tau + s) / (1 + s)) pi / 2) / cos^2(s / (1 + s) pi / 2) on the
    tau interval from gamma_min to gamma_max (found here by bisection of the closed form, in
    float64); moved endpoints map it affinely; strictly increasing for any parameters."""
    s, lo, hi = 0.008, -13.3, 5.0

    def gamma_nd(tau):  # float64 closed form
        f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
        alpha_bar = f(tau) / f(0.0)
        return np.log1p(-alpha_bar) - np.log(alpha_bar)

    def solve(target):
        a, b = 1e-12, 1.0 - 1e-12
        for _ in range(200):
            mid = 0.5 * (a + b)
            a, b = (mid, b) if gamma_nd(mid) < target else (a, mid)
        return 0.5 * (a + b)

    tau_0, tau_1 = solve(lo), solve(hi)
    assert schedules.cosine_time(lo, s) == pytest.approx(tau_0, rel=1e-9)
    assert schedules.cosine_time(hi, s) == pytest.approx(tau_1, rel=1e-9)
    t = np.linspace(0.0, 1.0, 257)
    want = gamma_nd(tau_0 + (tau_1 - tau_0) * t)
    module, params = _init("learned_cosine", gamma_min=lo, gamma_max=hi, s=s)
    gamma = np.asarray(module.apply(params, jnp.asarray(t, jnp.float32)), np.float64)
    np.testing.assert_allclose(gamma, want, atol=2e-4)
    np.testing.assert_allclose(gamma[[0, -1]], [lo, hi], atol=1e-5)
    moved = {"params": {"gamma_min": jnp.array(-9.0), "log_gamma_range": jnp.log(12.0)}}
    gamma = np.asarray(module.apply(moved, jnp.asarray(t, jnp.float32)), np.float64)
    np.testing.assert_allclose(gamma, -9.0 + 12.0 * (want - lo) / (hi - lo), atol=2e-4)
    np.testing.assert_allclose(gamma[[0, -1]], [-9.0, 3.0], atol=1e-5)
    # s = 0: the plain cosine schedule, gamma = 2 log tan(pi tau / 2).
    tau = np.linspace(0.01, 0.99, 99)
    np.testing.assert_allclose(
        schedules.cosine_gamma(jnp.asarray(tau, jnp.float32), 0.0),
        2 * np.log(np.tan(np.pi * tau / 2)),
        rtol=1e-5,
        atol=1e-5,
    )
    for seed in range(5):
        noisy = _randomise(params, seed, 2.0)
        _, dgamma = schedules.gamma_and_derivative(lambda u, p=noisy: module.apply(p, u), T_GRID)
        assert np.all(np.asarray(dgamma) > 0)
