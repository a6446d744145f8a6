"""A multi-resolution score U-Net: downsampling stages with channel multipliers, attention at
the low resolutions (DDPM, Ho et al. 2020; ADM, Dhariwal & Nichol 2021; NCSN++, Song et al.
2021).

The VDM network (:class:`vdm_jax.unet.ScoreUNet`) keeps full resolution throughout, which
the likelihood needs at the finest scale but pays for at every layer. Here stage ``i`` runs
``num_res_blocks`` ResNet blocks at ``channels * channel_mult[i]`` on an image downsampled
``2^i`` times; the up path mirrors it with one more block per stage, each consuming one
skip. It shares the VDM network's parts: the conditioning (``gamma_t`` through a sinusoidal
embedding, labels, an auxiliary latent), the Fourier features of ``z`` and a per-dimension
gamma's map at the input (:func:`vdm_jax.unet.network_inputs`), the ResNet and attention
blocks, and the zero-initialised output head, so every parameterisation, schedule and
estimator works with it unchanged.

Parameter tree of :class:`MultiResUNet`::

    cond_dense_0, cond_dense_1, label_embed, context_dense   as ScoreUNet
    conv_in                      Conv 3x3 -> channels * channel_mult[0]
    down_{i}_{j}                 ResBlock j of stage i (down_{i}_attn_{j} at the attention
                                 resolutions)
    downsample_{i}               Conv 3x3, stride 2 (every stage but the last)
    mid_res_0, mid_attn, mid_res_1
    up_{i}_{j}, j <= num_res_blocks   ResBlock on [h, skip] (up_{i}_attn_{j} likewise)
    upsample_{i}                 nearest x2, then Conv 3x3 (every stage but the first)
    norm_out, conv_out           as ScoreUNet (conv_out zero-initialised)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm_jax import unet


class MultiResUNet(nn.Module):
    """The noise predictor ``eps_hat(z_t, gamma_t[, label])`` as a multi-resolution U-Net.

    The call has :class:`vdm_jax.unet.ScoreUNet`'s signature and contract (exactly zero at
    initialisation; a per-dimension ``gamma_t`` enters as a map at the input; ``context`` is
    added to the time embedding).

    Attributes:
      channels: base width; stage ``i`` is ``channels * channel_mult[i]`` wide, and the
        conditioning embedding ``4 * channels``.
      channel_mult: one multiplier per resolution; ``len(channel_mult) - 1`` downsamplings,
        so H and W must divide by ``2 ** (len(channel_mult) - 1)``.
      num_res_blocks: ResNet blocks per stage on the way down (one more on the way up).
      attention_resolutions: side lengths (the smaller of H, W at that stage) at which a
        self-attention block follows each ResNet block; the middle always has one.
      dropout_rate: dropout inside each ResNet block (train only).
      fourier_features, fourier_min_exp, fourier_max_exp, gamma_min, gamma_max, num_classes,
      label_input, num_groups, min_group_size, outputs_per_channel, dtype, remat: as
        :class:`vdm_jax.unet.ScoreUNet`.
    """

    channels: int = 64
    channel_mult: Sequence[int] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = (7,)
    dropout_rate: float = 0.1
    fourier_features: bool = True
    fourier_min_exp: int = 6
    fourier_max_exp: int = 7
    gamma_min: float = -13.3
    gamma_max: float = 5.0
    num_classes: int = 0
    label_input: str = "embed"
    num_groups: int = 32
    min_group_size: int = unet.MIN_GROUP_SIZE
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
        """[B, H, W, C] latent, gamma_t ([B], scalar or per dimension) -> [B, H, W, C *
        outputs_per_channel] float32 (see :meth:`vdm_jax.unet.ScoreUNet.__call__`)."""
        levels = len(self.channel_mult)
        factor = 2 ** (levels - 1)
        if levels < 1 or min(self.channel_mult) < 1 or self.num_res_blocks < 1:
            raise ValueError(
                "channel_mult needs at least one positive multiplier and num_res_blocks >= 1, "
                f"got {tuple(self.channel_mult)} and {self.num_res_blocks}"
            )
        if z.shape[1] % factor or z.shape[2] % factor:
            raise ValueError(
                f"images of {z.shape[1]}x{z.shape[2]} do not halve {levels - 1} times "
                f"(channel_mult={tuple(self.channel_mult)}): H and W must divide by {factor}"
            )
        dtype, groups, min_size = self.dtype, self.num_groups, self.min_group_size
        cond, h = unet.network_inputs(self, z, gamma_t, label, context, 4 * self.channels)
        widths = [self.channels * m for m in self.channel_mult]
        h = nn.Conv(widths[0], (3, 3), dtype=dtype, name="conv_in")(h.astype(dtype))

        res_cls = nn.remat(unet.ResBlock, static_argnums=(3,)) if self.remat else unet.ResBlock
        attn_cls = nn.remat(unet.AttnBlock) if self.remat else unet.AttnBlock

        def res(name: str, parts: list[jax.Array], width: int) -> jax.Array:
            block = res_cls(width, self.dropout_rate, groups, dtype, min_size, name=name)
            return block(parts, cond, train)

        def attn(name: str, x: jax.Array) -> jax.Array:
            return attn_cls(groups, dtype, min_size, name=name)(x)

        def attends(x: jax.Array) -> bool:
            return min(x.shape[1], x.shape[2]) in self.attention_resolutions

        skips = [h]
        for i, width in enumerate(widths):
            for j in range(self.num_res_blocks):
                h = res(f"down_{i}_{j}", [h], width)
                if attends(h):
                    h = attn(f"down_{i}_attn_{j}", h)
                skips.append(h)
            if i < levels - 1:
                h = nn.Conv(width, (3, 3), (2, 2), dtype=dtype, name=f"downsample_{i}")(h)
                skips.append(h)

        h = res("mid_res_1", [attn("mid_attn", res("mid_res_0", [h], widths[-1]))], widths[-1])

        for i in reversed(range(levels)):
            for j in range(self.num_res_blocks + 1):
                h = res(f"up_{i}_{j}", [h, skips.pop()], widths[i])
                if attends(h):
                    h = attn(f"up_{i}_attn_{j}", h)
            if i > 0:
                b, height, width_px, c = h.shape
                h = jax.image.resize(h, (b, 2 * height, 2 * width_px, c), "nearest")
                h = nn.Conv(widths[i], (3, 3), dtype=dtype, name=f"upsample_{i}")(h)
        assert not skips, "every skip is consumed"

        c_out = z.shape[-1] * self.outputs_per_channel
        return unet.output_head(h, c_out, groups, min_size)
