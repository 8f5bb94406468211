"""Split-conformal p-values: decisions calibrated on normal images only.

A run fitted with held-out normal train rows (``fit --val-fraction F``) keeps their scores s_1..s_n. A new
image with score s (higher = more anomalous) gets the conformal p-value

    p(s) = (1 + #{i : s_i >= s}) / (n + 1),

and is flagged anomalous when p(s) <= alpha. If the new normal images are exchangeable with the held-out ones
(drawn from the same distribution, independently of how the held-out rows were chosen), then
P(p <= alpha) <= alpha for each of them: the false-alarm rate is at most alpha, whatever the detector.
Reference: S. Bates, E. Candes, L. Lei, Y. Romano, M. Sesia, "Testing for outliers with conformal p-values",
Annals of Statistics 51(1), 2023 (the marginal p-value of their eq. (2)). The guarantee is marginal (over the
draw of the held-out rows too); for the realised rate on a test set, see :func:`false_alarm_band`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

#: The default significance level of ``predict`` and ``score``: at most 5 % of normal images flagged.
DEFAULT_ALPHA = 0.05


class ConformalCalibration(nn.Module):
    """The post-processing module after a detector: held-out normal scores -> conformal p-value -> decision.

    ``forward(scores)`` gives p(s) = (1 + #{i : s_i >= s}) / (n + 1) (docs/method.md, eq. (36)) and the decision
    p(s) <= alpha (eq. (37)); a NaN score gets a NaN p-value and is not flagged. The only implementation of the
    p-value: ``score``, ``predict`` and the ONNX graph all run this module.

    Args:
        calibration: (n,) scores of held-out normal rows, n >= 1, finite (any array or tensor; kept as float64).
        alpha: the significance level of the decisions, in (0, 1).

    Raises:
        ValueError: ``calibration`` empty, not 1-D, or non-finite; ``alpha`` outside (0, 1).
    """

    def __init__(self, calibration, alpha: float = DEFAULT_ALPHA) -> None:
        super().__init__()
        values = calibration.detach().cpu().double().numpy() if isinstance(calibration, torch.Tensor) else calibration
        self.register_buffer("calibration", torch.from_numpy(_checked_calibration(values).copy()))
        self.alpha = check_alpha(alpha)

    @property
    def num_rows(self) -> int:
        """n, the held-out rows."""
        return int(self.calibration.numel())

    def p_values(self, scores: torch.Tensor) -> torch.Tensor:
        """(B,) float64 p-values in [1 / (n + 1), 1] of the (B,) scores (higher = more anomalous); NaN for NaN."""
        scores = scores.double()
        at_least = (self.calibration.unsqueeze(0) >= scores.unsqueeze(1)).sum(dim=1).double()  # #{s_i >= s}
        p = (1.0 + at_least) / (self.calibration.numel() + 1.0)
        return torch.where(torch.isnan(scores), torch.full_like(p, float("nan")), p)

    def forward(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(p_value (B,) float64, anomalous (B,) bool)`` for the (B,) scores: anomalous when p_value <= alpha."""
        p = self.p_values(scores)
        return p, p <= self.alpha


def conformal_p_values(calibration: np.ndarray, scores: np.ndarray, block: int = 4096) -> np.ndarray:
    """:class:`ConformalCalibration`'s p-values for arrays: p(s) = (1 + #{calibration >= s}) / (n + 1) (eq. (36)).

    Args:
        calibration: (n,) scores of held-out normal rows, n >= 1, finite.
        scores: (m,) scores of new images (higher = more anomalous); NaN gives NaN.
        block: scores compared at once (memory: block x n comparisons).

    Returns:
        (m,) float64 p-values in [1 / (n + 1), 1].

    Raises:
        ValueError: ``calibration`` empty, not 1-D, or non-finite.
    """
    module = ConformalCalibration(calibration)
    scores = torch.from_numpy(np.asarray(scores, dtype=np.float64).reshape(-1))
    return torch.cat([module.p_values(scores[i:i + block]) for i in range(0, len(scores), block)]
                     or [torch.zeros(0, dtype=torch.float64)]).numpy()


def _checked_calibration(calibration: np.ndarray) -> np.ndarray:
    """``calibration`` as a float64 array (n,).

    Raises:
        ValueError: it is empty, not 1-D, or not finite.
    """
    calibration = np.asarray(calibration, dtype=np.float64)
    if calibration.ndim != 1 or calibration.size == 0 or not np.isfinite(calibration).all():
        raise ValueError(f"calibration scores must be a non-empty 1-D array of finite values; got shape "
                         f"{calibration.shape}")
    return calibration


def decision_threshold(calibration: np.ndarray, alpha: float) -> float | None:
    """The score t above which an image is flagged: p(s) <= alpha exactly when s > t (for any s, ties included).

    With the held-out scores sorted, s_(1) <= ... <= s_(n), and m the largest count with (1 + m) / (n + 1) <= alpha,
    t = s_(n - m): a score above it has at most m held-out scores at or above it.

    Args:
        calibration: (n,) scores of held-out normal rows, n >= 1, finite.
        alpha: the significance level, in (0, 1).

    Returns:
        t (in the score's unit), or None when no score can be flagged (alpha < 1 / (n + 1)).

    Raises:
        ValueError: ``calibration`` empty, not 1-D, or non-finite; ``alpha`` outside (0, 1).
    """
    alpha = check_alpha(alpha)
    calibration = _checked_calibration(calibration)
    n = calibration.size
    allowed = np.flatnonzero((1.0 + np.arange(n + 1)) / (n + 1.0) <= alpha)  # the p-value's own arithmetic
    if allowed.size == 0:
        return None
    return float(np.sort(calibration)[n - int(allowed[-1]) - 1])


def check_alpha(alpha: float) -> float:
    """``alpha`` if it lies in (0, 1).

    Raises:
        ValueError: otherwise (the message names ``--alpha``).
    """
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"--alpha must be a number in (0, 1); got {alpha!r}") from None
    if isinstance(alpha, bool) or not 0.0 < value < 1.0:
        raise ValueError(f"--alpha must be in (0, 1); got {alpha}")
    return value


