"""Split-conformal p-values (flow/conformal.py) on hand-made scores: exact values, ties, bounds, the guarantee."""

from __future__ import annotations

import numpy as np
import pytest

from flow.detectors.calibration import (
    check_alpha,
    conformal_p_values,
    decision_threshold,
    false_alarm_band,
    smallest_p_value,
)


def test_p_values_exact_on_hand_made_scores():
    calibration = np.array([1.0, 2.0, 3.0, 4.0])  # n = 4: p = (1 + #{s_i >= s}) / 5
    p = conformal_p_values(calibration, np.array([0.5, 1.0, 2.5, 4.0, 4.5]))
    assert p.tolist() == [5 / 5, 5 / 5, 3 / 5, 2 / 5, 1 / 5]


def test_ties_count_as_at_least_as_anomalous():
    calibration = np.array([2.0, 2.0, 2.0, 7.0])
    assert conformal_p_values(calibration, np.array([2.0]))[0] == pytest.approx(5 / 5)
    assert conformal_p_values(calibration, np.array([2.0000001]))[0] == pytest.approx(2 / 5)
    assert conformal_p_values(calibration, np.array([7.0]))[0] == pytest.approx(2 / 5)


def test_order_of_calibration_scores_does_not_matter_and_nan_stays_nan():
    rng = np.random.default_rng(0)
    calibration = rng.normal(size=50)
    scores = np.array([np.nan, -10.0, 0.0, 10.0])
    a = conformal_p_values(calibration, scores)
    b = conformal_p_values(rng.permutation(calibration), scores)
    np.testing.assert_array_equal(a, b)
    assert np.isnan(a[0])
    assert a[1] == 1.0 and a[3] == smallest_p_value(50) == 1 / 51


def test_false_alarm_rate_is_at_most_alpha_on_exchangeable_scores():
    # the guarantee, checked by simulation: new normal scores from the calibration's distribution
    rng = np.random.default_rng(1)
    rates = []
    for _ in range(200):
        calibration, new = rng.normal(size=99), rng.normal(size=100)
        rates.append(np.mean(conformal_p_values(calibration, new) <= 0.1))
    assert np.mean(rates) <= 0.1 + 3 * np.std(rates) / np.sqrt(len(rates))
    assert np.mean(rates) > 0.08  # and not a trivially conservative test


@pytest.mark.parametrize("bad", [np.array([]), np.array([1.0, np.inf]), np.array([[1.0]])])
def test_bad_calibration_is_refused(bad):
    with pytest.raises(ValueError, match="calibration scores"):
        conformal_p_values(bad, np.array([1.0]))


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 2.0])
def test_alpha_outside_the_open_interval_is_refused(alpha):
    with pytest.raises(ValueError, match="--alpha must be in"):
        check_alpha(alpha)


@pytest.mark.parametrize("alpha", [None, "x", [0.1], True, float("nan")])
def test_an_alpha_that_is_not_a_number_in_the_interval_is_refused_naming_it(alpha):
    with pytest.raises(ValueError, match=r"--alpha must be (a number )?in \(0, 1\); got"):
        check_alpha(alpha)


def test_false_alarm_band_is_the_binomial_quantile():
    from scipy.stats import binom

    assert false_alarm_band(1000, 0.05) == binom.ppf(0.975, 1000, 0.05) / 1000
    assert 0.05 < false_alarm_band(1000, 0.05) < 0.07


def test_false_alarm_band_with_calibration_is_the_beta_binomial_quantile():
    from scipy.stats import betabinom

    # n = 799 held-out rows, alpha 0.05: l = floor(800 * 0.05) = 40 rows may lie at or above a flagged score
    assert false_alarm_band(1000, 0.05, num_calibration=799) == betabinom.ppf(0.975, 1000, 40, 760) / 1000
    assert false_alarm_band(1000, 0.05, num_calibration=799) > false_alarm_band(1000, 0.05)  # wider: one draw
    assert false_alarm_band(1000, 0.01, num_calibration=50) == 0.0  # alpha < 1 / (n + 1): nothing is flagged


def test_beta_binomial_band_holds_in_simulation():
    rng = np.random.default_rng(2)
    n, m, alpha = 99, 200, 0.1
    hi = false_alarm_band(m, alpha, num_calibration=n)
    rates = np.array([np.mean(conformal_p_values(rng.normal(size=n), rng.normal(size=m)) <= alpha)
                      for _ in range(400)])
    assert 0.01 < np.mean(rates > hi) < 0.05  # about 2.5 % above the upper end of a central 95 % band


@pytest.mark.parametrize("n", [1, 3, 19, 20, 57, 400])
@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.1, 0.29, 0.5])
def test_decision_threshold_flags_exactly_the_scores_whose_p_value_is_at_most_alpha(n, alpha):
    rng = np.random.default_rng(n)
    calibration = np.round(rng.normal(size=n), 1)  # rounded: ties among the held-out scores
    scores = np.concatenate([calibration, calibration + 1e-9, rng.normal(size=200), [-9.0, 9.0]])
    threshold = decision_threshold(calibration, alpha)
    flagged = conformal_p_values(calibration, scores) <= alpha
    if threshold is None:
        assert alpha < smallest_p_value(n) and not flagged.any()
    else:
        np.testing.assert_array_equal(flagged, scores > threshold)


def test_min_calibration_rows_is_the_fewest_that_can_flag_an_image():
    """1 / (n + 1) <= alpha first at n = 19 for 0.05, 33 for 0.03 (round(1/alpha) - 1 = 32 said before: too few)."""
    from flow.detectors.calibration import min_calibration_rows

    for alpha, n in ((0.05, 19), (0.03, 33), (0.1, 9), (0.5, 1), (0.01, 99), (0.2, 4)):
        assert min_calibration_rows(alpha) == n
        assert smallest_p_value(n) <= alpha < smallest_p_value(n - 1)
