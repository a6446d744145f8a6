"""The auxiliary latent of an input-adaptive schedule (MuLAN), as in a VAE.

MuLAN (Sahoo, Gokaslan, De Sa, Kuleshov, "Diffusion Models With Learned Adaptive Noise",
NeurIPS 2024) conditions the noise schedule on the input through a latent ``c``: the
forward process is ``q(z_t | x, c) = N(alpha_t(c) f(x), sigma_t^2(c))`` with
``c ~ q(c | x)``, and the generative model draws ``c ~ p(c) = N(0, I)`` first and denoises
with the schedule (and a denoiser) conditioned on it. The bound on ``-log p(x)`` gains one
term, ``KL(q(c | x) || p(c))`` (reported as ``latent``), and every other term is taken under
``c ~ q(c | x)``. A scalar schedule cannot gain from ``c``: only a per-dimension one's shape
can depend on it.

:class:`LatentEncoder` holds the encoder's parameters; the rest are pure functions.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class LatentEncoder(nn.Module):
    """``q(c | x) = N(mean(x), diag exp(log_var(x)))`` from the encoded data.

    Two 3x3 convolutions with stride 2 and a dense layer (swish), then a dense head whose
    kernel starts at zero: at initialisation ``q(c | x) = p(c) = N(0, I)`` for every input,
    the KL term is 0 and the schedule is input-independent.

    Attributes:
      latent_dim: L, the size of ``c``.
      channels: width of the convolutions; the dense layer has ``4 * channels`` units.
    """

    latent_dim: int
    channels: int = 32

    @nn.compact
    def __call__(self, f: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[B, H, W, C] encoded data in (-1, 1) -> (mean [B, L], log_var [B, L])."""
        h = nn.swish(nn.Conv(self.channels, (3, 3), name="conv_0")(f.astype(jnp.float32)))
        h = nn.swish(nn.Conv(self.channels, (3, 3), strides=2, name="conv_1")(h))
        h = nn.swish(nn.Conv(self.channels, (3, 3), strides=2, name="conv_2")(h))
        h = nn.swish(nn.Dense(4 * self.channels, name="dense")(h.reshape(h.shape[0], -1)))
        out = nn.Dense(2 * self.latent_dim, kernel_init=nn.initializers.zeros, name="head")(h)
        mean, log_var = jnp.split(out, 2, axis=-1)
        return mean, log_var


def gaussian_kl(mean: jax.Array, log_var: jax.Array) -> jax.Array:
    """``KL(N(mean, diag exp(log_var)) || N(0, I))`` in nats, [B, L] -> [B]."""
    return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(log_var) - log_var - 1.0, axis=-1)


def sample_posterior(key: jax.Array, mean: jax.Array, log_var: jax.Array) -> jax.Array:
    """A reparameterised draw ``c = mean + exp(log_var / 2) n``, n ~ N(0, I), [B, L]."""
    return mean + jnp.exp(0.5 * log_var) * jax.random.normal(key, mean.shape)


def sample_prior(key: jax.Array, batch: int, latent_dim: int) -> jax.Array:
    """``c ~ p(c) = N(0, I)``, [B, L]: what the sampler conditions on."""
    return jax.random.normal(key, (batch, latent_dim))
