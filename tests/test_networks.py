"""The score-network contract, checked for every network, and the multi-resolution U-Net's
own structure.

Every network maps ``(z [B, H, W, C], gamma_t, label, context)`` to ``[B, H, W, C * n]``
float32, is exactly zero at initialisation, reads gamma_t, the label, the auxiliary latent and
a per-dimension gamma map, drops out only in training, and keeps its function under bfloat16
compute and rematerialisation.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax import multires_unet, unet

B = 2
NETWORKS = {
    "unet": lambda **kw: unet.ScoreUNet(num_blocks=1, channels=32, dropout_rate=0.1, **kw),
    "multires_unet": lambda **kw: multires_unet.MultiResUNet(
        channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        dropout_rate=0.1,
        **kw,
    ),
}


def _inputs(c: int = 1, size: int = 8, num_classes: int = 0, seed: int = 0):
    kz, kg, kl = jax.random.split(jax.random.key(seed), 3)
    z = jax.random.normal(kz, (B, size, size, c))
    gamma = jax.random.uniform(kg, (B,), minval=-13.3, maxval=5.0)
    label = jax.random.randint(kl, (B,), 0, num_classes) if num_classes else None
    return z, gamma, label


def _shapes(model, z, gamma, label=None, **kwargs):
    init = lambda: model.init(jax.random.key(0), z, gamma, label, train=False, **kwargs)  # noqa: E731
    return jax.eval_shape(init)["params"]


def _random_params(model, z, gamma, label=None, seed: int = 1, **kwargs):
    """Random parameters with nothing zero (kernels ~ N(0, 1/fan_in), the rest N(0, 0.01)),
    so no zero-initialised layer hides an input."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        fan_in = math.prod(x.shape[:-1]) if path[-1].key == "kernel" else 100
        return jnp.asarray(rng.standard_normal(x.shape) / math.sqrt(fan_in), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, _shapes(model, z, gamma, label, **kwargs))


def _apply(model, params, z, gamma, label=None, rng=None, **kwargs):
    rngs = None if rng is None else {"dropout": rng}
    return model.apply(
        {"params": params}, z, gamma, label, train=rng is not None, rngs=rngs, **kwargs
    )


@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize("outputs", [1, 2])
def test_shape_dtype_and_zero_at_init(name, outputs):
    model = NETWORKS[name](num_classes=3, outputs_per_channel=outputs)
    z, gamma, label = _inputs(c=3, num_classes=3)
    params = jax.jit(lambda key: model.init(key, z, gamma, label, train=False)["params"])(
        jax.random.key(0, impl="rbg")
    )
    out = _apply(model, params, z, gamma, label)
    assert out.shape == (B, 8, 8, 3 * outputs) and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, 0.0)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_reads_gamma_label_context_and_a_per_dimension_gamma(name):
    model = NETWORKS[name](num_classes=4)
    z, gamma, label = _inputs(num_classes=4)
    context = jax.random.normal(jax.random.key(5), (B, 3))
    params = _random_params(model, z, gamma, label, context=context)
    out = _apply(model, params, z, gamma, label, context=context)
    assert np.abs(out).mean() > 1e-3 and np.all(np.isfinite(out))
    changed = {
        "gamma": _apply(model, params, z, gamma + 1.0, label, context=context),
        "label": _apply(model, params, z, gamma, (label + 1) % 4, context=context),
        "context": _apply(model, params, z, gamma, label, context=context + 1.0),
    }
    for what, other in changed.items():
        assert np.abs(out - other).max() > 1e-4, what
    # A scalar gamma broadcasts over the batch.
    np.testing.assert_allclose(
        _apply(model, params, z, gamma[0], label, context=context),
        _apply(model, params, z, jnp.full((B,), gamma[0]), label, context=context),
        rtol=1e-6,
    )
    # Per dimension: the map enters conv_in (C more inputs); a constant map is not a scalar.
    gamma_map = jnp.broadcast_to(gamma[:, None, None, None], z.shape)
    per_dim = NETWORKS[name](num_classes=4)
    params_map = _random_params(per_dim, z, gamma_map, label, context=context)
    assert params_map["conv_in"]["kernel"].shape[2] == params["conv_in"]["kernel"].shape[2] + 1
    base = _apply(per_dim, params_map, z, gamma_map, label, context=context)
    bumped = gamma_map.at[:, 0, 0, 0].add(2.0)
    other = _apply(per_dim, params_map, z, bumped, label, context=context)
    assert np.abs(base - other).max() > 1e-5


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_dropout_only_in_training_and_remat_keeps_the_function(name):
    model = NETWORKS[name]()
    z, gamma, _ = _inputs()
    params = _random_params(model, z, gamma)
    evaluated = _apply(model, params, z, gamma)
    train_a = _apply(model, params, z, gamma, rng=jax.random.key(0))
    train_b = _apply(model, params, z, gamma, rng=jax.random.key(1))
    assert np.abs(train_a - train_b).max() > 1e-4 and np.abs(train_a - evaluated).max() > 1e-4

    remat = model.clone(remat=True)

    def loss(params, m):
        out = m.apply({"params": params}, z, gamma, train=False)
        return jnp.sum(jnp.square(out - z))

    g0 = jax.grad(loss)(params, model)
    g1 = jax.grad(loss)(params, remat)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_bfloat16_compute_stays_close_with_float32_parameters(name):
    z, gamma, _ = _inputs(c=3)
    model32 = NETWORKS[name]()
    model16 = NETWORKS[name](dtype=jnp.bfloat16)
    shapes = _shapes(model16, z, gamma)
    assert shapes == _shapes(model32, z, gamma)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(shapes))
    params = _random_params(model32, z, gamma)
    out32, out16 = _apply(model32, params, z, gamma), _apply(model16, params, z, gamma)
    assert out16.dtype == jnp.float32
    assert np.linalg.norm(out16 - out32) / np.linalg.norm(out32) < 0.03


def test_multires_stages_widths_and_attention():
    model = multires_unet.MultiResUNet(
        channels=8, channel_mult=(1, 2, 4), num_res_blocks=2, attention_resolutions=(7,)
    )
    z, gamma, _ = _inputs(size=28)
    params = _shapes(model, z, gamma)
    # Stage i runs at 28 / 2^i with 8 * mult[i] channels; attention only at 7x7.
    assert params["down_0_0"]["conv_0"]["kernel"].shape[-1] == 8
    assert params["down_1_1"]["conv_0"]["kernel"].shape[-1] == 16
    assert params["down_2_0"]["conv_0"]["kernel"].shape[-1] == 32
    assert {"downsample_0", "downsample_1", "upsample_1", "upsample_2"} <= set(params)
    assert "downsample_2" not in params and "upsample_0" not in params
    attention = sorted(k for k in params if "attn" in k)
    assert attention == [
        "down_2_attn_0",
        "down_2_attn_1",
        "mid_attn",
        "up_2_attn_0",
        "up_2_attn_1",
        "up_2_attn_2",
    ]
    assert all(f"up_{i}_{j}" in params for i in range(3) for j in range(3))


def test_multires_refuses_images_that_do_not_halve():
    model = multires_unet.MultiResUNet(channels=8, channel_mult=(1, 2, 2, 2))
    z, gamma, _ = _inputs(size=28)  # 28 -> 14 -> 7 -> 3.5
    with pytest.raises(ValueError, match=r"28x28 do not halve 3 times.*divide by 8"):
        _shapes(model, z, gamma)
    with pytest.raises(ValueError, match="num_res_blocks >= 1"):
        _shapes(multires_unet.MultiResUNet(channels=8, num_res_blocks=0), *_inputs(size=28)[:2])
