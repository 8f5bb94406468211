"""The Gaussian detector on class tokens: squared Mahalanobis distance (docs/method.md, eq. (29)-(30)).

A Gaussian fitted on the normal train class tokens with Ledoit-Wolf shrinkage (scikit-learn's
:class:`sklearn.covariance.LedoitWolf` fits it); scoring is the module's own, in float64. It reads only the class
tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

from flow.detectors.base import Detector


class GaussianDetector(Detector):
    """``score(y) = (y - mu)^T Sigma^-1 (y - mu)``, with ``mu`` the sample mean and ``Sigma`` the Ledoit-Wolf shrunk
    covariance of the normal train class tokens (the value of ``LedoitWolf.mahalanobis``).

    Fitted state: ``location`` (D,), ``precision`` (D, D) and ``shrinkage`` (), float64.

    Raises:
        ValueError: (at :meth:`fit`) fewer than 2 train rows.
    """

    method = "gaussian"
    score_names = ("mahalanobis",)
    primary_score = "mahalanobis"

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("location", None)
        self.register_buffer("precision", None)
        self.register_buffer("shrinkage", None)

    def min_train_rows(self) -> int:
        """The fewest train rows :meth:`fit` accepts: 2 (a covariance)."""
        return 2

    def fit(self, cls, patches=None, val_cls=None, val_patches=None) -> "GaussianDetector":
        """Fit mean and shrunk covariance on the (N, D) normal train class tokens (float64)."""
        x = cls.double().cpu().numpy() if isinstance(cls, torch.Tensor) else np.asarray(cls, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"the Gaussian baseline needs at least 2 train vectors of shape (N, D); got {x.shape}")
        estimator = LedoitWolf().fit(x)
        self._set(estimator.location_, estimator.get_precision(), estimator.shrinkage_)
        return self

    def _set(self, location, precision, shrinkage) -> None:
        self.location = torch.as_tensor(np.asarray(location, dtype=np.float64))
        self.precision = torch.as_tensor(np.asarray(precision, dtype=np.float64))
        self.shrinkage = torch.as_tensor(np.float64(shrinkage))

    def forward(self, cls: torch.Tensor, patches: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"mahalanobis": (B,)}`` float64 squared distances of the class tokens ``cls`` (B, D) (eq. (30)).

        Raises:
            RuntimeError: the detector is not fitted.
        """
        if self.location is None:
            raise RuntimeError("fit the detector first")
        centred = cls.double() - self.location
        return {"mahalanobis": ((centred @ self.precision) * centred).sum(dim=1)}

    @classmethod
    def from_state(cls, params: dict[str, Any], state: dict[str, Any]) -> "GaussianDetector":
        detector = cls(**params)
        detector._set(*(np.asarray(state[key], dtype=np.float64) for key in ("location", "precision", "shrinkage")))
        return detector


__all__ = ["GaussianDetector"]
