"""Training gradients: ELBO gradients by direct autodiff, variance gradients, variance reduction."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from gaussian import exact_eps_fn

from vdm_jax import diffusion, elbo_estimators, schedules
from vdm_jax import model as vdm_model

K, DIMS = 17, 16


# The schedule of these tests, and its declared split of the parameters.
MONOTONE = schedules.SCHEDULES["monotone_net"]


def _denoiser(params, z, gamma_t):
    """A small learnable denoiser whose output depends on z and gamma_t."""
    h = jnp.tanh(z @ params["w1"] + gamma_t[:, None] * params["wg"])
    return h @ params["w2"]


def _setup(seed=0, batch=32):
    keys = jax.random.split(jax.random.key(seed), 5)
    sched = schedules.MonotoneNetSchedule(width=32)
    s_params = sched.init(keys[0], jnp.zeros(()))["params"]
    s_params = jax.tree.map(lambda a, k=keys[1]: a + 0.3 * jax.random.normal(k, a.shape), s_params)
    d_params = {
        "w1": 0.3 * jax.random.normal(keys[2], (DIMS, 8)),
        "wg": 0.1 * jax.random.normal(keys[3], (8,)),
        "w2": 0.3 * jax.random.normal(keys[4], (8, DIMS)),
    }
    x = jax.random.randint(jax.random.key(seed + 100), (batch, DIMS), 0, K)
    return sched, s_params, d_params, x


def _direct_terms(sched, s_params, d_params, x, key, cfg):
    """Per-example bpd terms through the plain composable loss (independent of the vjp code)."""
    nats = diffusion.vdm_terms(
        x,
        key,
        lambda t: sched.apply({"params": s_params}, t),
        lambda z, g: _denoiser(d_params, z, g),
        vocab_size=cfg.vocab_size,
        timesteps=cfg.timesteps,
        antithetic_time=cfg.antithetic_time,
    )
    return {k: diffusion.bits_per_dim(v, DIMS) for k, v in nats.items()}


def assert_grads_close(got, want, rtol=1e-4):
    """Gradient trees equal to float32 rounding. Leaves share float32 sums with the largest
    gradient (the schedule's log_gamma_range, about 40), which round at about that times
    6e-8: a 0.02 leaf differed by 3e-6 between two exact paths on one host (1e-10 in
    float64). So the absolute tolerance is 1e-6 times the largest gradient, at least 1e-6."""
    scale = max(1.0, *(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(want)))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-6 * scale), got, want
    )


def _grads(sched, s_params, d_params, x, key, cfg):
    return vdm_model.loss_and_grads(
        lambda p, t: sched.apply({"params": p}, t), s_params, _denoiser, d_params, x, key, cfg
    )


@pytest.mark.parametrize("timesteps", [0, 10])
def test_elbo_gradients_equal_direct_autodiff(timesteps):
    sched, s_params, d_params, x = _setup()
    cfg = vdm_model.LossConfig(vocab_size=K, timesteps=timesteps)
    key = jax.random.key(7)
    (loss, _), (g_sched, g_net) = _grads(sched, s_params, d_params, x, key, cfg)

    def direct(sp, dp):
        return jnp.mean(sum(_direct_terms(sched, sp, dp, x, key, cfg).values()))

    want_loss, (want_sched, want_net) = jax.value_and_grad(direct, argnums=(0, 1))(
        s_params, d_params
    )
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    assert_grads_close(g_sched, want_sched)
    assert_grads_close(g_net, want_net)


@pytest.mark.parametrize("timesteps", [0, 10])
def test_variance_gradients(timesteps):
    """Interior: grad of mean L_diff^2; endpoints and denoiser: the plain ELBO gradient."""
    sched, s_params, d_params, x = _setup(seed=1)
    key = jax.random.key(3)
    elbo_cfg = vdm_model.LossConfig(vocab_size=K, timesteps=timesteps)
    var_cfg = vdm_model.LossConfig(
        vocab_size=K,
        timesteps=timesteps,
        schedule_grad="variance",
        variance_params=MONOTONE.variance_params,
    )
    (loss_e, _), (g_sched_e, g_net_e) = _grads(sched, s_params, d_params, x, key, elbo_cfg)
    (loss_v, _), (g_sched_v, g_net_v) = _grads(sched, s_params, d_params, x, key, var_cfg)

    assert loss_e == loss_v
    jax.tree.map(np.testing.assert_array_equal, g_net_e, g_net_v)  # denoiser untouched

    def second_moment(sp):
        d = _direct_terms(sched, sp, d_params, x, key, elbo_cfg)["diffusion"]
        return jnp.mean(jnp.square(d))

    want = jax.grad(second_moment)(s_params)
    for name in s_params:
        if name in MONOTONE.endpoint_params:
            np.testing.assert_array_equal(g_sched_v[name], g_sched_e[name])
        else:
            np.testing.assert_allclose(g_sched_v[name], want[name], rtol=1e-3, atol=1e-4)
            assert not np.allclose(g_sched_v[name], g_sched_e[name])


def test_variance_gradient_lowers_the_variance_and_keeps_the_mean():
    """Train only the interior on the variance gradient; the diffusion loss estimate's
    variance drops while its mean (fixed by the endpoints) stays within its standard error."""
    sched = schedules.MonotoneNetSchedule(width=64)
    s_params = sched.init(jax.random.key(0), jnp.zeros(()))["params"]
    spread = float(np.std(diffusion.encode(jnp.arange(K), K)))
    denoise = lambda p, z, g: exact_eps_fn(0.0, spread)(z, g)  # noqa: E731
    schedule_fn = lambda p, t: sched.apply({"params": p}, t)  # noqa: E731
    cfg = vdm_model.LossConfig(
        vocab_size=K,
        antithetic_time=False,
        schedule_grad="variance",
        variance_params=MONOTONE.variance_params,
    )

    def measure(p, n=50_000):
        x = jax.random.randint(jax.random.key(123), (n, DIMS), 0, K)
        (_, terms), _ = vdm_model.loss_and_grads(
            schedule_fn, p, denoise, {}, x, jax.random.key(5), cfg
        )
        d = np.asarray(terms["diffusion"], np.float64)
        return d.mean(), d.std() / np.sqrt(n), d.var()

    optimizer = optax.adam(1e-2)

    @jax.jit
    def step(p, opt_state, key):
        x = jax.random.randint(jax.random.fold_in(key, 1), (256, DIMS), 0, K)
        _, (g, _) = vdm_model.loss_and_grads(schedule_fn, p, denoise, {}, x, key, cfg)
        g = {k: jnp.zeros_like(v) if k in MONOTONE.endpoint_params else v for k, v in g.items()}
        updates, opt_state = optimizer.update(g, opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    mean_0, se_0, var_0 = measure(s_params)
    opt_state = optimizer.init(s_params)
    for i in range(300):
        s_params, opt_state = step(s_params, opt_state, jax.random.key(1000 + i))
    mean_1, se_1, var_1 = measure(s_params)
    assert var_1 < 0.7 * var_0, (var_0, var_1)
    assert abs(mean_1 - mean_0) < 4 * np.hypot(se_0, se_1), (mean_0, mean_1)


def test_loss_config_rejects_bad_values():
    with pytest.raises(ValueError, match="schedule_grad"):
        vdm_model.LossConfig(vocab_size=K, schedule_grad="adam")
    with pytest.raises(ValueError, match="timesteps"):
        vdm_model.LossConfig(vocab_size=K, timesteps=-1)
    with pytest.raises(ValueError, match="vocab_size"):
        vdm_model.LossConfig(vocab_size=1)


@pytest.mark.slow
def test_bfloat16_network_keeps_the_loss_math_in_float32():
    """Mixed precision: the U-Net computes in bfloat16, the ELBO and gradients stay float32."""
    from vdm_jax import unet

    x = jax.random.randint(jax.random.key(0), (8, 8, 8, 1), 0, K)
    batch = {"image": x}
    cfg = vdm_model.LossConfig(vocab_size=K)
    results = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        vdm = vdm_model.VDM(
            schedules.make_schedule("learned_linear"),
            unet.ScoreUNet(num_blocks=1, channels=16, num_groups=4, dropout_rate=0.0, dtype=dtype),
        )
        params = jax.jit(vdm.init)(jax.random.key(1), jnp.zeros(x.shape), jnp.zeros(8))["params"]
        # Make the output non-zero (the last conv starts at zero) so the network matters.
        params = jax.tree.map(lambda p: p + 0.02, params)
        (loss, _), grads = jax.jit(
            lambda p, vdm=vdm: vdm_model.vdm_loss_and_grads(vdm, p, batch, jax.random.key(2), cfg)
        )(params)
        assert loss.dtype == jnp.float32
        assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
        results[dtype] = float(loss)
    np.testing.assert_allclose(results[jnp.bfloat16], results[jnp.float32], rtol=1e-2)


def test_a_uniform_proposal_gives_the_uniform_time_gradients():
    sched, s_params, d_params, x = _setup(seed=4)
    cfg = vdm_model.LossConfig(
        vocab_size=K, schedule_grad="variance", variance_params=MONOTONE.variance_params
    )
    key = jax.random.key(2)
    plain = _grads(sched, s_params, d_params, x, key, cfg)
    uniform = elbo_estimators.uniform_proposal(32)
    proposed = vdm_model.loss_and_grads(
        lambda p, t: sched.apply({"params": p}, t),
        s_params,
        _denoiser,
        d_params,
        x,
        key,
        cfg,
        uniform,
    )
    assert_grads_close(proposed[1], plain[1])
    np.testing.assert_allclose(proposed[0][1]["time_density"], 1.0, rtol=1e-6)


def test_a_fitted_time_proposal_keeps_the_mean_and_lowers_the_variance():
    """Times from q(t) fitted on a pilot, weights divided by q: the diffusion estimate keeps
    its mean (within standard errors) and its variance drops, as VDM++'s adaptive
    importance distribution promises; the learned-schedule-free way to the same end."""
    sched = schedules.FixedLinearSchedule()
    spread = float(np.std(diffusion.encode(jnp.arange(K), K)))
    denoise = lambda p, z, g: exact_eps_fn(0.0, spread)(z, g)  # noqa: E731
    schedule_fn = lambda p, t: sched.apply({"params": {}}, t)  # noqa: E731
    cfg = vdm_model.LossConfig(vocab_size=K, antithetic_time=False)
    x = jax.random.randint(jax.random.key(8), (50_000, DIMS), 0, K)

    def measure(proposal):
        (_, terms), _ = vdm_model.loss_and_grads(
            schedule_fn, {}, denoise, {}, x, jax.random.key(9), cfg, proposal
        )
        d = np.asarray(terms["diffusion"], np.float64)
        return d.mean(), d.std() / np.sqrt(d.size), d.var()

    pilot = elbo_estimators.diffusion_loss_samples(
        jax.random.key(10),
        diffusion.encode(x[:2000], K),
        lambda t: schedule_fn({}, t),
        lambda z, g: denoise({}, z, g),
        num_samples=8,
    )
    fitted = elbo_estimators.fit_proposal(pilot.t, pilot.integrand)
    mean_u, se_u, var_u = measure(None)
    mean_q, se_q, var_q = measure(fitted)
    assert abs(mean_q - mean_u) < 4 * np.hypot(se_u, se_q), (mean_u, mean_q)
    assert var_q < 0.5 * var_u, (var_u, var_q)
