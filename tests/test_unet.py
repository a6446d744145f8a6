"""Tests of the score U-Net: shapes, dtypes, parameter counts, conditioning, dropout, remat."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax import unet

B, H, W = 2, 8, 8
TINY = dict(num_blocks=2, channels=32, dropout_rate=0.1)


def _inputs(c: int, num_classes: int = 0, seed: int = 0):
    kz, kg, kl = jax.random.split(jax.random.key(seed), 3)
    z = jax.random.normal(kz, (B, H, W, c))
    gamma = jax.random.uniform(kg, (B,), minval=-13.3, maxval=5.0)
    label = jax.random.randint(kl, (B,), 0, num_classes) if num_classes else None
    return z, gamma, label


def _shapes(model: unet.ScoreUNet, z, gamma, label):
    """The parameter tree as ``jax.ShapeDtypeStruct``s: tracing only, no compilation."""
    init = lambda: model.init(jax.random.key(0), z, gamma, label, train=False)  # noqa: E731
    return jax.eval_shape(init)["params"]


def _random_params(model: unet.ScoreUNet, z, gamma, label, seed: int = 1):
    """Random parameters with nothing zero, so no zero-initialised layer hides an input.

    Kernels ~ N(0, 1 / fan_in), every other leaf ~ N(0, 0.1^2). Drawn with numpy: on CPU,
    compiling an initialiser per parameter shape costs far more than the tiny models run.
    """
    rng = np.random.default_rng(seed)

    def draw(path, x):
        fan_in = math.prod(x.shape[:-1]) if path[-1].key == "kernel" else 100
        return jnp.asarray(rng.standard_normal(x.shape) / math.sqrt(fan_in), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, _shapes(model, z, gamma, label))


def _apply(model: unet.ScoreUNet, params, z, gamma, label=None, rng=None):
    """Eager apply: on CPU, tiny models run faster op by op than they compile under jit."""
    rngs = None if rng is None else {"dropout": rng}
    return model.apply({"params": params}, z, gamma, label, train=rng is not None, rngs=rngs)


@pytest.mark.parametrize(
    ("c", "num_classes", "attention", "extra"),
    [
        (1, 0, "middle", {}),
        (3, 5, "all", {}),
        (1, 10, "middle", dict(channels=24, fourier_features=False)),  # 6 groups
        (3, 0, "all", dict(fourier_min_exp=0, fourier_max_exp=3)),
    ],
)
def test_output_shape_dtype(c, num_classes, attention, extra):
    model = unet.ScoreUNet(**{**TINY, **extra}, num_classes=num_classes, attention=attention)
    z, gamma, label = _inputs(c, num_classes)
    params = _shapes(model, z, gamma, label)
    assert {"conv_in", "down_0", "down_1", "mid_res_0", "mid_attn", "mid_res_1"} <= set(params)
    assert {"up_0", "up_1", "up_2", "norm_out", "conv_out", "cond_dense_0"} <= set(params)
    assert ("label_embed" in params) == (num_classes > 0)
    assert ("down_attn_0" in params) == (attention == "all")
    assert "up_3" not in params and "down_2" not in params
    params = _random_params(model, z, gamma, label)
    for rng in (None, jax.random.key(2)):  # eval, train
        out = _apply(model, params, z, gamma, label, rng)
        assert out.shape == z.shape and out.dtype == jnp.float32
        assert np.all(np.isfinite(out))
    # A scalar gamma_t broadcasts over the batch.
    scalar = _apply(model, params, z, gamma[0], label)
    np.testing.assert_array_equal(scalar, _apply(model, params, z, jnp.full((B,), gamma[0]), label))


@pytest.mark.parametrize("preset", [unet.cifar10_unet, unet.imagenet64_unet])
def test_preset_param_counts_match_docstrings(preset):
    model = preset()
    z, gamma, _ = _inputs(3)
    shapes = _shapes(model, z[:1], gamma[:1], None)
    n = f"{unet.count_params(shapes):,}"
    assert n in preset.__doc__, n
    assert n in unet.ScoreUNet.__doc__, n
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(shapes))


def test_presets_take_overrides():
    model = unet.cifar10_unet(num_classes=3, dtype=jnp.bfloat16)
    assert (model.num_blocks, model.channels, model.dropout_rate) == (32, 128, 0.1)
    assert model.num_classes == 3 and model.dtype == jnp.bfloat16
    assert unet.imagenet64_unet().num_blocks == 64 and unet.imagenet64_unet().channels == 256


def test_count_params():
    assert unet.count_params({"a": jnp.zeros((2, 3)), "b": [jnp.zeros(4)]}) == 10


@pytest.mark.parametrize(
    ("channels", "groups"), [(128, 32), (256, 32), (32, 8), (48, 12), (24, 6), (6, 1), (3, 1)]
)
def test_group_norm_groups(channels, groups):
    assert unet._num_groups(32, channels, unet.MIN_GROUP_SIZE) == groups


def _group_norm_reference(x, scale, bias, groups, eps=1e-6, xp=np):
    """Textbook GroupNorm: two-pass variance over each group's entries. With ``xp=np`` in
    float64; ``xp=jnp`` keeps the input's dtype and is differentiable."""
    x = np.asarray(x, np.float64) if xp is np else x
    g = x.reshape(x.shape[0], -1, groups, x.shape[-1] // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = xp.square(g - mean).mean(axis=(1, 3), keepdims=True)
    return ((g - mean) / xp.sqrt(var + eps)).reshape(x.shape) * scale + bias


@pytest.mark.parametrize(
    ("shape", "groups"), [((3, 5, 4, 16), 4), ((2, 7, 12), 3), ((2, 6, 6, 8), 8)]
)
def test_group_norm_matches_float64_and_flax(shape, groups):
    import flax.linen as nn

    rng = np.random.default_rng(0)
    # A per-example offset, so the variance is not the second moment.
    x = rng.standard_normal(shape) * 2.0 + rng.standard_normal(
        (shape[0],) + (1,) * (len(shape) - 1)
    )
    scale, bias = 1.0 + 0.3 * rng.standard_normal(shape[-1]), 0.3 * rng.standard_normal(shape[-1])
    x, scale, bias = (np.asarray(a, np.float32) for a in (x, scale, bias))
    ours = unet.group_norm(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias), groups)
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(ours, _group_norm_reference(x, scale, bias, groups), atol=2e-5)

    # The module has flax.linen.GroupNorm's parameters, and its gradients.
    params = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
    weights = jnp.asarray(rng.standard_normal(shape), jnp.float32)

    def loss(module, params, x):
        return jnp.sum(module.apply(params, x) * weights)

    flax_norm, our_norm = nn.GroupNorm(num_groups=groups), unet.GroupNorm(num_groups=groups)
    assert jax.tree.map(jnp.shape, our_norm.init(jax.random.key(0), x)) == jax.tree.map(
        jnp.shape, flax_norm.init(jax.random.key(0), x)
    )
    grads = [jax.grad(loss, argnums=(1, 2))(m, params, x) for m in (our_norm, flax_norm)]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))


