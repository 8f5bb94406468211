"""The k-nearest-neighbour detector on class tokens (docs/method.md, eq. (27)-(28)).

The deep nearest-neighbour baseline (Bergman, Cohen & Hoshen 2020; PANDA without fine-tuning, Reiss et al. 2021):
the mean distance of a class token to its k nearest normal train class tokens, Euclidean (``l2``) and cosine
(``cosine`` = 1 - cosine similarity). Exact (brute force), in float64. It reads only the class tokens (the
semantic vectors), never the patch tokens, so it isolates what the flow adds on identical features.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from flow.detectors.base import Detector, as_tensor


class KNNDetector(Detector):
    """Mean L2 and cosine distance to the k nearest normal train class tokens.

    Fitted state: ``train_cls`` (N, D) float32, the normal train class tokens.

    Args:
        k: neighbours averaged (PANDA: 2).

    Raises:
        ValueError: ``k < 1``, or (at :meth:`fit`) fewer than k train rows.
    """

    method = "knn"
    score_names = ("l2", "cosine")
    primary_score = "cosine"

    def __init__(self, k: int = 2) -> None:
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.register_buffer("train_cls", None)

    def params(self) -> dict[str, Any]:
        return {"k": self.k}

    def min_train_rows(self) -> int:
        """The fewest train rows :meth:`fit` accepts: k."""
        return self.k

    def fit(self, cls, patches=None, val_cls=None, val_patches=None) -> "KNNDetector":
        """Keep the (N, D) normal train class tokens (float32)."""
        cls = as_tensor(cls)
        if cls.dim() != 2 or len(cls) < self.k:
            raise ValueError(f"k-NN with k = {self.k} needs at least {self.k} train vectors of shape (N, D); "
                             f"got {tuple(cls.shape)}")
        self.train_cls = cls.contiguous()
        return self

    def forward(self, cls: torch.Tensor, patches: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"l2": (B,), "cosine": (B,)}`` float64 mean distances of the class tokens ``cls`` (B, D) to their k
        nearest train class tokens (eq. (27), (28)).

        Raises:
            RuntimeError: the detector is not fitted.
        """
        if self.train_cls is None:
            raise RuntimeError("fit the detector first")
        bank = self.train_cls.double()
        q = cls.float().double()  # class tokens are float32, as cached and as the fitted bank
        # ||q - b||^2 = ||q||^2 - 2 q.b + ||b||^2, clamped at 0 against rounding
        squared = (q.pow(2).sum(dim=1, keepdim=True) - 2.0 * q @ bank.T + bank.pow(2).sum(dim=1)).clamp_min(0.0)
        l2 = squared.sqrt().topk(self.k, dim=1, largest=False).values.mean(dim=1)
        unit_bank = bank / bank.norm(dim=1, keepdim=True).clamp_min(1e-300)
        unit = q / q.norm(dim=1, keepdim=True).clamp_min(1e-300)
        cosine = (1.0 - unit @ unit_bank.T).clamp(0.0, 2.0).topk(self.k, dim=1, largest=False).values.mean(dim=1)
        return {"l2": l2, "cosine": cosine}

    @classmethod
    def from_state(cls, params: dict[str, Any], state: dict[str, Any]) -> "KNNDetector":
        return cls(**params).fit(np.asarray(state["train_cls"], dtype=np.float32))


__all__ = ["KNNDetector"]
