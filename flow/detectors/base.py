"""The detector contract: fit on the normal class's rows, then map tokens to named anomaly scores.

Every detector (the SANF flow, its ablation without CAFF, k-NN, the Gaussian) is one :class:`torch.nn.Module`
whose ``forward`` is the only implementation of its scoring: ``score``, ``predict``, the ONNX export and anything
later call it (docs/architecture.md). Scikit-learn may *fit* a detector (Ledoit-Wolf), never score it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn


class Detector(nn.Module):
    """Base class of the detectors: a fitted state (buffers or parameters) and a scoring ``forward``.

    Class attributes:
        score_names: the scores ``forward`` returns, in output order.
        primary_score: the score that ``predict`` writes as ``score`` and calibrates.
        uses_patches: whether ``forward`` reads the patch tokens (only the CAFF flow does).
    """

    method: str = ""
    score_names: ClassVar[tuple[str, ...]] = ()
    primary_score: ClassVar[str] = ""
    uses_patches: bool = False

    def fit(self, cls: torch.Tensor | np.ndarray, patches: torch.Tensor | np.ndarray | None = None,
            val_cls: torch.Tensor | np.ndarray | None = None,
            val_patches: torch.Tensor | np.ndarray | None = None) -> "Detector":
        """Fit on the normal class's rows: class tokens (N, D) and patch tokens (N, P, D) (None for detectors that
        do not read them); ``val_*``: held-out normal rows that the flows track their loss on (ignored by the
        baselines). Returns the detector itself.

        Raises:
            ValueError: too few rows (:meth:`min_train_rows`) or wrong shapes.
        """
        raise NotImplementedError

    def forward(self, cls: torch.Tensor, patches: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``{name: (B,) float64}`` for class tokens (B, D) and patch tokens (B, P, D); higher = more anomalous."""
        raise NotImplementedError

    def min_train_rows(self) -> int:
        """The fewest rows :meth:`fit` accepts."""
        return 1

    def params(self) -> dict[str, Any]:
        """The settings that rebuild the detector with :meth:`from_state` (JSON; ``run.json`` keeps them)."""
        return {}

    def fit_record(self) -> dict[str, Any]:
        """What the fit measured, for ``run.json`` (JSON: losses, epochs, parameter counts...)."""
        return {}

    def state(self) -> dict[str, torch.Tensor]:
        """The fitted tensors a run folder stores (``model.safetensors``), on the CPU."""
        return {key: value.detach().cpu().contiguous() for key, value in self.state_dict().items()}

    @classmethod
    def from_state(cls, params: dict[str, Any], state: dict[str, Any]) -> "Detector":
        """Rebuild a fitted detector from :meth:`params` and :meth:`state` (tensors or arrays).

        Raises:
            TypeError, ValueError, KeyError: they do not describe a detector of this class.
        """
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        """Where the detector's tensors are (the CPU for one without any)."""
        for tensor in (*self.parameters(), *self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def scores(self, cls, patches=None, batch_size: int = 256) -> dict[str, np.ndarray]:
        """:meth:`forward` in batches without gradients, for arrays or tensors of any size.

        Returns:
            ``{name: (N,) float64 numpy}``; the scores do not depend on ``batch_size`` beyond float rounding.
        """
        return score_in_batches(self, cls, patches if self.uses_patches else None, batch_size)


def as_tensor(x: torch.Tensor | np.ndarray | None, dtype: torch.dtype | None = torch.float32) -> torch.Tensor | None:
    """``x`` as a torch tensor of ``dtype``; with ``dtype=None`` float64 stays float64 and anything else becomes
    float32 (arrays are copied only when their dtype changes)."""
    if x is None:
        return None
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if dtype is None:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.to(dtype)


@torch.no_grad()
def score_in_batches(module: nn.Module, cls, patches, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Run ``module(cls, patches)`` (a detector or a :class:`~flow.detectors.scorer.Scorer`) over rows in batches of
    ``batch_size`` on the module's device, in eval mode.

    Args:
        module: returns ``{name: (B,) tensor}`` for class tokens (B, D) and patch tokens (B, P, D) or None.
        cls: (N, D) class tokens, numpy or torch (float64 kept, anything else cast to float32; each detector
            computes in its own dtype).
        patches: (N, P, D) patch tokens, or None.
        batch_size: rows per forward pass.

    Returns:
        ``{name: (N,) numpy}`` (float64 scores; the decisions of a calibrated scorer as bool).
    """
    module.eval()
    device = getattr(module, "device", torch.device("cpu"))
    cls = as_tensor(cls, None)
    patches = as_tensor(patches, None)
    parts: dict[str, list[np.ndarray]] = {}
    for begin in range(0, cls.shape[0], batch_size):
        y = cls[begin:begin + batch_size].to(device)
        tokens = None if patches is None else patches[begin:begin + batch_size].to(device)
        for key, value in module(y, tokens).items():
            parts.setdefault(key, []).append(value.cpu().numpy())
    if not parts:  # no rows: empty arrays of every output
        names = getattr(module, "output_names", None) or module.score_names
        return {name: np.zeros(0) for name in names}
    return {key: np.concatenate(values) for key, values in parts.items()}


__all__ = ["Detector", "as_tensor", "score_in_batches"]