def test_group_norm_dtype_and_bad_groups():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8)).astype(jnp.bfloat16)
    norm = unet.GroupNorm(num_groups=2, dtype=jnp.bfloat16)
    params = norm.init(jax.random.key(1), x)
    assert params["params"]["scale"].dtype == jnp.float32
    out = norm.apply(params, x)
    assert out.dtype == jnp.bfloat16
    ref = _group_norm_reference(np.asarray(x, np.float32), 1.0, 0.0, 2)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.03)
    with pytest.raises(ValueError, match="3 groups do not divide 8 channels"):
        unet.group_norm(x, jnp.ones(8), jnp.zeros(8), 3)


def test_group_norm_shift_and_swish_values_gradients_and_residuals():
    rng = np.random.default_rng(3)
    shape, groups = (2, 5, 4, 12), 3
    x = jnp.asarray(rng.standard_normal(shape) * 1.5 + 0.7, jnp.float32)
    shift = jnp.asarray(rng.standard_normal((2, 12)), jnp.float32)
    scale = jnp.asarray(1.0 + 0.3 * rng.standard_normal(12), jnp.float32)
    bias = jnp.asarray(0.3 * rng.standard_normal(12), jnp.float32)
    args = (x, shift, scale, bias)
    weights = jnp.asarray(rng.standard_normal(shape), jnp.float32)

    def ours(x, shift, scale, bias):
        return unet.group_norm(x, scale, bias, groups, shift=shift, swish=True)

    # Values against float64 numpy with the shift added explicitly.
    y64 = _group_norm_reference(
        np.asarray(x, np.float64) + np.asarray(shift, np.float64)[:, None, None],
        np.asarray(scale, np.float64),
        np.asarray(bias, np.float64),
        groups,
    )
    np.testing.assert_allclose(ours(*args), y64 / (1.0 + np.exp(-y64)), atol=2e-5)

    # Gradients of all four inputs against autodiff of the direct formula (x + shift formed).
    def direct(x, shift, scale, bias):
        u = x + shift[:, None, None]
        return jax.nn.silu(_group_norm_reference(u, scale, bias, groups, xp=jnp))

    loss = lambda f: lambda *a: jnp.sum(f(*a) * weights)  # noqa: E731
    got = jax.grad(loss(ours), argnums=(0, 1, 2, 3))(*args)
    want = jax.grad(loss(direct), argnums=(0, 1, 2, 3))(*args)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))

    # Forward mode works (the ODE likelihood needs it) and agrees with central differences.
    tangents = tuple(jnp.asarray(rng.standard_normal(a.shape), jnp.float32) for a in args)
    _, jvp = jax.jvp(loss(ours), args, tangents)
    eps = 1e-2
    plus = loss(ours)(*(a + eps * t for a, t in zip(args, tangents, strict=True)))
    minus = loss(ours)(*(a - eps * t for a, t in zip(args, tangents, strict=True)))
    np.testing.assert_allclose(jvp, (plus - minus) / (2 * eps), rtol=2e-3)
    np.testing.assert_allclose(
        jvp, sum(jnp.sum(g * t) for g, t in zip(got, tangents, strict=True)), rtol=1e-4
    )

    # The backward pass keeps x and [B, C] sums, not the normalised values or their sigmoid.
    def full_size_residuals(f):
        res = jax.eval_shape(lambda *a: jax.vjp(f, *a)[1], *args)
        return sum(leaf.shape == shape for leaf in jax.tree.leaves(res))

    assert full_size_residuals(ours) == 1
    assert full_size_residuals(direct) >= 3


