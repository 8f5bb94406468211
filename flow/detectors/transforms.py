"""Feature transforms applied to cached tokens before any detector sees them (``fit``/``sweep --transform``).

The default, ``auto`` (:func:`resolve_features`), is ``ssqrt-l2`` on the final features of a CNN and ``raw`` (the
paper's) on anything else; the paper's exact setting is ``--transform raw``.

One transform maps every token the same way, class token and patch tokens alike, so the channels of the patch
tokens stay aligned with those of the class token (what the class attention of CAFF, docs/method.md eq. (14)-(16),
mixes) and every method (flow, k-NN, Gaussian) sees identical vectors. Statistics that need fitting (means, deviations,
covariances) are computed from the class tokens of the rows the detector is fitted on (the normal class's train
rows minus any held-out calibration rows), never from the test split.

========================  =====================================================================================
``raw``                   the cached values (the paper's setting)
``l2``                    x / ||x||_2 * sqrt(D) per token: unit length, scaled so that each channel has unit
                          mean square (what the flow's unit-Gaussian base expects)
``ssqrt-l2``              signed square root sign(x) sqrt(|x|), then as ``l2`` (the power normalisation of
                          Perronnin et al. 2010, "Improving the Fisher kernel"; tames heavy-tailed, sparse
                          post-ReLU channels)
``standardize``           (x - mean) / std per channel, mean and std of the fitted class tokens
``pca-whiten``            Lambda^-1/2 V^T (x - mean): PCA whitening with the Ledoit-Wolf covariance of the fitted
                          class tokens (well conditioned when the rows are fewer than D;
                          :class:`sklearn.covariance.LedoitWolf`), components by decreasing variance
========================  =====================================================================================

Knows nothing of files. A run stores :meth:`FeatureTransform.state` (see :mod:`flow.store.run_folder`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

#: The transforms (what a run records as its ``feature_transform``).
FEATURE_TRANSFORMS = ("raw", "l2", "ssqrt-l2", "standardize", "pca-whiten")
#: The paper's setting, and what a run without a ``feature_transform`` entry (fitted before the option) used.
PAPER_FEATURES = "raw"
#: ``--transform auto``: chosen from what the cache holds, see :func:`resolve_features`.
AUTO = "auto"
#: ``--transform`` values.
FEATURE_CHOICES = (AUTO,) + FEATURE_TRANSFORMS
#: The ``--transform`` default.
DEFAULT_FEATURES = AUTO
#: Transforms whose statistics are fitted on the normal train rows.
FITTED = ("standardize", "pca-whiten")
#: A channel whose standard deviation (or a component whose variance's square root) is below this fraction of the
#: mean one is taken as constant: it is centred but keeps the typical channel's scale instead of being blown up
#: (a dead ReLU channel would otherwise turn a tiny test value into a huge one). As scikit-learn's StandardScaler
#: leaves zero-variance features unscaled.
STD_FLOOR = 1e-3


def check_features(name: str, allow_auto: bool = False) -> str:
    """Return ``name`` if it is a known transform (or ``auto``, when ``allow_auto``).

    Raises:
        ValueError: names ``--transform``, the allowed values and the value received.
    """
    allowed = FEATURE_CHOICES if allow_auto else FEATURE_TRANSFORMS
    if name not in allowed:
        raise ValueError(f"--transform must be one of {', '.join(allowed)}; got {name!r}")
    return name


def resolve_features(name: str, cache_attrs: dict[str, Any]) -> str:
    """The transform ``--transform name`` means for a cache: ``name`` itself, or for ``auto`` the measured choice.

    ``auto`` is ``ssqrt-l2`` for the final pooled features of a CNN (cache attributes ``semantic_vector`` =
    ``spatial_mean``, ``layer`` = ``final``), which pass through a ReLU-type activation: sparse, heavy-tailed,
    non-negative channels, on which ``ssqrt-l2`` gave every detector a higher AUROC than ``raw`` in the feature
    study (docs/results.md, "Which features": k-NN, Gaussian and both flows, EfficientNet-Lite0 on CIFAR-10 and
    Fashion-MNIST). It is ``raw``, the paper's setting, for everything else: ViT class tokens (already through a
    LayerNorm, where the paper's flow was measured) and other layers (signed, not sparse; there ``ssqrt-l2``
    lowered both baselines on the pre-activation features and gained no more than ``l2`` on block-4).

    Args:
        name: a ``--transform`` value (:data:`FEATURE_CHOICES`).
        cache_attrs: the cache's root attributes (``semantic_vector``; ``layer``, ``final`` when absent).

    Raises:
        ValueError: an unknown ``name``.
    """
    check_features(name, allow_auto=True)
    if name != AUTO:
        return name
    cnn_final = (cache_attrs.get("semantic_vector") == "spatial_mean"
                 and cache_attrs.get("layer", "final") == "final")
    return "ssqrt-l2" if cnn_final else PAPER_FEATURES


class FeatureTransform(nn.Module):
    """A per-token map x (..., D) -> (..., D), float32, fitted on normal class tokens when it needs statistics
    (docs/method.md, eq. (31)-(35)); the pre-processing module in front of every detector.

    Fitted state (buffers, float32; None where the transform has none): ``shift`` (D,) subtracted first, then
    ``scale`` (D,) multiplied (standardize) or ``matrix`` (D, D) applied on the right (pca-whiten).

    Args:
        name: one of :data:`FEATURE_TRANSFORMS`.

    Raises:
        ValueError: an unknown ``name``.
    """

    def __init__(self, name: str = PAPER_FEATURES) -> None:
        super().__init__()
        self.name = check_features(name)
        for key in ("shift", "matrix", "scale"):
            self.register_buffer(key, None)

    @property
    def fitted(self) -> bool:
        """Whether the statistics it needs are there (always true for the stateless transforms)."""
        return self.name not in FITTED or self.shift is not None

    def fit(self, cls: np.ndarray | torch.Tensor) -> "FeatureTransform":
        """Fit the statistics on (N, D) normal class tokens (no-op for the stateless transforms).

        Raises:
            ValueError: fewer than 2 rows, or non-finite values.
        """
        if self.name not in FITTED:
            return self
        x = cls.double().cpu().numpy() if isinstance(cls, torch.Tensor) else np.asarray(cls, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2 or not np.isfinite(x).all():
            raise ValueError(f"--transform {self.name} needs at least 2 finite train vectors (N, D); got "
                             f"{x.shape}")
        mean = x.mean(axis=0)
        std = x.std(axis=0)
        typical = float(std.mean())
        if not typical > 0:
            raise ValueError(f"--transform {self.name}: the normal train class tokens are all the same vector, so "
                             "there is no scale to fit; use --transform raw, l2 or ssqrt-l2")
        if self.name == "standardize":
            std = np.where(std < STD_FLOOR * typical, typical, std)  # (nearly) constant channels: typical scale
            self._set(shift=mean, scale=1.0 / std)
        else:
            from sklearn.covariance import LedoitWolf

            covariance = LedoitWolf(assume_centered=False).fit(x).covariance_
            values, vectors = np.linalg.eigh(covariance)  # ascending
            order = np.argsort(values)[::-1]
            values = values[order]
            values = np.where(values < (STD_FLOOR ** 2) * float(values.mean()), float(values.mean()), values)
            self._set(shift=mean, matrix=vectors[:, order] / np.sqrt(values))
        return self

    def _set(self, **arrays: np.ndarray) -> None:
        for key, value in arrays.items():
            setattr(self, key, torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))

    def forward(self, x):
        """Transform tokens: an (..., D) torch tensor or numpy array (class tokens (B, D), patch tokens (B, P, D));
        the same type back, float32 (a tensor keeps its device); ``raw`` returns ``x`` itself.

        Raises:
            RuntimeError: a transform with statistics that is not fitted.
        """
        if not self.fitted:
            raise RuntimeError(f"the {self.name} transform is not fitted")
        if self.name == "raw":
            return x
        if isinstance(x, np.ndarray):
            return self(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
        x = x.float()
        if self.name in ("l2", "ssqrt-l2"):
            if self.name == "ssqrt-l2":
                x = torch.sign(x) * torch.sqrt(torch.abs(x))
            norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
            return x / torch.clamp(norm, min=1e-12) * (x.shape[-1] ** 0.5)
        if self.name == "standardize":
            return (x - self.shift) * self.scale
        return (x - self.shift) @ self.matrix  # pca-whiten

    def state(self) -> dict[str, np.ndarray]:
        """The fitted arrays (empty for stateless transforms), for storage with the run."""
        return {key: getattr(self, key).cpu().numpy() for key in ("shift", "matrix", "scale")
                if getattr(self, key) is not None}

    @classmethod
    def from_state(cls, name: str, state: dict[str, Any]) -> "FeatureTransform":
        """Rebuild a fitted transform from :meth:`state`.

        Raises:
            ValueError: an unknown name, or arrays missing or of the wrong shape for it.
        """
        transform = cls(name)
        needed = {"standardize": ("shift", "scale"), "pca-whiten": ("shift", "matrix")}.get(name, ())
        missing = [key for key in needed if key not in state]
        if missing:
            raise ValueError(f"the {name} transform lacks its fitted {', '.join(missing)}")
        arrays = {key: np.asarray(state[key], dtype=np.float32) for key in needed}
        for key, value in arrays.items():
            if not np.isfinite(value).all():
                raise ValueError(f"the {name} transform's fitted {key} holds NaN or infinite values")
        if needed:
            d = arrays["shift"].shape
            if len(d) != 1 or ("scale" in arrays and arrays["scale"].shape != d) or (
                    "matrix" in arrays and arrays["matrix"].shape != (d[0], d[0])):
                raise ValueError(f"the {name} transform's arrays have inconsistent shapes")
        transform._set(**arrays)
        return transform

    def describe(self) -> str:
        """One line for logs."""
        return {"raw": "raw cached features", "l2": "L2 per token x sqrt(D)",
                "ssqrt-l2": "signed square root, L2 per token x sqrt(D)",
                "standardize": "per-channel standardisation (normal train class tokens)",
                "pca-whiten": "PCA whitening (Ledoit-Wolf covariance of the normal train class tokens)"}[self.name]
