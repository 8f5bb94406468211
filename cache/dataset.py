"""Cache rows as a map-style PyTorch dataset, for DataLoader pipelines over cached features."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from .reader import FeatureCache


class CacheRows(Dataset):
    """Rows of one split of a feature cache, read lazily, one sample per item.

    Safe in ``torch.utils.data.DataLoader`` workers under both ``fork`` and ``spawn``: the object pickles
    without an open HDF5 handle, and a worker never uses a handle inherited from its parent (see
    :attr:`cache.FeatureCache.file`); each worker opens the file read-only on its first item.

    Args:
        cache: path of a complete cache (validated on construction).
        split: ``"train"`` or ``"test"``.
        rows: the split's row indices to expose, shape (n,) (default: every row), e.g. one class's rows
            from :meth:`cache.CacheSplit.rows_of_class`.

    Item ``i`` is ``(cls, patches, label, row)``: a (D,) and a (P, D) float32 tensor, the int class index
    and the int row index in the split.

    Raises:
        CacheError: the cache is invalid, or (on access) a row holds non-finite values.
        ValueError: unknown split, or a row index outside the split.
    """

    def __init__(self, cache: str | os.PathLike, split: str, rows: np.ndarray | None = None) -> None:
        self.cache = FeatureCache(cache)
        part = self.cache.split(split)
        self.split = split
        self.rows = np.arange(part.num_rows) if rows is None else np.asarray(rows, dtype=np.int64)
        if self.rows.size and (self.rows.min() < 0 or self.rows.max() >= part.num_rows):
            raise ValueError(f"rows must lie in 0..{part.num_rows - 1} for split {split!r}")
        self.labels = part.labels[self.rows]
        self.cache.close()  # opened again where items are read (this process or a worker)

    def __len__(self) -> int:
        return int(self.rows.size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        row = int(self.rows[index])
        cls, patches = self.cache.split(self.split).read(np.array([row]))
        return torch.from_numpy(cls[0]), torch.from_numpy(patches[0]), int(self.labels[index]), row