@pytest.mark.parametrize(("widths", "groups"), [((8, 8), 4), ((6, 10), 8), ((4, 4, 8), 2)])
def test_group_norm_of_parts_is_group_norm_of_concatenation(widths, groups):
    # (6, 10) in 8 groups of 2 aligns with the parts; (4, 4, 8) in 2 groups of 8 does not.
    keys = jax.random.split(jax.random.key(0), len(widths) + 2)
    parts = [jax.random.normal(k, (2, 3, 3, w)) + 1.0 for k, w in zip(keys, widths, strict=False)]
    params = {
        "params": {
            "scale": 1.0 + 0.2 * jax.random.normal(keys[-2], (sum(widths),)),
            "bias": 0.2 * jax.random.normal(keys[-1], (sum(widths),)),
        }
    }
    whole = unet.GroupNorm(num_groups=groups).apply(params, jnp.concatenate(parts, axis=-1))
    split = unet.PartsGroupNorm(num_groups=groups).apply(params, parts)
    assert isinstance(split, list) and [p.shape[-1] for p in split] == list(widths)
    np.testing.assert_allclose(jnp.concatenate(split, axis=-1), whole, atol=1e-5)


@pytest.mark.parametrize("kernel_size", [(3, 3), ()])
def test_parts_linear_matches_flax_on_concatenation(kernel_size):
    import flax.linen as nn

    keys = jax.random.split(jax.random.key(1), 3)
    parts = [jax.random.normal(keys[0], (2, 5, 5, 4)), jax.random.normal(keys[1], (2, 5, 5, 6))]
    whole = jnp.concatenate(parts, axis=-1)
    layer = unet.PartsLinear(7, kernel_size)
    flax_layer = nn.Conv(7, kernel_size) if kernel_size else nn.Dense(7)
    params = layer.init(keys[2], parts)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, flax_layer.init(keys[2], whole)
    )
    params = jax.tree.map(lambda p: p + 0.1, params)  # A non-zero bias.
    np.testing.assert_allclose(
        layer.apply(params, parts), flax_layer.apply(params, whole), rtol=1e-5, atol=1e-5
    )
    # The split-bias variant: same parameters, the bias returned instead of added.
    no_bias, bias = unet.PartsLinearSplitBias(7, kernel_size).apply(params, parts)
    np.testing.assert_array_equal(bias, params["params"]["bias"])
    np.testing.assert_allclose(
        no_bias + bias, flax_layer.apply(params, whole), rtol=1e-5, atol=1e-5
    )
    half = unet.PartsLinear(7, kernel_size, dtype=jnp.bfloat16).apply(params, parts)
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(half, np.float32), flax_layer.apply(params, whole), rtol=0.05, atol=0.05
    )


