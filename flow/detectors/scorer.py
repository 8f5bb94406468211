"""A fitted detector with its pre- and post-processing: feature transform -> detector -> conformal calibration.

:class:`Scorer` is the one module that every path scores through: ``score`` on cached test rows, ``predict`` on
freshly encoded images, and the ONNX graph, which is this module traced behind the backbone.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from flow.detectors.base import Detector, score_in_batches
from flow.detectors.calibration import ConformalCalibration
from flow.detectors.transforms import FeatureTransform


class Scorer(nn.Module):
    """``transform`` on class and patch tokens, then ``detector``, then (calibrated runs) ``calibration`` of the
    detector's primary score.

    Args:
        detector: a fitted :class:`~flow.detectors.base.Detector`.
        transform: its fitted :class:`~flow.detectors.transforms.FeatureTransform` (default ``raw``).
        calibration: the held-out normal scores of the primary score, as a
            :class:`~flow.detectors.calibration.ConformalCalibration`, or None.
    """

    def __init__(self, detector: Detector, transform: FeatureTransform | None = None,
                 calibration: ConformalCalibration | None = None) -> None:
        super().__init__()
        self.detector = detector
        self.transform = transform if transform is not None else FeatureTransform("raw")
        self.calibration = calibration

    @property
    def score_names(self) -> tuple[str, ...]:
        return tuple(self.detector.score_names)

    @property
    def primary_score(self) -> str:
        return self.detector.primary_score

    @property
    def output_names(self) -> list[str]:
        """The keys of :meth:`forward`: every score, then ``p_value`` and ``anomalous`` when calibrated."""
        return [*self.score_names, *(["p_value", "anomalous"] if self.calibration is not None else [])]

    @property
    def device(self) -> torch.device:
        return self.detector.device

    def forward(self, cls: torch.Tensor, patches: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Scores of class tokens (B, D) and patch tokens (B, P, D) (None for detectors that read none), as the cache
        stores them.

        Returns:
            ``{name: (B,) float64}`` for every score (higher = more anomalous), and for a calibrated scorer
            ``p_value`` (B,) float64 and ``anomalous`` (B,) bool.
        """
        tokens = self.transform(patches) if self.detector.uses_patches else None
        out = dict(self.detector(self.transform(cls), tokens))
        if self.calibration is not None:
            out["p_value"], out["anomalous"] = self.calibration(out[self.primary_score])
        return out

    def scores(self, cls, patches=None, batch_size: int = 256) -> dict[str, np.ndarray]:
        """:meth:`forward` in batches without gradients on arrays or tensors of any length (N rows).

        Returns:
            ``{name: (N,) numpy}`` with the keys of :attr:`output_names`.
        """
        return score_in_batches(self, cls, patches if self.detector.uses_patches else None, batch_size)


__all__ = ["Scorer"]
