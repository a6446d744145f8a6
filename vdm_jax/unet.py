"""The VDM score network: a U-Net without downsampling that predicts the noise ``eps_hat``.

Every layer runs at the full input resolution (paper, CIFAR-10 and ImageNet): a stack of
``num_blocks`` ResNet blocks whose outputs are kept as skips, a middle of ResNet block,
self-attention, ResNet block, then ``num_blocks + 1`` ResNet blocks that each consume one skip.
The network sees ``z_t``, Fourier features of ``z_t`` (high frequencies that make the fine
detail of the discrete data visible), and ``gamma_t`` through a sinusoidal embedding.

Parameter tree of :class:`ScoreUNet` (stable names; checkpoint loading depends on them)::

    cond_dense_0, cond_dense_1   Dense: time embedding [B, channels] -> [B, 4 channels]
    label_embed                  Embed: only when num_classes > 0
    context_dense                Dense: only with a context (an auxiliary latent) [B, L]
    conv_in                      Conv 3x3: input (z, its Fourier features and, for a
                                 per-dimension gamma, its map) -> channels
    down_{i}, i < num_blocks     ResBlock (down_attn_{i} after each when attention == "all")
    mid_res_0, mid_attn, mid_res_1
    up_{i}, i <= num_blocks      ResBlock on concat(h, skip), given as the two parts
                                 (up_attn_{i} when "all")
    norm_out, conv_out           GroupNorm, Conv 3x3 (zero-initialised): channels -> C
                                 (C * outputs_per_channel: K logits per channel for the
                                 categorical parameterisation, 2 for the discretised
                                 logistic)

    ResBlock:  norm_0, conv_0, cond_proj, norm_1, conv_1 (zero-initialised),
               skip_proj (Dense 1x1, only when the input width differs: the up blocks)
    AttnBlock: norm, qkv (one fused Dense to 3 channels), proj_out (zero-initialised)

The network computes the same function as the public reference code (google-research/vdm,
``model_vdm.ScoreUNet``) when built with ``add_z_to_eps=True``, ``label_input="flag"`` and
``min_group_size=1`` (:mod:`vdm_jax.runner.reference` converts its checkpoints). Those three options
are the only architectural differences; the defaults keep the network of the paper's text:

* ``add_z_to_eps``: the reference returns ``conv_out(...) + z_t`` (its "base measure").
* ``label_input="flag"``: the reference appends one scalar, the augmentation flag (0 or 1),
  to the sinusoidal time embedding before the first conditioning Dense, which is therefore
  ``channels + 1`` wide even for unconditional models (the flag is then 0). Our default adds
  a learned label embedding after the second Dense instead.
* ``min_group_size=1``: the reference uses Flax's GroupNorm with 32 groups at every width.
  Both agree at the paper's widths (128, 256, 320 channels: 32 groups of at least 4).

Smaller differences that do not change the function: the reference's ``cond_proj`` has no
bias (ours is a superset: its bias loads as zeros), and it keeps q, k, v as three Dense
layers (ours fuses them into ``qkv``, their kernels concatenated in that order).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

ATTENTION_MODES = ("middle", "all")
LABEL_INPUTS = ("embed", "flag")


def count_params(params: Any) -> int:
    """The total number of scalars in a pytree of arrays (or of ``jax.ShapeDtypeStruct``)."""
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))


MIN_GROUP_SIZE = 4
_GROUP_SUMS = "group_norm_sums"  # The only activations-derived values group_norm keeps.


def group_norm(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    num_groups: int,
    epsilon: float = 1e-6,
    *,
    shift: jax.Array | None = None,
    swish: bool = False,
) -> jax.Array:
    """Group normalisation of ``x + shift`` [B, ..., C], optionally followed by swish.

    Each group of ``C / num_groups`` consecutive channels of ``u = x + shift`` is normalised
    over those channels and every axis but the first, ``(u - mean) / sqrt(var + epsilon)``,
    then scaled and shifted per channel by ``scale``, ``bias`` [C]. The variance is
    ``E[u^2] - mean^2`` (as in ``flax.linen.GroupNorm``'s default). Statistics are float32
    whatever the dtype of ``x``. ``shift`` [B, C] (a per-example, per-channel offset such as a
    ResNet block's conditioning) enters the statistics in closed form, so ``u`` is never
    formed; ``swish=True`` returns ``swish(GroupNorm(u))``.

    Computed as per-channel sums of ``x`` and ``x^2`` over the spatial axes (contiguous in the
    channels-last layout, so they vectorise), a [B, C] -> [B, G] group sum, and the output as
    one multiply-add per element, ``x a + b`` with [B, C] coefficients. For reverse mode the
    function is a ``jax.checkpoint`` that keeps only ``x`` and those [B, C] sums: the
    backward pass recomputes ``x a + b`` and its sigmoid on the fly, instead of storing the
    normalised values and their sigmoid (two more activations per call). On a 2-core CPU at
    [4, 32, 32, 128] the plain version was 4.7x faster forward and 2.5x faster forward +
    backward than ``flax.linen.GroupNorm``, which reduces over a [B, ..., G, C / G] view.

    Returns:
      float32 [B, ..., C].
    """
    if x.shape[-1] % num_groups:
        raise ValueError(f"{num_groups} groups do not divide {x.shape[-1]} channels")
    return _group_norm_core(x, scale, bias, shift, num_groups, epsilon, swish)


@functools.partial(
    jax.checkpoint,
    static_argnums=(4, 5, 6),
    policy=jax.checkpoint_policies.save_only_these_names(_GROUP_SUMS),
)
def _group_norm_core(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    shift: jax.Array | None,
    num_groups: int,
    epsilon: float,
    swish: bool,
) -> jax.Array:
    """:func:`group_norm` after validation; see there."""
    batch, channels = x.shape[0], x.shape[-1]
    group_size = channels // num_groups
    spatial = tuple(range(1, x.ndim - 1))
    positions = math.prod(x.shape[1:-1])
    x = x.astype(jnp.float32)
    sums = checkpoint_name(jnp.sum(x, axis=spatial), _GROUP_SUMS)  # [B, C]
    squares = checkpoint_name(jnp.sum(jnp.square(x), axis=spatial), _GROUP_SUMS)
    if shift is not None:  # Sums of u = x + shift from those of x.
        shift = shift.astype(jnp.float32)
        squares = squares + shift * (2.0 * sums + positions * shift)
        sums = sums + positions * shift

    def group_mean(channel_sums: jax.Array) -> jax.Array:  # [B, C] -> [B, C], per group
        total = jnp.sum(channel_sums.reshape(batch, num_groups, group_size), axis=-1)
        return jnp.repeat(total / (positions * group_size), group_size, axis=-1)

    mean = group_mean(sums)
    var = jnp.maximum(group_mean(squares) - jnp.square(mean), 0.0)
    mul = scale.astype(jnp.float32) * jax.lax.rsqrt(var + epsilon)  # [B, C]
    centre = mean if shift is None else mean - shift  # y = (x - centre) mul + bias
    add = bias.astype(jnp.float32) - centre * mul
    shape = (batch,) + (1,) * len(spatial) + (channels,)
    y = x * mul.reshape(shape) + add.reshape(shape)
    return y * jax.nn.sigmoid(y) if swish else y


class _GroupNormBase(nn.Module):
    """Fields and parameters shared by :class:`GroupNorm` and :class:`PartsGroupNorm`."""

    num_groups: int
    dtype: Any = jnp.float32
    epsilon: float = 1e-6

    def _normalise(
        self, parts: Sequence[jax.Array], shift: jax.Array | None, swish: bool
    ) -> list[jax.Array]:
        """Parameters ``scale`` (ones) and ``bias`` (zeros) [C], then each part normalised.

        Groups within one part never form the concatenation; a group that straddles two
        parts makes the layer normalise the concatenation and split it again.
        """
        widths = [p.shape[-1] for p in parts]
        scale = self.param("scale", nn.initializers.ones, (sum(widths),))
        bias = self.param("bias", nn.initializers.zeros, (sum(widths),))
        kwargs = dict(epsilon=self.epsilon, swish=swish)
        group_size = sum(widths) // self.num_groups
        bounds = np.cumsum([0, *widths])
        if any(w % group_size for w in widths):  # A group straddles two parts.
            whole = jnp.concatenate(parts, axis=-1)
            y = group_norm(whole, scale, bias, self.num_groups, shift=shift, **kwargs)
            outs = jnp.split(y, bounds[1:-1], axis=-1)
        else:
            outs = [
                group_norm(
                    part,
                    scale[a:b],
                    bias[a:b],
                    (b - a) // group_size,
                    shift=None if shift is None else shift[:, a:b],
                    **kwargs,
                )
                for part, a, b in zip(parts, bounds[:-1], bounds[1:], strict=True)
            ]
        return [y.astype(self.dtype) for y in outs]


class GroupNorm(_GroupNormBase):
    """:func:`group_norm` with learned ``scale`` (ones) and ``bias`` (zeros), each [C].

    The parameters and the function are those of ``flax.linen.GroupNorm(num_groups)``
    (epsilon 1e-6, float32 statistics), so checkpoints of either load into the other.
    """

    @nn.compact
    def __call__(
        self, x: jax.Array, shift: jax.Array | None = None, swish: bool = False
    ) -> jax.Array:
        """[B, ..., C] -> [B, ..., C] in ``dtype``: ``[swish](GroupNorm(x + shift))``.

        ``shift`` [B, C], optional, is added per example and channel before normalising (in
        closed form, see :func:`group_norm`).
        """
        return self._normalise([x], shift, swish)[0]


class PartsGroupNorm(_GroupNormBase):
    """:class:`GroupNorm` of a channel concatenation given as its parts, part by part.

    Same parameters (``scale``, ``bias`` [sum of the parts' C]) and function as
    :class:`GroupNorm` on the concatenation, which is never formed when no group straddles
    two parts.
    """

    @nn.compact
    def __call__(
        self, parts: Sequence[jax.Array], shift: jax.Array | None = None, swish: bool = False
    ) -> list[jax.Array]:
        """Parts [B, ..., C_i] -> the normalised parts [B, ..., C_i] in ``dtype``."""
        return self._normalise(parts, shift, swish)


class _PartsLinearBase(nn.Module):
    """Fields and computation shared by :class:`PartsLinear` and :class:`PartsLinearSplitBias`."""

    features: int
    kernel_size: tuple[int, int] | tuple[()]
    dtype: Any = jnp.float32

    def _apply(self, parts: Sequence[jax.Array], add_bias: bool) -> tuple[jax.Array, jax.Array]:
        """``(sum over parts of part @ its kernel rows [+ bias], bias [F])``, sums in float32."""
        widths = [p.shape[-1] for p in parts]
        shape = (*self.kernel_size, sum(widths), self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape)
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        out, start = (bias.astype(jnp.float32) if add_bias else 0.0), 0
        for part, w in zip(parts, widths, strict=True):
            rows = kernel[..., start : start + w, :].astype(self.dtype)
            part = part.astype(self.dtype)
            if self.kernel_size:
                out = out + jax.lax.conv_general_dilated(
                    part,
                    rows,
                    (1, 1),
                    "SAME",
                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                    preferred_element_type=jnp.float32,
                )
            else:
                out = out + jnp.dot(part, rows, preferred_element_type=jnp.float32)
            start += w
        return out.astype(self.dtype), bias


class PartsLinear(_PartsLinearBase):
    """A 3x3 conv (``kernel_size=(3, 3)``) or a dense layer (``()``) of a channel concatenation.

    Given the parts of the input (a list, concatenated along the channels in order), it
    applies each part to its rows of the kernel and sums, so the concatenation (and in the
    backward pass, the split of its gradient) is never formed. Parameters and their
    initialisation are those of ``nn.Conv(features, (3, 3))`` or ``nn.Dense(features)``:
    ``kernel`` [*kernel_size, C_in, F] (LeCun normal), ``bias`` [F]. Inputs and kernel are
    cast to ``dtype``; the partial sums accumulate in float32.
    """

    @nn.compact
    def __call__(self, parts: Sequence[jax.Array]) -> jax.Array:
        """[B, H, W, C_i] for each part -> [B, H, W, features] in ``dtype``."""
        return self._apply(parts, add_bias=True)[0]


class PartsLinearSplitBias(_PartsLinearBase):
    """:class:`PartsLinear` that returns its bias instead of adding it.

    So that a following :class:`GroupNorm` takes the bias into its ``shift`` instead of a
    pass over the output. Same parameters as :class:`PartsLinear`.
    """

    @nn.compact
    def __call__(self, parts: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
        """Parts [B, H, W, C_i] -> (output without bias [B, H, W, F] in ``dtype``, bias [F])."""
        return self._apply(parts, add_bias=False)


def _num_groups(num_groups: int, channels: int, min_group_size: int) -> int:
    """GroupNorm groups: at most ``num_groups`` and ``min_group_size`` channels per group.

    The number of groups is the largest divisor of ``channels`` within both limits, so any
    width works (48 channels, 32 groups -> 12 groups of 4). The group size matters: with one
    channel per group, GroupNorm would subtract the per-channel shift that carries the
    conditioning into each ResNet block, and a narrow network (32 channels, 32 groups) would
    silently ignore ``gamma_t``. Paper widths (128 or 256 channels, 32 groups) are unaffected.
    ``min_group_size=1`` gives exactly ``num_groups`` groups whenever they divide ``channels``
    (the reference code's ``nn.GroupNorm()``, 32 groups at any width).
    """
    limit = max(min(num_groups, channels // max(min_group_size, 1)), 1)
    return max(g for g in range(1, limit + 1) if channels % g == 0)


def sinusoidal_embedding(x: jax.Array, dim: int) -> jax.Array:
    """Transformer-style embedding ``[sin(x w_j), cos(x w_j)]``, ``w_j = 10000^(-j/(dim/2-1))``.

    Args:
      x: [B] float positions (here ``1000 * t_cond``, so in [0, 1000] for t_cond in [0, 1]).
      dim: embedding width; an odd width is zero-padded by one.

    Returns:
      [B, dim] float32.
    """
    half = dim // 2
    # The reference code's order of float32 operations, so that its checkpoints see the same
    # embedding bit for bit: arange * -(log(10000) / (half - 1)), the constant in float64.
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / max(half - 1, 1)))
    args = x.astype(jnp.float32)[:, None] * freqs  # [B, half]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def fourier_features(z: jax.Array, min_exp: int, max_exp: int) -> jax.Array:
    """``sin`` and ``cos`` of ``2 pi 2^k z`` for k in ``min_exp..max_exp`` (inclusive).

    Args:
      z: [B, H, W, C] float32.
      min_exp, max_exp: the range of base-2 exponents.

    Returns:
      [B, H, W, 2 C n] float32 with n = max_exp - min_exp + 1: all sines, then all cosines,
      each ordered channel-major (channel c, frequency k at index c n + k - min_exp).
    """
    freqs = 2.0 * jnp.pi * 2.0 ** jnp.arange(min_exp, max_exp + 1, dtype=jnp.float32)
    args = (z.astype(jnp.float32)[..., None] * freqs).reshape(*z.shape[:-1], -1)
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Inverted dropout, [..., C] -> [..., C], drawing 16 random bits per element.

    Each 32-bit threefry word decides two elements (its low half for the first ``C / 2``
    channels, its high half for the rest), which halves the random-number work, the main
    cost of dropout on CPU. An element is dropped when its 16 bits are below
    ``round(rate * 2^16)``: the rate is exact to 2^-17, and kept values are scaled by the
    exact inverse keep probability, so the layer stays unbiased. The channel axis is split
    (not the batch) so a batch-sharded ``x`` needs no communication.
    """
    if rate <= 0.0:
        return x
    if rate >= 1.0:
        return jnp.zeros_like(x)
    threshold = round(rate * 2**16)
    channels = x.shape[-1]
    words = jax.random.bits(key, (*x.shape[:-1], (channels + 1) // 2), jnp.uint32)
    bits = jnp.concatenate([words & 0xFFFF, words >> 16], axis=-1)[..., :channels]
    keep = bits >= threshold
    scale = 2**16 / (2**16 - threshold)
    return jnp.where(keep, x * jnp.asarray(scale, x.dtype), jnp.zeros((), x.dtype))


@jax.custom_vjp
def _materialise_grad(x: jax.Array) -> jax.Array:
    """Identity whose backward pass stores its cotangent (an XLA optimisation barrier).

    A block's input gradient is the sum of the residual path and the block's own path, and
    several consumers read it. With :func:`group_norm`'s cheap elementwise backward, XLA:CPU
    otherwise fuses the whole chain of these sums through the network into each consumer
    and recomputes it there: the CIFAR-10 step took 14 s instead of 4.9 s. Being a
    ``custom_vjp``, it has no forward-mode derivative, so only training-mode blocks use it.
    """
    return x


def _materialise_grad_fwd(x: jax.Array) -> tuple[jax.Array, None]:
    return x, None


def _materialise_grad_bwd(_: None, g: jax.Array) -> tuple[jax.Array]:
    return (jax.lax.optimization_barrier(g),)


_materialise_grad.defvjp(_materialise_grad_fwd, _materialise_grad_bwd)


class ResBlock(nn.Module):
    """Pre-activation residual block conditioned on a (swished) embedding.

    ``x + conv_1(dropout(swish(norm_1(conv_0(swish(norm_0(x))) + cond_proj(cond)))))``, with
    ``x`` projected by a 1x1 ``skip_proj`` when its width is not ``features``. ``x`` may come
    as the list of its parts along the channels (the up blocks' ``[h, skip]``): ``norm_0``,
    ``conv_0`` and ``skip_proj`` then work on the parts (:class:`GroupNorm`,
    :class:`PartsLinear`), with the parameters they would have on the concatenation.
    """

    features: int
    dropout_rate: float
    num_groups: int
    dtype: Any
    min_group_size: int = MIN_GROUP_SIZE

    @nn.compact
    def __call__(self, parts: Sequence[jax.Array], cond: jax.Array, train: bool) -> jax.Array:
        """The input's parts [B, H, W, C_i] (one part: the input), [B, E] -> [B, H, W, F]."""
        feats, dtype = self.features, self.dtype
        if train:  # Reverse-mode only: forward-mode (the ODE's divergence) runs with train=False.
            parts = [_materialise_grad(p) for p in parts]
        c_in = sum(p.shape[-1] for p in parts)
        groups_in = _num_groups(self.num_groups, c_in, self.min_group_size)
        groups = _num_groups(self.num_groups, feats, self.min_group_size)
        h = PartsGroupNorm(groups_in, dtype, name="norm_0")(parts, swish=True)
        h, conv_bias = PartsLinearSplitBias(feats, (3, 3), dtype, name="conv_0")(h)
        # conv_0's bias and the conditioning [B, F] enter norm_1 as its per-channel shift.
        shift = nn.Dense(feats, name="cond_proj")(cond) + conv_bias
        h = GroupNorm(groups, dtype, name="norm_1")(h, shift=shift, swish=True)
        if train and self.dropout_rate > 0.0:
            h = dropout(h, self.dropout_rate, self.make_rng("dropout"))
        h = nn.Conv(feats, (3, 3), dtype=dtype, kernel_init=nn.initializers.zeros, name="conv_1")(h)
        if c_in != feats:
            skip = PartsLinear(feats, (), dtype=dtype, name="skip_proj")(parts)
        else:
            skip = parts[0]
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual connection."""

    num_groups: int
    dtype: Any
    min_group_size: int = MIN_GROUP_SIZE

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, H, W, C] in ``dtype``; logits and softmax in float32."""
        b, hgt, wid, c = x.shape
        groups = _num_groups(self.num_groups, c, self.min_group_size)
        h = GroupNorm(groups, self.dtype, name="norm")(x).reshape(b, hgt * wid, c)
        qkv = nn.Dense(3 * c, dtype=self.dtype, name="qkv")(h)  # [B, T, 3C]
        q, k, v = jnp.split(qkv, 3, axis=-1)
        # Scale q (T x C) rather than the logits (T x T).
        logits = jnp.einsum("bqc,bkc->bqk", q * c**-0.5, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        h = jnp.einsum("bqk,bkc->bqc", weights, v)
        h = nn.Dense(c, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="proj_out")(h)
        return x + h.reshape(x.shape)


class ScoreUNet(nn.Module):
    """The VDM noise predictor ``eps_hat(z_t, gamma_t[, label])``: a U-Net at full resolution.

    Input: concat(z, Fourier features of z) -> ``conv_in``. Conditioning: ``t_cond =
    (gamma_t - gamma_min) / (gamma_max - gamma_min)``, sinusoidal embedding of ``1000 t_cond``
    (width ``channels``; with ``label_input="flag"`` one more entry, ``label != 0``) ->
    Dense(4 channels) -> swish -> Dense(4 channels) (+ label embedding when
    ``label_input="embed"``) -> swish, projected into every ResNet block. The conditioning
    MLP, Fourier features, GroupNorm statistics, attention softmax and the output head
    (``norm_out``, ``conv_out``) run in float32; everything else in ``dtype``. See the module
    docstring for the parameter names and for the options that reproduce the reference code.

    Parameter counts for 3-channel inputs, no labels (from ``jax.eval_shape``; they do not
    depend on H, W): :func:`cifar10_unet` 30,586,243; :func:`imagenet64_unet` 237,636,355.

    Attributes:
      num_blocks: ResNet blocks on the way down; ``num_blocks + 1`` on the way up.
      channels: width of every block; the conditioning embedding is ``4 * channels``.
      dropout_rate: dropout inside each ResNet block (train only).
      attention: ``"middle"``: one self-attention block in the middle; ``"all"``: also after
        every down and up ResNet block.
      fourier_features: concat ``sin/cos(2 pi 2^k z)``, k in ``fourier_min_exp..max_exp``.
      fourier_min_exp: smallest exponent k (inclusive).
      fourier_max_exp: largest exponent k (inclusive).
      gamma_min: ``gamma_t`` that maps to ``t_cond = 0``.
      gamma_max: ``gamma_t`` that maps to ``t_cond = 1``.
      num_classes: > 0 to condition on an integer label (see ``label_input``); the call then
        requires ``label``.
      label_input: how the label enters. ``"embed"``: a learned embedding (``label_embed``,
        ``num_classes`` rows) added to the time embedding after ``cond_dense_1``. ``"flag"``:
        the reference code's conditioning, the float ``label != 0`` (0 without a label)
        appended to the sinusoidal embedding, so ``cond_dense_0`` has ``channels + 1`` inputs
        and there is no ``label_embed``. With D4 augmentation labels (0 = identity) the flag
        is the reference's "this image was augmented" input.
      num_groups: GroupNorm groups, at most; reduced to a divisor of the width that leaves
        at least ``min_group_size`` channels per group, so any width works (``_num_groups``).
      min_group_size: fewest channels per GroupNorm group (4); 1 for the reference layout.
      add_z_to_eps: return ``conv_out(...) + z`` (the reference code's output); False
        returns ``conv_out(...)``, which is zero at initialisation.
      outputs_per_channel: output channels per input channel: 1 (a prediction of eps, x or
        v), K (logits over the K data values) or 2 (a discretised logistic's location and
        log-scale); :mod:`vdm_jax.parameterizations`.
      dtype: compute dtype (``jnp.bfloat16`` for mixed precision); parameters are float32.
      remat: rematerialise each ResNet and attention block in the backward pass.
    """

    num_blocks: int = 32
    channels: int = 128
    dropout_rate: float = 0.1
    attention: str = "middle"
    fourier_features: bool = True
    fourier_min_exp: int = 6
    fourier_max_exp: int = 7
    gamma_min: float = -13.3
    gamma_max: float = 5.0
    num_classes: int = 0
    label_input: str = "embed"
    num_groups: int = 32
    min_group_size: int = MIN_GROUP_SIZE
    add_z_to_eps: bool = False
    outputs_per_channel: int = 1
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(
        self,
        z: jax.Array,
        gamma_t: jax.Array,
        label: jax.Array | None = None,
        *,
        train: bool,
        context: jax.Array | None = None,
    ) -> jax.Array:
        """Predicts the noise in ``z``.

        A per-dimension ``gamma_t`` (of ``z``'s rank, broadcasting to it) enters twice: its
        mean over each example's dimensions drives the time embedding above, and its
        ``t_cond`` map is concatenated to the input of ``conv_in`` (so ``conv_in`` then has
        ``C`` more input channels), as MuLAN's networks see the schedule.

        Args:
          z: [B, H, W, C] float32 latent ``z_t``.
          gamma_t: [B] or scalar float32, ``gamma`` (log noise-to-signal ratio) at time t; or
            per dimension, [B or 1, H or 1, W or 1, C or 1].
          label: [B] int32 in ``[0, num_classes)``; required iff ``num_classes > 0``.
          train: enables dropout, which then draws from the ``'dropout'`` rng.
          context: [B, L] float32, an auxiliary latent (input-adaptive schedules): a Dense
            projection (``context_dense``) is added to the time embedding after
            ``cond_dense_1``.

        Returns:
          The prediction (eps_hat, or what ``parameterization`` names), [B, H, W, C *
          outputs_per_channel] float32. At initialisation (``conv_out`` is zero-initialised)
          exactly zero, or exactly ``z`` with ``add_z_to_eps``.
        """
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.add_z_to_eps and self.outputs_per_channel != 1:
            raise ValueError("add_z_to_eps needs one output channel per input channel")
        width = self.channels
        cond, h = network_inputs(self, z, gamma_t, label, context, 4 * width)
        h = nn.Conv(width, (3, 3), dtype=self.dtype, name="conv_in")(h.astype(self.dtype))

        res_cls = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock
        attn_cls = nn.remat(AttnBlock) if self.remat else AttnBlock

        groups, min_size = self.num_groups, self.min_group_size

        def res(name: str, parts: list[jax.Array]) -> jax.Array:
            block = res_cls(width, self.dropout_rate, groups, self.dtype, min_size, name=name)
            return block(parts, cond, train)

        def attn(name: str, x: jax.Array) -> jax.Array:
            return attn_cls(groups, self.dtype, min_size, name=name)(x)

        every = self.attention == "all"
        skips = [h]
        for i in range(self.num_blocks):
            h = res(f"down_{i}", [h])
            if every:
                h = attn(f"down_attn_{i}", h)
            skips.append(h)

        h = res("mid_res_1", [attn("mid_attn", res("mid_res_0", [h]))])

        for i in range(self.num_blocks + 1):
            h = res(f"up_{i}", [h, skips.pop()])
            if every:
                h = attn(f"up_attn_{i}", h)

        out = output_head(h, z.shape[-1] * self.outputs_per_channel, groups, min_size)
        return out + z.astype(jnp.float32) if self.add_z_to_eps else out


def network_inputs(
    net: nn.Module,
    z: jax.Array,
    gamma_t: jax.Array,
    label: jax.Array | None,
    context: jax.Array | None,
    emb: int,
) -> tuple[jax.Array, jax.Array]:
    """The conditioning embedding and the input features every score network here shares.

    Called inside a network's compact ``__call__`` (its Dense layers become the network's
    ``cond_dense_0``, ``cond_dense_1``, ``label_embed``, ``context_dense``). ``net`` supplies
    ``channels``, ``gamma_min``, ``gamma_max``, ``num_classes``, ``label_input``,
    ``fourier_features``, ``fourier_min_exp`` and ``fourier_max_exp`` (see
    :class:`ScoreUNet`).

    Args:
      net: the calling network.
      z: [B, H, W, C] float32 latent.
      gamma_t: [B], scalar, or per dimension (of ``z``'s rank, broadcasting to it).
      label: [B] int32, required iff ``net.num_classes > 0``.
      context: [B, L] auxiliary latent, or None.
      emb: width of the conditioning embedding.

    Returns:
      ``(cond [B, emb] float32, swished; features [B, H, W, C']`` float32: z, its Fourier
      features and, for a per-dimension gamma, its ``t_cond`` map).
    """
    if net.label_input not in LABEL_INPUTS:
        raise ValueError(f"label_input must be one of {LABEL_INPUTS}, got {net.label_input!r}")
    if (label is None) != (net.num_classes == 0):
        raise ValueError(
            f"label must be given iff num_classes > 0 (num_classes={net.num_classes}, "
            f"label {'missing' if label is None else 'given'})"
        )
    b = z.shape[0]
    # Conditioning, in float32: it is [B, emb], negligible next to the convs.
    gamma_t = jnp.asarray(gamma_t, jnp.float32)
    t_map = None
    if gamma_t.ndim == z.ndim:  # per dimension: its map goes into conv_in
        gamma_map = jnp.broadcast_to(gamma_t, z.shape)
        t_map = (gamma_map - net.gamma_min) / (net.gamma_max - net.gamma_min)
        gamma_t = jnp.mean(gamma_map.reshape(b, -1), axis=-1)
    gamma_t = jnp.broadcast_to(gamma_t, (b,))
    t_cond = (gamma_t - net.gamma_min) / (net.gamma_max - net.gamma_min)
    cond = sinusoidal_embedding(1000.0 * t_cond, net.channels)  # [B, channels]
    if label is not None:
        label = jnp.broadcast_to(jnp.asarray(label, jnp.int32), (b,))
    if net.label_input == "flag":
        flag = jnp.zeros((b,)) if label is None else (label != 0).astype(jnp.float32)
        cond = jnp.concatenate([cond, flag[:, None]], axis=-1)  # [B, channels + 1]
    cond = nn.swish(nn.Dense(emb, name="cond_dense_0")(cond))
    cond = nn.Dense(emb, name="cond_dense_1")(cond)
    if net.num_classes > 0 and net.label_input == "embed":
        cond = cond + nn.Embed(net.num_classes, emb, name="label_embed")(label)
    if context is not None:
        cond = cond + nn.Dense(emb, name="context_dense")(context.astype(jnp.float32))
    cond = nn.swish(cond)  # once here rather than in every block

    h = z.astype(jnp.float32)
    if net.fourier_features:
        feats = fourier_features(h, net.fourier_min_exp, net.fourier_max_exp)
        h = jnp.concatenate([h, feats], axis=-1)  # [B, H, W, C (1 + 2 n)]
    if t_map is not None:
        h = jnp.concatenate([h, t_map], axis=-1)  # [B, H, W, C (2 + 2 n)]
    return cond, h


def output_head(h: jax.Array, c_out: int, num_groups: int, min_group_size: int) -> jax.Array:
    """``conv_out(swish(norm_out(h)))`` in float32 (one cheap conv, and eps_hat precision
    matters at low noise); ``conv_out`` is zero-initialised, so a network starts at zero.
    Called inside a network's compact ``__call__``: [B, H, W, F] -> [B, H, W, c_out]."""
    groups = _num_groups(num_groups, h.shape[-1], min_group_size)
    h = GroupNorm(groups, jnp.float32, name="norm_out")(h, swish=True)
    return nn.Conv(c_out, (3, 3), kernel_init=nn.initializers.zeros, name="conv_out")(h)


def cifar10_unet(**overrides: Any) -> ScoreUNet:
    """The paper's CIFAR-10 network: 32 blocks, 128 channels, dropout 0.1, middle attention.

    30,586,243 parameters for 3-channel inputs (``count_params`` of ``jax.eval_shape`` init).
    """
    kwargs = dict(num_blocks=32, channels=128, dropout_rate=0.1, attention="middle")
    return ScoreUNet(**{**kwargs, **overrides})


def imagenet64_unet(**overrides: Any) -> ScoreUNet:
    """The paper's ImageNet 64x64 network: 64 blocks, 256 channels, no dropout, middle attention.

    237,636,355 parameters for 3-channel inputs (``count_params`` of ``jax.eval_shape`` init).
    """
    kwargs = dict(num_blocks=64, channels=256, dropout_rate=0.0, attention="middle")
    return ScoreUNet(**{**kwargs, **overrides})