def test_res_block_on_parts_equals_block_on_concatenation():
    """Same function and gradients; the input gradient also against finite differences."""
    keys = jax.random.split(jax.random.key(2), 4)
    h, skip = jax.random.normal(keys[0], (2, 4, 4, 8)), jax.random.normal(keys[1], (2, 4, 4, 8))
    cond = jax.random.normal(keys[2], (2, 32))
    block = unet.ResBlock(8, 0.0, 4, jnp.float32)
    params = block.init(keys[3], [h, skip], cond, False)
    # conv_1 starts at zero: perturb every parameter so each path matters.
    params = jax.tree.map(lambda p: p + 0.05 * jnp.cos(jnp.arange(p.size).reshape(p.shape)), params)
    weights = jnp.sin(jnp.arange(2 * 4 * 4 * 8).reshape(2, 4, 4, 8))

    def loss(params, h, skip, as_parts):
        x = [h, skip] if as_parts else [jnp.concatenate([h, skip], axis=-1)]
        return jnp.sum(block.apply(params, x, cond, True) * weights)  # No dropout: rate 0.

    grads = [jax.grad(loss, argnums=(0, 1, 2))(params, h, skip, p) for p in (True, False)]
    np.testing.assert_allclose(loss(params, h, skip, True), loss(params, h, skip, False), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # Directional derivative along a random input direction, central differences.
    dh, ds = jax.random.normal(keys[0], h.shape), jax.random.normal(keys[1], skip.shape)
    eps = 1e-2
    numeric = (
        loss(params, h + eps * dh, skip + eps * ds, True)
        - loss(params, h - eps * dh, skip - eps * ds, True)
    ) / (2 * eps)
    analytic = jnp.sum(grads[0][1] * dh) + jnp.sum(grads[0][2] * ds)
    np.testing.assert_allclose(numeric, analytic, rtol=2e-3)


def test_zero_at_init_then_depends_on_gamma_and_label():
    # 32 channels: the conditioning must survive GroupNorm (1 channel per group would erase it).
    model = unet.ScoreUNet(**TINY, num_classes=4)
    z, gamma, label = _inputs(3, 4)
    # A real init, jitted with the cheap-to-compile "rbg" PRNG (threefry compiles slowly).
    init = jax.jit(lambda key: model.init(key, z, gamma, label, train=False)["params"])
    params = init(jax.random.key(0, impl="rbg"))
    np.testing.assert_array_equal(_apply(model, params, z, gamma, label), 0.0)

    params = _random_params(model, z, gamma, label)
    out = _apply(model, params, z, gamma, label)
    assert np.abs(out).mean() > 1e-3
    other_gamma = _apply(model, params, z, gamma + 1.0, label)
    other_label = _apply(model, params, z, gamma, (label + 1) % 4)
    assert np.abs(out - other_gamma).max() > 1e-4
    assert np.abs(out - other_label).max() > 1e-4


def test_dropout_only_in_training():
    model = unet.ScoreUNet(**TINY)
    z, gamma, _ = _inputs(1)
    params = _random_params(model, z, gamma, None)
    eval_a = _apply(model, params, z, gamma)
    np.testing.assert_array_equal(eval_a, _apply(model, params, z, gamma))
    train_a = _apply(model, params, z, gamma, rng=jax.random.key(0))
    train_b = _apply(model, params, z, gamma, rng=jax.random.key(1))
    assert np.abs(train_a - train_b).max() > 1e-4
    np.testing.assert_array_equal(train_a, _apply(model, params, z, gamma, rng=jax.random.key(0)))
    # No dropout rate: training needs no rng and matches evaluation.
    no_drop = unet.ScoreUNet(**{**TINY, "dropout_rate": 0.0})
    np.testing.assert_array_equal(no_drop.apply({"params": params}, z, gamma, train=True), eval_a)


@pytest.mark.parametrize(("rate", "channels"), [(0.1, 64), (0.3, 7)])
def test_dropout_statistics(rate, channels):
    """Drop rate, unbiasedness, and independence of the two halves of each random word."""
    x = jnp.full((16, 16, 16, channels), 2.0, jnp.float32)
    drop = jax.jit(unet.dropout, static_argnums=1)
    assert drop(x.astype(jnp.bfloat16), rate, jax.random.key(0)).dtype == jnp.bfloat16
    out = np.asarray(drop(x, rate, jax.random.key(0)))
    dropped = (out == 0).astype(np.float64)
    n = dropped.size
    assert abs(dropped.mean() - rate) < 4 * np.sqrt(rate * (1 - rate) / n)
    kept = out[out != 0].astype(np.float64)
    np.testing.assert_allclose(kept, 2.0 / (1 - round(rate * 2**16) / 2**16), rtol=1e-6)
    assert abs(out.astype(np.float64).mean() - 2.0) < 4 * 2.0 * np.sqrt(rate / (1 - rate) / n)
    # Channel c and c + ceil(C/2) share a 32-bit word: their masks must be uncorrelated.
    half = (channels + 1) // 2
    lo, hi = dropped[..., : channels - half], dropped[..., half:]
    corr = np.corrcoef(lo.ravel(), hi.ravel())[0, 1]
    assert abs(corr) < 4 / np.sqrt(lo.size)
    np.testing.assert_array_equal(unet.dropout(x, 0.0, jax.random.key(0)), x)


def test_bfloat16_close_to_float32():
    z, gamma, label = _inputs(3, 4)
    model32 = unet.ScoreUNet(**TINY, num_classes=4, attention="all")
    model16 = unet.ScoreUNet(**TINY, num_classes=4, attention="all", dtype=jnp.bfloat16)
    shapes = _shapes(model16, z, gamma, label)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(shapes))
    assert shapes == _shapes(model32, z, gamma, label)
    params = _random_params(model32, z, gamma, label)
    out32 = _apply(model32, params, z, gamma, label)
    out16 = _apply(model16, params, z, gamma, label)
    assert out16.dtype == jnp.float32
    rel = np.linalg.norm(out16 - out32) / np.linalg.norm(out32)
    assert rel < 0.03, rel


