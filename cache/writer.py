"""Writing a feature cache so that an interrupted run never leaves a file that looks complete."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

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


#: Bytes one sample id takes in the HDF5 global heap beyond its UTF-8 text (object header, padding to 8).
_HEAP_BYTES_PER_STRING = 24
#: Bytes of a cache file beside its splits' data, rounded up: superblock, group and dataset headers, B-trees, root
#: attributes (a cache of 14 images takes 41 kB).
FILE_OVERHEAD_BYTES = 64 * 1024


def split_bytes(num_rows: int, feature_dim: int, num_patches: int, dtype: str | np.dtype, id_chars: int) -> int:
    """About the bytes one split takes in a cache file that :class:`CacheWriter` writes (uncompressed).

    Each dataset of :meth:`CacheWriter.create_split` is stored in whole HDF5 chunks, so its last chunk counts in
    full; the sample ids are 16-byte references to UTF-8 strings in the global heap. An optional ``fine_label``
    (8 bytes a row) is not counted.

    Args:
        num_rows: N, samples in the split.
        feature_dim: D.
        num_patches: P.
        dtype: storage dtype of ``cls`` and ``patches``.
        id_chars: characters of the longest sample id (counted as 4 bytes each, UTF-8's most).

    Returns:
        The estimate in bytes: about ``N * ((D + P * D) * itemsize + 8 + 16 + 4 * id_chars + 24)`` for large N.
    """
    if num_rows == 0:
        return 0
    item = np.dtype(dtype).itemsize
    total = 0
    # (stored bytes a row, the row size create_split chooses the chunk length by): cls, patches, label, sample_id
    for stored, chunked in ((feature_dim * item,) * 2, (num_patches * feature_dim * item,) * 2, (8, 8), (16, 64)):
        rows = chunk_rows(chunked, num_rows)
        total += -(-num_rows // rows) * rows * stored
    return total + num_rows * (4 * id_chars + _HEAP_BYTES_PER_STRING)


class _TempFile:
    """The temporary cache file as h5py's ``fileobj`` driver writes it (in place of HDF5's own POSIX driver).

    Why: after a failed write (a full disk), HDF5 keeps the data it could not write and cannot close the file; with
    its POSIX driver the process then crashes when the file's handle is collected, and the errno is lost (HDF5
    reports "driver write request failed"). Through this object the first failed write's ``OSError`` is kept in
    :attr:`error`, and :meth:`drop` closes the file and makes every later operation a no-op, so that HDF5 can
    give the file up. Unbuffered: a write either reaches the file or raises.
    """

    def __init__(self, path: Path) -> None:
        self._raw: Any = open(path, "w+b", buffering=0)
        self._pos = 0
        self.error: OSError | None = None

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if self._raw is not None:
            self._pos = self._raw.seek(pos, whence)
        elif whence == os.SEEK_SET:
            self._pos = pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, size: int) -> bytes:
        """``size`` bytes from the position; zeros past the end of the file (as HDF5's POSIX driver reads)."""
        data = b""
        if self._raw is not None:
            while len(data) < size and (more := self._raw.read(size - len(data))):
                data += more
        self._pos += size
        return data + bytes(size - len(data))

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        if self._raw is not None:
            try:
                while view:  # a raw write may write part of the buffer
                    view = view[self._raw.write(view):]
            except OSError as err:
                if self.error is None:
                    self.error = err
                raise
        self._pos += size
        return size

    def truncate(self, size: int | None = None) -> int:
        return self._raw.truncate(size) if self._raw is not None else self._pos if size is None else size

    def flush(self) -> None:
        """Nothing to do: writes are unbuffered."""

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._raw is not None:
            self._raw.close()

    def drop(self) -> None:
        """Close the file and drop every later write (idempotent)."""
        self.close()
        self._raw = None


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

    A write that fails in the file system (``ENOSPC``: the disk is full) raises that ``OSError``, with its errno,
    from whichever method met it (HDF5 may report it at a later write, or at :meth:`finish`); leaving the block
    then deletes the temporary file as for any error.

    Args:
        path: final path of the cache (``.h5``).
        overwrite: replace an existing complete cache at ``path``.

    Raises:
        CacheError: ``path`` exists and ``overwrite`` is False, or its folder is not writable.
        OSError: writing the new file failed (e.g. the disk is full).
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.temp_path = self.path.with_name(self.path.name + TEMP_SUFFIX)
        if self.path.exists() and not overwrite:
            raise CacheError(f"cache {self.path} exists already; pass --overwrite to replace it")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._sink = _TempFile(self.temp_path)
        except OSError as err:
            raise CacheError(f"cannot write cache file {self.temp_path}: {err.strerror or err}") from None
        try:
            with self._writing():
                self._file = h5py.File(self._sink, "w")
                self._file.attrs["format"] = FORMAT_NAME
                self._file.attrs["format_version"] = FORMAT_VERSION
                self._file.attrs["complete"] = False
        except BaseException:
            self._sink.drop()
            self.temp_path.unlink(missing_ok=True)
            raise
        self._written: dict[str, np.ndarray] = {}
        #: the open datasets of each split, kept open until the file is closed: HDF5 writes a dataset's cached
        #: chunks when it is released, and a write that fails there is only printed (and leaves HDF5 unusable)
        self._datasets: dict[str, dict[str, h5py.Dataset]] = {}

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """HDF5 calls that may write: a failed write of the file raises its own ``OSError`` (HDF5's error does not
        carry the errno, and a write HDF5 makes while it releases an object only prints a warning)."""
        try:
            yield
        except Exception:
            if self._sink.error is not None:
                raise self._sink.error from None
            raise
        if self._sink.error is not None:
            raise self._sink.error

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

        def chunks(row_bytes: int, *row_shape: int):  # an empty split cannot be chunked: stored contiguous
            return (chunk_rows(row_bytes, num_rows), *row_shape) if num_rows else None

        with self._writing():
            group = self._file.create_group(split)
            self._datasets[split] = {
                "cls": group.create_dataset("cls", shape=(num_rows, feature_dim), dtype=dtype,
                                            chunks=chunks(feature_dim * item, feature_dim)),
                "patches": group.create_dataset("patches", shape=(num_rows, num_patches, feature_dim), dtype=dtype,
                                                chunks=chunks(num_patches * feature_dim * item, num_patches,
                                                              feature_dim)),
                "label": group.create_dataset("label", shape=(num_rows,), dtype="int64", chunks=chunks(8)),
                "sample_id": group.create_dataset("sample_id", shape=(num_rows,), dtype=h5py.string_dtype("utf-8"),
                                                  chunks=chunks(64)),
            }
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

        Raises:
            OSError: writing the file failed (e.g. the disk is full).
        """
        stop = start + len(cls)
        datasets = self._datasets[split]
        with self._writing():
            datasets["cls"][start:stop] = cls
            datasets["patches"][start:stop] = patches
            datasets["label"][start:stop] = labels
            datasets["sample_id"][start:stop] = sample_ids
        self._written[split][start:stop] = True

    def write_fine_labels(self, split: str, fine_labels: np.ndarray) -> None:
        """Store the optional ``fine_label`` (N,) int64 of a created split (e.g. CIFAR-100's fine classes; the
        root attribute ``fine_class_names`` must then be passed to :meth:`finish`).

        Raises:
            ValueError: the length differs from the split's N.
            OSError: writing the file failed (e.g. the disk is full).
        """
        datasets = self._datasets[split]
        fine_labels = np.asarray(fine_labels, dtype=np.int64)
        if fine_labels.shape != datasets["label"].shape:
            raise ValueError(f"split {split!r}: fine labels of shape {fine_labels.shape}, expected "
                             f"{datasets['label'].shape}")
        with self._writing():
            datasets[FINE_LABEL] = self._file[split].create_dataset(
                FINE_LABEL, data=fine_labels, chunks=(chunk_rows(8, len(fine_labels)),) if len(fine_labels) else None)

    def finish(self, attrs: Mapping[str, Any]) -> Path:
        """Write the root attributes, mark the file complete and rename it into place.

        Args:
            attrs: every key of ``schema.REQUIRED_ROOT_ATTRS`` except the format keys,
                ``complete`` and ``created`` (set here).

        Returns:
            The final path.

        Raises:
            CacheError: a required attribute is missing or some rows were never written.
            OSError: writing the file failed (e.g. the disk is full).
        """
        from datetime import datetime, timezone

        for split, done in self._written.items():
            if not done.all():
                raise CacheError(f"split {split!r}: {int((~done).sum())} rows were never written")
        full = dict(attrs)
        full["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        missing = [k for k in REQUIRED_ROOT_ATTRS
                   if k not in full and k not in ("format", "format_version", "complete")]
        if missing:
            raise CacheError(f"cache attributes missing: {missing}")
        with_fine = {split for split in self._written if FINE_LABEL in self._file[split]}
        if ("fine_class_names" in full) != bool(with_fine) or (with_fine and with_fine != set(self._written)):
            raise CacheError("fine labels must be written for every split together with the attribute "
                             "'fine_class_names'")
        with self._writing():
            for key, value in full.items():
                self._file.attrs[key] = _encode_attr(key, value)
            self._file.attrs["complete"] = True
            self._file.flush()
            self._file.close()
        self._sink.close()
        os.replace(self.temp_path, self.path)
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary file (idempotent).

        After a failed write (a full disk) the file is closed without writing: what HDF5 still holds for it is
        dropped, and HDF5's failure to release it is not raised (the file is deleted; the write error that led
        here is the one to report).
        """
        failed = self._sink.error is not None
        if failed:
            self._sink.drop()
        try:
            if self._file.id.valid:
                self._file.close()
        except Exception:
            if not failed:
                raise
        finally:
            self._sink.drop()
            self.temp_path.unlink(missing_ok=True)

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
