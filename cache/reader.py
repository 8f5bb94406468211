"""Reading and validating a feature cache."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from .chunks import PARTIAL_SUFFIX, lock_holder, partial_progress
from .schema import (
    DEFAULT_LAYER,
    FINE_LABEL,
    FORMAT_NAME,
    JSON_ATTRS,
    READABLE_VERSIONS,
    REQUIRED_ROOT_ATTRS,
    SPLIT_DATASETS,
    SPLITS,
    STRING_ATTRS,
    CacheError,
)


def _decode_attr(key: str, value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if key in JSON_ATTRS and isinstance(value, str):
        return json.loads(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decode_attrs(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """Every root attribute decoded (strings, JSON lists, Python scalars).

    Raises:
        CacheError: an attribute is not valid UTF-8 or JSON; the message names the file (``where``).
    """
    attrs = {}
    for key, value in raw.items():
        try:
            attrs[key] = _decode_attr(key, value)
        except UnicodeDecodeError:
            raise CacheError(f"{where}: attribute {key!r} is not valid UTF-8") from None
        except ValueError:
            raise CacheError(f"{where}: attribute {key!r} is not valid JSON") from None
    return attrs


def read_root_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded root attributes of the cache file ``path``, read without validating the file or reading any
    array: a cheap look at what a cache holds (to tell several caches apart). ``layer`` is ``final`` when absent,
    as :class:`FeatureCache` reads it.

    Raises:
        CacheError: the file is not readable HDF5, is not a ``sanf-ad-features`` file, or has an attribute that
            cannot be decoded. The message is ``"<path>: <reason>"``.
    """
    where = str(path)
    try:
        with h5py.File(path, "r") as f:
            raw = dict(f.attrs)
    except OSError:
        raise CacheError(f"{where}: not a readable HDF5 file (truncated or of another kind)") from None
    fmt = _decode_attr("format", raw.get("format"))
    if fmt != FORMAT_NAME:
        raise CacheError(f"{where}: not a {FORMAT_NAME} cache (format attribute: {fmt!r})")
    attrs = _decode_attrs(raw, where)
    attrs.setdefault("layer", DEFAULT_LAYER)
    return attrs


