"""Writing a feature cache so that an interrupted run never leaves a file that looks complete."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from .schema import (
    FINE_LABEL,
    FORMAT_NAME,
    FORMAT_VERSION,
    JSON_ATTRS,
    REQUIRED_ROOT_ATTRS,
    SPLITS,
    STORAGE_DTYPES,
    CacheError,
    chunk_rows,
)

#: Suffix of the file being written; renamed to the final name by :meth:`CacheWriter.finish`.
TEMP_SUFFIX = ".writing"


def _encode_attr(key: str, value: Any) -> Any:
    if key in JSON_ATTRS:
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    if value is None:
        return ""
    if isinstance(value, str):  # str subclasses (torch.__version__) would be stored as fixed-width numpy strings
        return str(value)
    return value


class CacheWriter:
    """Writes one cache file under a temporary name and renames it into place when finished.

    The file is written to ``<path>.writing`` with the root attribute ``complete = False``; only
    :meth:`finish` sets ``complete = True`` and renames it to ``path``. A run killed at any point
    therefore leaves at most a ``.writing`` file, which readers refuse. (Extraction writes through
    :class:`cache.chunks.ChunkStore`, which commits chunks first so that a killed run can resume.)

    Use as a context manager: leaving the block with an exception deletes the temporary file.

    Args:
        path: final path of the cache (``.h5``).
        overwrite: replace an existing complete cache at ``path``.

    Raises:
        CacheError: ``path`` exists and ``overwrite`` is False, or its folder is not writable.
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.temp_path = self.path.with_name(self.path.name + TEMP_SUFFIX)
        if self.path.exists() and not overwrite:
            raise CacheError(f"cache {self.path} exists already; pass --overwrite to replace it")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = h5py.File(self.temp_path, "w")
        except OSError as err:
            raise CacheError(f"cannot write cache file {self.temp_path}: {err.strerror or err}") from None
        self._file.attrs["format"] = FORMAT_NAME
        self._file.attrs["format_version"] = FORMAT_VERSION
        self._file.attrs["complete"] = False
        self._written: dict[str, np.ndarray] = {}

    def create_split(self, split: str, num_rows: int, feature_dim: int, num_patches: int, dtype: str) -> None:
        """Create the datasets of one split, chunked along the sample axis.

        Args:
            split: ``"train"`` or ``"test"``.
            num_rows: N, samples in the split.
            feature_dim: D, channels of the class token and of each patch token.
            num_patches: P, patch tokens per sample after pooling.
            dtype: storage dtype of ``cls`` and ``patches``, ``"float32"`` or ``"float16"``.

        Raises:
            ValueError: unknown split or dtype.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
        item = np.dtype(dtype).itemsize
        group = self._file.create_group(split)

        def chunks(row_bytes: int, *row_shape: int):  # an empty split cannot be chunked: stored contiguous
            return (chunk_rows(row_bytes, num_rows), *row_shape) if num_rows else None

        group.create_dataset("cls", shape=(num_rows, feature_dim), dtype=dtype,
                             chunks=chunks(feature_dim * item, feature_dim))
        group.create_dataset("patches", shape=(num_rows, num_patches, feature_dim), dtype=dtype,
                             chunks=chunks(num_patches * feature_dim * item, num_patches, feature_dim))
        group.create_dataset("label", shape=(num_rows,), dtype="int64", chunks=chunks(8))
        group.create_dataset("sample_id", shape=(num_rows,), dtype=h5py.string_dtype("utf-8"), chunks=chunks(64))
        self._written[split] = np.zeros(num_rows, dtype=bool)

    def write(self, split: str, start: int, cls: np.ndarray, patches: np.ndarray,
              labels: np.ndarray, sample_ids: list[str]) -> None:
        """Write rows ``start : start + B`` of a split.

        Args:
            split: a split created with :meth:`create_split`.
            start: first row index.
            cls: (B, D) semantic vectors.
            patches: (B, P, D) patch tokens.
            labels: (B,) integer class indices.
            sample_ids: B strings.
        """
        group = self._file[split]
        stop = start + len(cls)
        group["cls"][start:stop] = cls
        group["patches"][start:stop] = patches
        group["label"][start:stop] = labels
        group["sample_id"][start:stop] = sample_ids
        self._written[split][start:stop] = True

    def write_fine_labels(self, split: str, fine_labels: np.ndarray) -> None:
        """Store the optional ``fine_label`` (N,) int64 of a created split (e.g. CIFAR-100's fine classes; the
        root attribute ``fine_class_names`` must then be passed to :meth:`finish`).

        Raises:
            ValueError: the length differs from the split's N.
        """
        group = self._file[split]
        fine_labels = np.asarray(fine_labels, dtype=np.int64)
        if fine_labels.shape != group["label"].shape:
            raise ValueError(f"split {split!r}: fine labels of shape {fine_labels.shape}, expected "
                             f"{group['label'].shape}")
        group.create_dataset(FINE_LABEL, data=fine_labels,
                             chunks=(chunk_rows(8, len(fine_labels)),) if len(fine_labels) else None)

    def finish(self, attrs: Mapping[str, Any]) -> Path:
        """Write the root attributes, mark the file complete and rename it into place.

        Args:
            attrs: every key of ``schema.REQUIRED_ROOT_ATTRS`` except the format keys,
                ``complete`` and ``created`` (set here).

        Returns:
            The final path.

        Raises:
            CacheError: a required attribute is missing or some rows were never written.
        """
        from datetime import datetime, timezone

        for split, done in self._written.items():
            if not done.all():
                raise CacheError(f"split {split!r}: {int((~done).sum())} rows were never written")
        full = dict(attrs)
        full["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        missing = [k for k in REQUIRED_ROOT_ATTRS if k not in full and k not in ("format", "format_version", "complete")]
        if missing:
            raise CacheError(f"cache attributes missing: {missing}")
        with_fine = {split for split in self._written if FINE_LABEL in self._file[split]}
        if ("fine_class_names" in full) != bool(with_fine) or (with_fine and with_fine != set(self._written)):
            raise CacheError("fine labels must be written for every split together with the attribute "
                             "'fine_class_names'")
        for key, value in full.items():
            self._file.attrs[key] = _encode_attr(key, value)
        self._file.attrs["complete"] = True
        self._file.flush()
        self._file.close()
        os.replace(self.temp_path, self.path)
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary file (idempotent)."""
        try:
            if self._file.id.valid:
                self._file.close()
        finally:
            self.temp_path.unlink(missing_ok=True)

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
