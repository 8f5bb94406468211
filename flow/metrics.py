"""Image-level detection metrics (scikit-learn)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


class MetricError(ValueError):
    """Scores or labels that give no meaningful metric (non-finite scores, one class only)."""


def auroc(is_anomaly: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve, anomalous = positive (1), higher score = more anomalous (SPEC.md section 1).

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
    is_anomaly = np.asarray(is_anomaly).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if is_anomaly.shape != scores.shape:
        raise MetricError(f"labels have shape {is_anomaly.shape}, scores {scores.shape}")
    bad = int((~np.isfinite(scores)).sum())
    if bad:
        raise MetricError(f"{bad} of {scores.size} anomaly scores are NaN or infinite; no AUROC computed")
    n_anom = int(is_anomaly.sum())
    if n_anom == 0 or n_anom == is_anomaly.size:
        raise MetricError(f"AUROC needs normal and anomalous samples; got {is_anomaly.size - n_anom} normal "
                          f"and {n_anom} anomalous")
    return float(roc_auc_score(is_anomaly.astype(np.int64), scores))
