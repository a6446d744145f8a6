"""The digits Fréchet distance: the distance against closed forms and an independent matrix
square root, the feature network's determinism and cache, and its ordering of image sets."""

import numpy as np
import pytest
from scipy import linalg

from vdm_jax.runner import data, sample_quality


def _random_cov(rng, dims):
    a = rng.normal(size=(dims, dims))
    return a @ a.T / dims + 0.1 * np.eye(dims)


def test_frechet_distance_of_commuting_covariances_is_the_closed_form():
    """Diagonal covariances: ||m1 - m2||^2 + sum (sqrt(a) - sqrt(b))^2."""
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
    want = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = sample_quality.frechet_distance(m1, np.diag(a), m2, np.diag(b))
    assert got == pytest.approx(want, rel=1e-10)


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(1)
    m1, m2 = rng.normal(size=8), rng.normal(size=8)
    c1, c2 = _random_cov(rng, 8), _random_cov(rng, 8)
    cross = linalg.sqrtm(c1 @ c2).real
    want = np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * cross)
    assert sample_quality.frechet_distance(m1, c1, m2, c2) == pytest.approx(want, rel=1e-8)
    assert sample_quality.frechet_distance(m2, c2, m1, c1) == pytest.approx(want, rel=1e-8)
    assert sample_quality.frechet_distance(m1, c1, m1, c1) == pytest.approx(0.0, abs=1e-9)


def test_gaussian_fit_of_samples_recovers_the_distance():
    """Large samples of N(0, C) and N(d, C): the fitted distance tends to ||d||^2."""
    rng = np.random.default_rng(2)
    c = _random_cov(rng, 4)
    shift = np.array([0.5, -0.3, 0.0, 0.2])
    x = rng.multivariate_normal(np.zeros(4), c, size=200_000)
    y = rng.multivariate_normal(shift, c, size=200_000)
    got = sample_quality.frechet_distance(
        *sample_quality.gaussian_fit(x), *sample_quality.gaussian_fit(y)
    )
    assert got == pytest.approx(np.sum(shift**2), abs=5e-3)


def test_feature_net_is_deterministic_cached_and_orders_image_sets(tmp_path):
    workdir = str(tmp_path)
    net = sample_quality.load_or_fit("digits", workdir)
    assert (tmp_path / "sample_quality" / "digits_features.npz").exists()
    again = sample_quality.fit_digits_features()
    np.testing.assert_array_equal(net.weights, again.weights)
    cached = sample_quality.load_or_fit("digits", workdir)
    np.testing.assert_array_equal(cached.weights, net.weights)
    assert cached.test_accuracy == net.test_accuracy > 0.85

    train, _ = data.read_split("digits", "train")
    real = sample_quality.frechet_to_heldout(train[:256], net, "digits")
    assert real["frechet_distance"] == real["frechet_distance_real"]
    noise = np.random.default_rng(3).integers(0, 17, size=(256, 8, 8, 1))
    blurred = (train[:256] + np.roll(train[:256], 1, axis=1)) // 2  # digits, smeared
    d_noise = sample_quality.frechet_to_heldout(noise, net, "digits")["frechet_distance"]
    d_blur = sample_quality.frechet_to_heldout(blurred, net, "digits")["frechet_distance"]
    assert real["frechet_distance"] < d_blur < d_noise