def _contiguous_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Split sorted row indices into ``(start, stop)`` runs of consecutive rows."""
    if rows.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate(([0], breaks))
    stops = np.concatenate((breaks, [rows.size]))
    return [(int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, stops, strict=True)]


#: errno values of HDF5's "unable to lock file" when another process holds the file; any other (ENOSYS, ENOLCK,
#: EOPNOTSUPP: some network and read-only mounts) means that the filesystem offers no locks.
_LOCKED = (errno.EAGAIN, errno.EWOULDBLOCK)


def _open_hdf5(path: Path) -> h5py.File:
    """Open an HDF5 file read-only.

    Raises:
        CacheError: the file is locked by a process that has it open for writing (HDF5's file locking), its
            filesystem does not support that locking, or it is not a readable HDF5 file (truncated or of another
            kind). The message names the file.
    """
    try:
        return h5py.File(path, "r")
    except OSError as err:
        text = str(err)
        code = err.errno
        if code is None:  # h5py gives the errno in the text of some errors only: "errno = 11, error message = ..."
            found = re.search(r"errno = (\d+)", text)
            code = int(found.group(1)) if found else None
        if "unable to lock file" in text and code in _LOCKED:
            raise CacheError(f"{path} is locked by another process that has it open for writing (HDF5 file "
                             "locking); wait for that process to finish and run again") from None
        if "unable to lock file" in text:
            raise CacheError(f"{path} cannot be locked for reading on its filesystem (HDF5 file locking: "
                             f"{os.strerror(code) if code else text}); set HDF5_USE_FILE_LOCKING=FALSE in the "
                             "environment to read it without locking") from None
        raise CacheError(f"{path} is not a readable HDF5 file (truncated or of another kind)") from None


class CacheSplit:
    """One split (``train`` or ``test``) of an open cache.

    Attributes:
        name: the split's name.
        num_rows: N.
        labels: (N,) int64 class indices, loaded on open.
        fine_labels: (N,) int64 indices into the cache's ``fine_class_names``, or None when the cache has none.
    """

    def __init__(self, cache: "FeatureCache", name: str) -> None:
        self._cache = cache
        self.name = name
        group = cache.file[name]
        self.num_rows = int(group["label"].shape[0])
        self.labels = group["label"][:].astype(np.int64)
        self.fine_labels = group[FINE_LABEL][:].astype(np.int64) if FINE_LABEL in group else None

    @property
    def sample_ids(self) -> list[str]:
        """The N sample ids (relative path or ``<split>/<index>``)."""
        return [s.decode("utf-8") if isinstance(s, bytes) else s for s in self._cache.file[self.name]["sample_id"][:]]

    def rows_of_class(self, label: int) -> np.ndarray:
        """Sorted row indices whose label is ``label``, shape (n,)."""
        return np.flatnonzero(self.labels == label)

    def read(self, rows: np.ndarray | slice, require_finite: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Read the semantic vectors and patch tokens of some rows as float32.

        Only the requested rows are read from disk (contiguous runs are read as slices).

        Args:
            rows: sorted row indices, shape (n,), or a slice.
            require_finite: refuse rows holding NaN or infinite values.

        Returns:
            ``cls`` of shape (n, D) and ``patches`` of shape (n, P, D), float32.

        Raises:
            CacheError: ``require_finite`` and a row is not finite; names the file, dataset path and row.
        """
        cls, patches = self._read(rows)
        if require_finite:
            for name, values in (("cls", cls), ("patches", patches)):
                bad = ~np.isfinite(values).all(axis=tuple(range(1, values.ndim)))
                if bad.any():
                    index = np.arange(self.num_rows)[rows] if isinstance(rows, slice) else np.asarray(rows)
                    advice = _non_finite_advice(self._cache.attrs.get("dtype"), self._cache.attrs.get("precision"))
                    raise CacheError(f"{self._cache.path}: /{self.name}/{name} row {int(index[np.argmax(bad)])} holds "
                                     f"NaN or infinite values ({int(bad.sum())} such rows read); extract again "
                                     f"(--overwrite) {advice}")
        return cls, patches

    def _read(self, rows: np.ndarray | slice) -> tuple[np.ndarray, np.ndarray]:
        group = self._cache.file[self.name]
        if isinstance(rows, slice):
            return group["cls"][rows].astype(np.float32), group["patches"][rows].astype(np.float32)
        rows = np.asarray(rows, dtype=np.int64)
        runs = _contiguous_runs(rows)
        d = group["cls"].shape[1]
        p = group["patches"].shape[1]
        cls = np.empty((rows.size, d), dtype=np.float32)
        patches = np.empty((rows.size, p, d), dtype=np.float32)
        at = 0
        for start, stop in runs:
            n = stop - start
            cls[at:at + n] = group["cls"][start:stop]
            patches[at:at + n] = group["patches"][start:stop]
            at += n
        return cls, patches

    def iter_blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yield ``(start, cls, patches)`` for consecutive blocks of at most ``block_rows`` rows."""
        for start in range(0, self.num_rows, block_rows):
            cls, patches = self.read(slice(start, min(start + block_rows, self.num_rows)))
            yield start, cls, patches


def _non_finite_advice(dtype: str | None, precision: str | None) -> str:
    """How to extract again when cached rows are not finite: the causes the cache's attributes leave possible
    (float16 storage overflowing, a bf16/fp16 forward overflowing), or the backbone's own output."""
    causes = []
    if dtype == "float16":
        causes.append("with --dtype float32 if the features exceed float16's range (65504)")
    if precision not in (None, "fp32"):
        causes.append(f"with --precision fp32 if the backbone's {precision} forward overflowed")
    if not causes:
        return "after checking the backbone and its weights: its own fp32 output was not finite"
    return ", or ".join(causes)


class FeatureCache:
    """A complete, validated feature cache opened read-only.

    Opening checks the format name and version, the ``complete`` mark, the required attributes, that
    every split has all datasets with consistent shapes, and that labels index ``class_names``.
    The HDF5 file is opened lazily in the process that uses it, so the object can be pickled into
    DataLoader workers.

    Args:
        path: the ``.h5`` cache file.

    Raises:
        CacheError: the file is missing (the message says whether its extraction is running, naming the pid
            that holds its lock, or was interrupted), locked by a process writing it, not HDF5, of another format
            or version, incomplete, or inconsistent. The message names the file and what is wrong.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._file: h5py.File | None = None
        self._owner_pid = os.getpid()
        try:
            self.attrs = self._validate()
        except CacheError:
            self.close()
            raise
        self.class_names: list[str] = list(self.attrs["class_names"])
        #: names of the optional fine labels (CIFAR-100's 100 classes), or None
        self.fine_class_names: list[str] | None = self.attrs.get("fine_class_names")
        #: the classes that can be the normal class (good/defect layouts: ``good``); all classes when not stored
        self.normal_classes: list[str] = list(self.attrs.get("normal_classes") or self.class_names)
        self._splits: dict[str, CacheSplit] = {}

    @property
    def file(self) -> h5py.File:
        """The open HDF5 file, opened on first use in this process.

        A handle inherited through ``fork`` (DataLoader workers) is never used: HDF5 handles are not
        safe to share between processes, so a forked child opens its own.
        """
        if self._file is not None and self._owner_pid != os.getpid():
            self._file = None  # the parent's handle: leave it alone, open our own
        if self._file is None or not self._file.id.valid:
            self._file = _open_hdf5(self.path)
            self._owner_pid = os.getpid()
        return self._file

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"] = None
        state["_splits"] = {}
        return state

    def close(self) -> None:
        """Close the HDF5 file if this process opened it."""
        if self._file is not None and self._owner_pid == os.getpid() and self._file.id.valid:
            self._file.close()
        self._file = None

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _validate(self) -> dict[str, Any]:
        where = str(self.path)
        if self.path.is_dir() and self.path.name.endswith(PARTIAL_SUFFIX):
            cache = self.path.with_name(self.path.name[:-len(PARTIAL_SUFFIX)])
            holder = lock_holder(cache)
            if holder is not None:
                raise CacheError(f"{where} is the work folder of an extraction being written by pid {holder}, not a "
                                 f"cache; wait for it to finish, then use {cache}")
            raise CacheError(f"{where} is the work folder of an interrupted extraction, not a cache; run the same "
                             "extract command again to resume it")
        if not self.path.exists():
            progress = partial_progress(self.path)
            hint = ""
            if progress is not None:
                done = f"{progress[0]} of {progress[1] or '?'} chunks committed"
                holder = lock_holder(self.path)
                hint = (f" (its extraction was interrupted with {done}; run the same extract command again to resume)"
                        if holder is None else
                        f" yet: its extraction is being written by pid {holder} ({done}); wait for it to finish")
            raise CacheError(f"cache file {where} does not exist{hint}")
        self._file = f = _open_hdf5(self.path)
        raw = dict(f.attrs)
        fmt = _decode_attr("format", raw.get("format"))
        if fmt != FORMAT_NAME:
            raise CacheError(f"{where} is not a {FORMAT_NAME} cache (format attribute: {fmt!r})")
        version = _decode_attr("format_version", raw.get("format_version"))
        if isinstance(version, bool) or not isinstance(version, int) or version not in READABLE_VERSIONS:
            raise CacheError(f"{where} has format version {version!r}; this build reads versions "
                             f"{list(READABLE_VERSIONS)}")
        if not isinstance(raw.get("complete"), (bool, np.bool_)):
            raise CacheError(f"{where}: attribute 'complete' must be a boolean, got {raw.get('complete')!r}")
        if not raw["complete"]:
            raise CacheError(f"{where} is incomplete (its extraction did not finish); run the extraction again")
        missing = [k for k in REQUIRED_ROOT_ATTRS if k not in raw]
        if missing:
            raise CacheError(f"{where} lacks required attributes {missing}")
        attrs = _decode_attrs(raw, where)
        names = attrs["class_names"]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise CacheError(f"{where}: attribute 'class_names' must be a non-empty list of strings")
        if len(set(names)) != len(names):
            raise CacheError(f"{where}: attribute 'class_names' repeats a name: {names}")
        normal = attrs.get("normal_classes")
        if normal is not None and (not isinstance(normal, list) or not normal
                                   or not all(isinstance(v, str) for v in normal) or not set(normal) <= set(names)):
            raise CacheError(f"{where}: attribute 'normal_classes' must be a non-empty list of class names, got "
                             f"{normal!r}")
        attrs.setdefault("layer", DEFAULT_LAYER)  # caches written before extract --layer: the final features
        wrong = [k for k in STRING_ATTRS + ("layer",) if not isinstance(attrs[k], str)]
        if wrong:
            raise CacheError(f"{where}: attributes {wrong} must be strings")
        num_classes = len(names)
        for key in ("feature_dim", "num_patches"):
            if not isinstance(attrs[key], int) or isinstance(attrs[key], bool) or attrs[key] < 1:
                raise CacheError(f"{where}: attribute {key!r} must be a positive integer, got {attrs[key]!r}")
        d = attrs["feature_dim"]
        p = attrs["num_patches"]
        for split in SPLITS:
            if split not in f or not isinstance(f[split], h5py.Group):
                raise CacheError(f"{where} has no split {split!r}")
            group = f[split]
            absent = [name for name in SPLIT_DATASETS if not isinstance(group.get(name), h5py.Dataset)]
            if absent:
                raise CacheError(f"{where}: split {split!r} lacks datasets {absent}")
            label = group["label"]
            if label.ndim != 1 or label.dtype.kind not in "iu":
                raise CacheError(f"{where}: /{split}/label must be a 1-D integer array, got shape {label.shape} "
                                 f"of {label.dtype}")
            n = label.shape[0]
            expected = {"cls": (n, d), "patches": (n, p, d), "sample_id": (n,)}
            for name, shape in expected.items():
                if group[name].shape != shape:
                    raise CacheError(f"{where}: /{split}/{name} has shape {group[name].shape}, expected {shape}")
            for name in ("cls", "patches"):
                if group[name].dtype.kind != "f":
                    raise CacheError(f"{where}: /{split}/{name} must hold floats, got {group[name].dtype}")
            if h5py.check_string_dtype(group["sample_id"].dtype) is None:
                raise CacheError(f"{where}: /{split}/sample_id must hold strings, got {group['sample_id'].dtype}")
            labels = label[:]
            if n and (labels.min() < 0 or labels.max() >= num_classes):
                raise CacheError(f"{where}: /{split}/label holds values outside 0..{num_classes - 1}")
            fine_names = attrs.get("fine_class_names")
            fine = group.get(FINE_LABEL)
            if (fine_names is None) != (fine is None):
                raise CacheError(f"{where}: /{split}/{FINE_LABEL} and the attribute 'fine_class_names' must be "
                                 "present together")
            if fine is not None:
                if (not isinstance(fine_names, list) or not fine_names
                        or not all(isinstance(v, str) for v in fine_names)):
                    raise CacheError(f"{where}: attribute 'fine_class_names' must be a non-empty list of strings")
                if not isinstance(fine, h5py.Dataset) or fine.shape != (n,) or fine.dtype.kind not in "iu":
                    raise CacheError(f"{where}: /{split}/{FINE_LABEL} must be a 1-D integer array of length {n}")
                values = fine[:]
                if n and (values.min() < 0 or values.max() >= len(fine_names)):
                    raise CacheError(f"{where}: /{split}/{FINE_LABEL} holds values outside 0..{len(fine_names) - 1}")
        return attrs

    def split(self, name: str) -> CacheSplit:
        """The split ``name`` (``train`` or ``test``).

        Raises:
            ValueError: unknown split name.
        """
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        if name not in self._splits:
            self._splits[name] = CacheSplit(self, name)
        return self._splits[name]

    def fingerprint(self) -> str:
        """A sha256 hex digest of the cache's content.

        Covers the root attributes (creation time included, so a re-extraction changes it), and per
        split the labels, sample ids, the semantic vectors and the shapes of the patch tokens. Patch
        token values are not hashed (they are the bulk of the file); they change only together with
        the rest.
        """
        h = hashlib.sha256()
        h.update(json.dumps(self.attrs, sort_keys=True, default=str).encode())
        for name in SPLITS:
            group = self.file[name]
            h.update(name.encode())
            h.update(np.ascontiguousarray(group["label"][:]).tobytes())
            if FINE_LABEL in group:
                h.update(np.ascontiguousarray(group[FINE_LABEL][:]).tobytes())
            h.update("\n".join(self.split(name).sample_ids).encode())
            h.update(repr(group["patches"].shape).encode())
            for start in range(0, group["cls"].shape[0], 65536):
                h.update(np.ascontiguousarray(group["cls"][start:start + 65536]).tobytes())
        return h.hexdigest()

    def describe(self) -> list[str]:
        """What ``pipeline.py info`` prints: every root attribute, then per split the array shapes and the rows per
        class (and how many fine classes are present, for caches that have them)."""
        lines = []
        for key in sorted(self.attrs):
            value = self.attrs[key]
            lines.append(f"{key}: {json.dumps(value) if isinstance(value, (list, dict)) else value}")
        for split in SPLITS:
            group = self.file[split]
            lines.append(f"[{split}] cls {group['cls'].shape}  patches {group['patches'].shape}  "
                         f"label {group['label'].shape}")
            lines.append("  " + ", ".join(f"{name}: {n}" for name, n in self.class_counts(split).items()))
            fine = self.split(split).fine_labels
            if fine is not None:
                lines.append(f"  fine labels: {len(set(fine.tolist()))} of {len(self.fine_class_names)} fine classes "
                             "present")
        return lines

    def class_counts(self, split: str) -> dict[str, int]:
        """Samples per class name in ``split``."""
        counts = np.bincount(self.split(split).labels, minlength=len(self.class_names))
        return {name: int(c) for name, c in zip(self.class_names, counts, strict=True)}
