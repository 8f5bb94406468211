"""Baseline detectors: exact values on hand-made data, the known-answer Gaussian test, state round trip."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.covariance import LedoitWolf

from flow.detectors.gaussian import GaussianDetector
from flow.detectors.knn import KNNDetector
from flow.detectors.registry import BASELINES
from flow.experiments.metrics import auroc


def test_knn_exact_distances():
    train = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    detector = KNNDetector(k=2).fit(train)
    scores = detector.scores(np.array([[0.0, 0.0], [3.0, 4.0]]))
    # (0,0): nearest (0,0) at 0 and (1,0) at 1 -> 1/2; (3,4): (1,0) at sqrt(20), (0,2) at sqrt(13)
    np.testing.assert_allclose(scores["l2"], [0.5, (np.sqrt(20) + np.sqrt(13)) / 2], rtol=1e-6)
    # cosine distance to the direction of (3,4): (1,0) -> 1 - 3/5, (0,2) -> 1 - 4/5; (0,0) has no direction
    np.testing.assert_allclose(scores["cosine"][1], (0.4 + 0.2) / 2, rtol=1e-6)
    assert scores["l2"].dtype == np.float64 and scores["l2"].shape == (2,)
    with pytest.raises(ValueError, match="needs at least 2 train vectors"):
        KNNDetector(k=2).fit(train[:1])
    with pytest.raises(ValueError, match="k must be >= 1"):
        KNNDetector(k=0)


def test_gaussian_is_ledoit_wolf_mahalanobis():
    rng = np.random.default_rng(0)
    train = rng.standard_normal((50, 4)) @ np.diag([1.0, 2.0, 0.5, 3.0])
    test = rng.standard_normal((7, 4))
    detector = GaussianDetector().fit(train)
    reference = LedoitWolf().fit(train)
    np.testing.assert_allclose(detector.scores(test)["mahalanobis"], reference.mahalanobis(test), rtol=1e-10)
    assert 0.0 <= detector.shrinkage <= 1.0
    with pytest.raises(ValueError, match="at least 2 train vectors"):
        GaussianDetector().fit(train[:1])


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_baseline_separates_shifted_gaussians(name):
    """Normal N(mu, I), anomalies N(mu + 6 v, I) in D = 16: AUROC >= 0.99 for every score.

    mu is off the origin (6 on the first 8 channels) and v points elsewhere (1 on the last 8), because the
    cosine distance ignores norms: around the origin, N(0, I) covers every direction and N(6, I) would be
    indistinguishable by angle (AUROC about 0.8 there, measured)."""
    rng = np.random.default_rng(1)
    mu = np.r_[np.full(8, 6.0), np.zeros(8)]
    v = np.r_[np.zeros(8), np.ones(8)]
    train = rng.standard_normal((300, 16)) + mu
    test = np.concatenate([rng.standard_normal((100, 16)) + mu, rng.standard_normal((100, 16)) + mu + 6.0 * v])
    is_anomaly = np.r_[np.zeros(100), np.ones(100)]
    detector = BASELINES[name]().fit(train)
    scores = detector.scores(test)
    assert set(scores) == set(detector.score_names)
    for score_name, values in scores.items():
        assert auroc(is_anomaly, values) >= 0.99, score_name
    clone = BASELINES[name].from_state(detector.params(), detector.state())  # what a saved run restores
    for score_name, values in clone.scores(test).items():
        np.testing.assert_array_equal(values, scores[score_name])
