"""A sample-quality figure that needs no download: a Fréchet distance in a classifier's features.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
Nash Equilibrium") compares Gaussian fits of two image sets in the feature space of an
Inception network, which is a download. The embedded digits need none: a small classifier
trained on the digits' *training* split (a scikit-learn MLP with one hidden layer of 64 ReLU
units, L-BFGS from a fixed seed, two seconds; 92.6% accuracy on the held-out split) gives 64
features per image, and the Fréchet distance between the features of samples and of the
held-out split is this module's figure::

    d^2 = ||m_1 - m_2||^2 + Tr(C_1 + C_2 - 2 (C_1 C_2)^{1/2}).

Like FID it is biased upwards at small sample counts, and noisy, so compare figures at the
same count; :func:`frechet_to_heldout` also reports as many real training images, what a
perfect model would score up to that noise (at 64 images a set of samples can read below
it; at 512, three seeds of one sampler spread over 14.3-17.1). The classifier is fitted
once and cached in the workdir, so a run's figures keep one feature space (a damaged cache
stops the run, naming the file, rather than being refitted silently). Datasets with a
feature network are the keys of :data:`FEATURE_NETS`; for the others the figure is not
computed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import numpy as np

from vdm_jax.runner import data
from vdm_jax.runner.workdir import DamagedRecordError

CACHE_DIR = "sample_quality"


@dataclasses.dataclass(frozen=True)
class FeatureNet:
    """One ReLU layer of a trained classifier: ``features = relu(x W + b)``.

    Attributes:
      weights: [D, F] first-layer weights, for images scaled to [0, 1] and flattened.
      bias: [F].
      test_accuracy: the classifier's accuracy on the held-out split (a sanity figure).
    """

    weights: np.ndarray
    bias: np.ndarray
    test_accuracy: float

    def features(self, images: np.ndarray, vocab_size: int) -> np.ndarray:
        """Integer images [N, H, W, C] in {0..K-1} -> float64 features [N, F]."""
        x = np.asarray(images, np.float64).reshape(len(images), -1) / (vocab_size - 1)
        return np.maximum(x @ self.weights + self.bias, 0.0)


def fit_digits_features(seed: int = 0) -> FeatureNet:
    """Trains the digits classifier (training split only) and keeps its hidden layer."""
    from sklearn.neural_network import MLPClassifier

    train_x, train_y = data.read_split("digits", "train")
    test_x, test_y = data.read_split("digits", "eval")
    scale = data.DATASETS["digits"].vocab_size - 1
    classifier = MLPClassifier(
        hidden_layer_sizes=(64,), solver="lbfgs", alpha=1e-3, max_iter=300, random_state=seed
    )
    classifier.fit(train_x.reshape(len(train_x), -1) / scale, train_y)
    accuracy = classifier.score(test_x.reshape(len(test_x), -1) / scale, test_y)
    return FeatureNet(classifier.coefs_[0], classifier.intercepts_[0], float(accuracy))


# Dataset name -> the feature network's fitting function.
FEATURE_NETS: dict[str, Callable[[], FeatureNet]] = {"digits": fit_digits_features}


def load_or_fit(dataset: str, workdir: str, write: bool = True) -> FeatureNet:
    """The feature network of ``dataset``, from ``{workdir}/sample_quality/`` or fitted there.

    Args:
      dataset: a key of :data:`FEATURE_NETS`.
      workdir: the run's directory.
      write: save a newly fitted network (only the chief process should).

    Raises:
      DamagedRecordError: the cached network cannot be read; the file is left as it is.
    """
    path = os.path.join(workdir, CACHE_DIR, f"{dataset}_features.npz")
    if os.path.exists(path):
        try:
            with np.load(path) as saved:
                return FeatureNet(saved["weights"], saved["bias"], float(saved["test_accuracy"]))
        except Exception as e:  # Truncated zip, missing member, bad array header, ...
            reason = " ".join(f"{type(e).__name__}: {e}".split())
            raise DamagedRecordError(
                f"{path} is damaged ({reason}); it caches the feature network of this "
                "workdir's sample-quality figures, so that they stay comparable. Restore it "
                "from a copy, or delete it and the run fits the network again (the same "
                "seed; another scikit-learn version may move the figures slightly)"
            ) from e
    net = FEATURE_NETS[dataset]()
    if write:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, weights=net.weights, bias=net.bias, test_accuracy=net.test_accuracy)
        os.replace(tmp, path)
    return net


def gaussian_fit(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [F] and covariance [F, F] (unbiased) of features [N, F], N >= 2."""
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(c: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(c)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(
    mean_1: np.ndarray, cov_1: np.ndarray, mean_2: np.ndarray, cov_2: np.ndarray
) -> float:
    """The squared Fréchet (2-Wasserstein) distance between two Gaussians.

    ``Tr((C_1 C_2)^{1/2})`` is computed as the trace of ``(S C_2 S)^{1/2}`` with
    ``S = C_1^{1/2}``, which has the same eigenvalues and is symmetric (stable eigh).
    """
    root = _psd_sqrt(cov_1)
    cross = np.linalg.eigvalsh(root @ cov_2 @ root)
    trace_cross = float(np.sum(np.sqrt(np.clip(cross, 0.0, None))))
    diff = mean_1 - mean_2
    return float(diff @ diff + np.trace(cov_1) + np.trace(cov_2) - 2.0 * trace_cross)


def frechet_to_heldout(
    samples: np.ndarray, net: FeatureNet, dataset: str, data_dir: str | None = None
) -> dict[str, float]:
    """The figure for integer samples [N, H, W, C] against ``dataset``'s held-out split.

    Returns:
      ``frechet_distance``: samples against the held-out images;
      ``frechet_distance_real``: the first min(N, train size) training images against the
      same held-out images (a perfect model's figure at this count, up to its noise);
      ``feature_net_test_accuracy``.
    """
    vocab_size = data.DATASETS[dataset].vocab_size
    heldout, _ = data.read_split(dataset, "eval", data_dir)
    train, _ = data.read_split(dataset, "train", data_dir, count=len(samples))
    reference = gaussian_fit(net.features(heldout, vocab_size))
    fit = gaussian_fit(net.features(samples, vocab_size))
    real = gaussian_fit(net.features(train, vocab_size))
    return {
        "frechet_distance": frechet_distance(*fit, *reference),
        "frechet_distance_real": frechet_distance(*real, *reference),
        "feature_net_test_accuracy": net.test_accuracy,
    }
