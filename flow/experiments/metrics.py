"""Image-level detection metrics (scikit-learn)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve


class MetricError(ValueError):
    """Scores or labels that give no meaningful metric (non-finite scores, one class only)."""


def auroc(is_anomaly: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve, anomalous = positive (1), higher score = more anomalous (docs/method.md eq. (1)).

    Computed on the raw scores by :func:`sklearn.metrics.roc_auc_score`; a value below 0.5 is reported
    as it is, never flipped.

    Args:
        is_anomaly: (N,) 0/1 or bool, 1 for anomalous samples.
        scores: (N,) anomaly scores.

    Returns:
        AUROC in [0, 1].

    Raises:
        MetricError: some scores are NaN or infinite (the message says how many), or the labels hold
            only one class.
    """
    labels, scores = _checked(is_anomaly, scores, "AUROC")
    return float(roc_auc_score(labels, scores))


def aupr(is_anomaly: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve with anomalous as the positive class (average precision,
    :func:`sklearn.metrics.average_precision_score`). Chance level is the anomalous fraction.

    Args and raises: as :func:`auroc`.
    """
    labels, scores = _checked(is_anomaly, scores, "AUPR")
    return float(average_precision_score(labels, scores))


def fpr_at_tpr(is_anomaly: np.ndarray, scores: np.ndarray, tpr: float = 0.95) -> float:
    """False-positive rate (normal images flagged) at the first threshold whose true-positive rate
    (anomalies caught) reaches ``tpr``, from :func:`sklearn.metrics.roc_curve`. Lower is better.

    Args:
        is_anomaly, scores: as :func:`auroc`.
        tpr: the true-positive rate to reach, in (0, 1] (default 0.95: "FPR at 95 % TPR").

    Raises:
        MetricError: as :func:`auroc`.
        ValueError: ``tpr`` outside (0, 1].
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    labels, scores = _checked(is_anomaly, scores, "FPR")
    fprs, tprs, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(fprs[np.searchsorted(tprs, tpr, side="left")])


def _checked(is_anomaly: np.ndarray, scores: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    is_anomaly = np.asarray(is_anomaly).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if is_anomaly.shape != scores.shape:
        raise MetricError(f"labels have shape {is_anomaly.shape}, scores {scores.shape}")
    bad = int((~np.isfinite(scores)).sum())
    if bad:
        raise MetricError(f"{bad} of {scores.size} anomaly scores are NaN or infinite; no {metric} computed")
    n_anom = int(is_anomaly.sum())
    if n_anom == 0 or n_anom == is_anomaly.size:
        raise MetricError(f"{metric} needs normal and anomalous samples; got {is_anomaly.size - n_anom} normal "
                          f"and {n_anom} anomalous")
    return is_anomaly.astype(np.int64), scores