def smallest_p_value(num_calibration: int) -> float:
    """1 / (n + 1): no image can be flagged at an alpha below this."""
    return 1.0 / (num_calibration + 1.0)


def min_calibration_rows(alpha: float) -> int:
    """The fewest held-out rows n whose smallest p-value 1 / (n + 1) is <= ``alpha`` (19 at alpha 0.05): with
    fewer, no image can be flagged. ``alpha`` in (0, 1), as :func:`check_alpha` allows."""
    n = max(0, math.floor(1 / alpha) - 2)  # at or below the answer, whatever the rounding of 1 / alpha
    while smallest_p_value(n) > alpha:
        n += 1
    return n


def false_alarm_band(num_normal: int, alpha: float, level: float = 0.95, num_calibration: int | None = None) -> float:
    """The upper end of the central ``level`` band of the false-alarm rate realised on ``num_normal`` new normal
    images, as a share.

    Without ``num_calibration``: the binomial (num_normal, alpha) quantile at (1 + level) / 2, over num_normal:
    the spread of num_normal independent images each flagged with probability alpha; it leaves out the spread
    that the draw of the held-out rows adds when one calibration serves every image.

    With ``num_calibration`` = n: the exact band of split conformal for continuous scores. Given the held-out
    scores, each new normal image is flagged with the same probability, which is Beta(l, n + 1 - l) distributed
    with l = floor((n + 1) alpha) (its mean l / (n + 1) <= alpha), so the count is beta-binomial (V. Vovk,
    "Conditional validity of inductive conformal predictors", ACML 2012; A. Angelopoulos, S. Bates, "A gentle
    introduction to conformal prediction", 2021, section 3). Source of the quantiles: scipy.stats.
    """
    from scipy.stats import betabinom, binom

    if num_calibration is None:
        return float(binom.ppf((1.0 + level) / 2.0, num_normal, alpha)) / num_normal
    allowed = math.floor((num_calibration + 1) * alpha)
    if allowed == 0:
        return 0.0
    return float(betabinom.ppf((1.0 + level) / 2.0, num_normal, allowed, num_calibration + 1 - allowed)) / num_normal


__all__ = ["ConformalCalibration", "DEFAULT_ALPHA", "check_alpha", "conformal_p_values", "decision_threshold",
           "false_alarm_band", "smallest_p_value"]
