"""Exact references for data on a grid of K values, in float64 numpy.

Independent of the code under test: Bayes' posterior mean by enumeration over the values,
and the mutual information between one value and its noisy copy by Gauss-Hermite quadrature.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp


def levels(vocab_size: int) -> np.ndarray:
    """The K bin centres in (-1, 1): [K] float64."""
    return 2 * (np.arange(vocab_size) + 0.5) / vocab_size - 1


def alpha_sigma(gamma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """alpha = sqrt(sigmoid(-gamma)), sigma = sqrt(sigmoid(gamma))."""
    return np.sqrt(1 / (1 + np.exp(gamma))), np.sqrt(1 / (1 + np.exp(-gamma)))


def bayes_x_hat(
    z: np.ndarray, gamma: np.ndarray, log_prior: np.ndarray, values: np.ndarray
) -> np.ndarray:
    """E[x_i | z] for independent dimensions by enumeration over ``values`` [K].

    z [B, ...]; gamma broadcasting to z; log_prior broadcasting to [B, ..., K].
    """
    a, s = alpha_sigma(np.broadcast_to(gamma, z.shape))
    log_lik = -0.5 * ((z[..., None] - a[..., None] * values) / s[..., None]) ** 2
    log_post = log_lik + log_prior
    post = np.exp(log_post - logsumexp(log_post, axis=-1, keepdims=True))
    return (post * values).sum(-1)


def eps_of(x_hat: np.ndarray, z: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """The noise prediction that x_hat implies: (z - alpha x_hat) / sigma."""
    a, s = alpha_sigma(np.broadcast_to(gamma, z.shape))
    return (z - a * x_hat) / s


def mutual_information(
    gamma: float, probs: np.ndarray, values: np.ndarray, nodes: int = 120
) -> float:
    """I(x; z_gamma) in nats for one dimension x ~ probs over ``values``, by Gauss-Hermite.

    I = sum_k p_k E_u[log N(z; a v_k, s^2) - log sum_j p_j N(z; a v_j, s^2)], z = a v_k + s u.
    """
    u, w = np.polynomial.hermite_e.hermegauss(nodes)
    w = w / w.sum()
    a, s = alpha_sigma(np.asarray(gamma))
    total = 0.0
    for k, p_k in enumerate(probs):
        z = a * values[k] + s * u  # [nodes]
        log_mix = logsumexp(np.log(probs) - 0.5 * ((z[:, None] - a * values) / s) ** 2, axis=1)
        total += p_k * float(w @ (-0.5 * u**2 - log_mix))
    return total


def information_destroyed(
    probs: np.ndarray, values: np.ndarray, gamma_0: float, gamma_1: float
) -> float:
    """sum_i I(x_i; z_0) - I(x_i; z_1) in nats for independent dimensions x_i ~ probs [D, K].

    By I-MMSE (Guo, Shamai & Verdu 2005), the exact denoiser's continuous-time diffusion
    loss from gamma_0 to gamma_1.
    """
    return sum(
        mutual_information(gamma_0, p, values) - mutual_information(gamma_1, p, values)
        for p in probs
    )