def test_remat_same_output_and_gradients():
    z, gamma, label = _inputs(3, 4)
    model = unet.ScoreUNet(**{**TINY, "num_blocks": 1}, num_classes=4, attention="all")
    remat = model.clone(remat=True)
    assert _shapes(remat, z, gamma, label) == _shapes(model, z, gamma, label)
    params = _random_params(model, z, gamma, label)
    rngs = {"dropout": jax.random.key(3)}

    def loss(params, m):
        out = m.apply({"params": params}, z, gamma, label, train=True, rngs=rngs)
        return jnp.sum(jnp.square(out - z)), out

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (l0, out0), g0 = grad_fn(params, model)
    (l1, out1), g1 = grad_fn(params, remat)
    np.testing.assert_allclose(out1, out0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


def test_bad_arguments_raise():
    z, gamma, label = _inputs(1, 3)
    with pytest.raises(ValueError, match="label must be given"):
        _shapes(unet.ScoreUNet(**TINY, num_classes=3), z, gamma, None)
    with pytest.raises(ValueError, match="label must be given"):
        _shapes(unet.ScoreUNet(**TINY), z, gamma, label)
    with pytest.raises(ValueError, match="attention must be one of"):
        _shapes(unet.ScoreUNet(**TINY, attention="none"), z, gamma, None)


def test_fourier_features_and_embedding():
    z = jnp.array([[[[0.25, -0.5]]]])  # [1, 1, 1, 2]
    f = unet.fourier_features(z, 0, 1)  # n = 2 frequencies: 2 pi, 4 pi
    assert f.shape == (1, 1, 1, 8)
    args = np.array([2 * np.pi * 0.25, 4 * np.pi * 0.25, -2 * np.pi * 0.5, -4 * np.pi * 0.5])
    np.testing.assert_allclose(f[0, 0, 0], np.concatenate([np.sin(args), np.cos(args)]), atol=1e-6)
    e = unet.sinusoidal_embedding(jnp.array([0.0, 3.0]), 7)
    assert e.shape == (2, 7)
    np.testing.assert_allclose(e[0], [0, 0, 0, 1, 1, 1, 0], atol=1e-7)
    np.testing.assert_allclose(e[1, [0, 3]], [np.sin(3.0), np.cos(3.0)], rtol=1e-6)


@pytest.mark.parametrize(
    ("channels", "min_size", "groups"), [(32, 1, 32), (64, 1, 32), (48, 1, 24), (32, 2, 16)]
)
def test_group_norm_min_group_size(channels, min_size, groups):
    assert unet._num_groups(32, channels, min_size) == groups


def test_reference_options_add_z_flag_and_groups():
    """The options that reproduce the reference code (see vdm_jax.runner.reference)."""
    z, gamma, label = _inputs(3, 8)
    label = jnp.array([0, 5])
    # 64 channels in 32 groups of 2: with groups of 1, GroupNorm would erase the conditioning.
    ref = dict(TINY, channels=64, label_input="flag", add_z_to_eps=True, min_group_size=1)
    model = unet.ScoreUNet(**ref, num_classes=8)
    shapes = _shapes(model, z, gamma, label)
    # The flag widens cond_dense_0 by one input; there is no label embedding.
    assert shapes["cond_dense_0"]["kernel"].shape == (64 + 1, 4 * 64)
    assert "label_embed" not in shapes
    # The unconditional variant has the same tree (the flag is then always 0).
    uncond = unet.ScoreUNet(**ref)
    assert _shapes(uncond, z, gamma, None) == shapes

    # At initialisation eps_hat = z exactly (conv_out is zero).
    init = jax.jit(lambda key: model.init(key, z, gamma, label, train=False)["params"])
    np.testing.assert_array_equal(
        _apply(model, init(jax.random.key(0, impl="rbg")), z, gamma, label), z
    )

    params = _random_params(model, z, gamma, label)
    out = _apply(model, params, z, gamma, label)
    # + z on top of the plain network.
    plain = _apply(model.clone(add_z_to_eps=False), params, z, gamma, label)
    np.testing.assert_allclose(out, plain + z, rtol=1e-6, atol=1e-6)
    # The flag is label != 0: every nonzero label gives the same output, 0 the unflagged one,
    # which is also what the unconditional model computes.
    np.testing.assert_array_equal(_apply(model, params, z, gamma, jnp.array([0, 7])), out)
    flipped = _apply(model, params, z, gamma, jnp.array([3, 0]))
    assert np.abs(flipped - out).max() > 1e-4
    np.testing.assert_array_equal(flipped[1], _apply(uncond, params, z, gamma)[1])
    # 32 groups of 2 channels, not the default's 16 groups of 4.
    assert np.abs(out - _apply(model.clone(min_group_size=4), params, z, gamma, label)).max() > 1e-4
    with pytest.raises(ValueError, match="label_input must be one of"):
        _shapes(unet.ScoreUNet(**TINY, label_input="concat"), z, gamma, None)
