"""Resumable extraction: encoded rows are committed in chunks to a work folder, then assembled into the cache.

An extraction of ``<dir>/<name>.h5`` works in the folder ``<dir>/<name>.h5.partial/``:

- ``manifest.json``: the plan of the work (extraction settings, rows and sample-id digest of every split,
  batch size, rows per chunk). A later run resumes only with the identical plan.
- ``<split>-<start>.npz``: one committed chunk, rows ``start : start + chunk_rows`` of a split (``cls``,
  ``patches``, ``label``, ``sample_id``, ``token_grid``). Each is written under a temporary name, flushed to
  disk and renamed, so a chunk file either holds its whole chunk or does not exist.

A process killed at any moment (SIGKILL included) therefore loses at most the chunk it was encoding.
When every chunk is committed, :meth:`ChunkStore.assemble` writes the HDF5 cache with
:class:`~cache.writer.CacheWriter` (temporary name, renamed at the end) and deletes the work folder.
While it works, the process holds an exclusive lock on ``<dir>/<name>.h5.lock`` (``fcntl.flock``, released by
the kernel when the process dies), so a second extraction of the same cache is refused instead of
interleaving writes. POSIX only (Linux, macOS).

Disk space: the chunks and the assembled cache hold the same rows, and the chunks are deleted only once the cache
is in place, so an extraction needs about twice the cache's size (:meth:`ChunkStore.space_needed`). A disk that
fills anyway (another process wrote) ends a commit or the assembly with a :class:`CacheError` that says how much
is needed; the temporary file is removed and the committed chunks kept.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .schema import SPLITS, CacheError
from .writer import FILE_OVERHEAD_BYTES, CacheWriter, split_bytes

PARTIAL_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"
MANIFEST = "manifest.json"
CHUNK_ARRAYS = ("cls", "patches", "label", "sample_id", "token_grid", "seconds")
_CHUNK_NAME = re.compile(r"^(train|test)-(\d{10})\.npz$")
#: Bytes a chunk file holds beyond its rows' arrays (the zip and .npy headers of its six arrays), rounded up.
CHUNK_OVERHEAD_BYTES = 4096
#: The errors of a write that found no room: the disk is full, or the user's quota is spent.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def chunk_bytes(num_rows: int, feature_dim: int, num_patches: int, dtype: str | np.dtype, id_chars: int) -> int:
    """About the size of one committed chunk file (an uncompressed ``.npz``), in bytes.

    Args:
        num_rows: images in the chunk.
        feature_dim: D, channels of the class token and of each patch token.
        num_patches: P, patch tokens per image after pooling.
        dtype: storage dtype of the features (float16: 2 bytes a value, float32: 4).
        id_chars: characters of the longest sample id (numpy stores text as 4 bytes a character).

    Returns:
        ``num_rows * ((D + P * D) * itemsize + 8 + 4 * id_chars)`` (features, label, sample id) plus
        ``CHUNK_OVERHEAD_BYTES``.
    """
    per_row = (feature_dim + num_patches * feature_dim) * np.dtype(dtype).itemsize + 8 + 4 * id_chars
    return num_rows * per_row + CHUNK_OVERHEAD_BYTES


def human_bytes(count: float) -> str:
    """``count`` bytes in decimal units, one decimal: ``512 bytes``, ``1.5 kB``, ``2.1 GB``."""
    if count < 1000:
        return f"{int(count)} bytes"
    for unit in ("kB", "MB", "GB", "TB"):
        count /= 1000.0
        if count < 999.95 or unit == "TB":
            return f"{count:.1f} {unit}"
    raise AssertionError("unreachable")


def describe_need(chunks: int, assembly: int) -> str:
    """``about 2.1 GB free (0.9 GB for the remaining chunks, 1.2 GB to assemble the cache)`` for the bytes of
    :meth:`ChunkStore.space_needed`; ``about 1.2 GB free to assemble the cache`` when no chunk remains."""
    if not chunks:
        return f"about {human_bytes(assembly)} free to assemble the cache"
    return (f"about {human_bytes(chunks + assembly)} free ({human_bytes(chunks)} for the remaining chunks, "
            f"{human_bytes(assembly)} to assemble the cache)")


def disk_full(err: BaseException) -> bool:
    """Whether ``err`` is a write that found no room (``ENOSPC`` or ``EDQUOT``; h5py sets ``errno`` too)."""
    return isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS


def partial_dir(path: str | os.PathLike) -> Path:
    """The work folder ``<path>.partial`` of an unfinished extraction of the cache ``path``."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def partial_progress(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(committed, total)`` chunks of an unfinished extraction of ``path``, or None when there is none.

    ``total`` is 0 when the work folder has no readable manifest.
    """
    work = partial_dir(path)
    if not work.is_dir():
        return None
    committed = sum(1 for p in work.iterdir() if _CHUNK_NAME.match(p.name))
    try:
        plan = json.loads((work / MANIFEST).read_text())
        total = sum(len(_ranges(int(s["num_rows"]), int(plan["chunk_rows"]))) for s in plan["splits"].values())
    except (OSError, ValueError, KeyError, TypeError):
        total = 0
    return committed, total


def _ranges(num_rows: int, chunk_rows: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_rows, num_rows)) for start in range(0, num_rows, chunk_rows)]


def _recorded_pid(fd: int) -> str:
    """The pid that the lock holder wrote into its lock file, or ``?`` before it has written it."""
    return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"


def lock_holder(path: str | os.PathLike) -> str | None:
    """The pid (as written in ``<path>.lock``) of the process extracting the cache ``path`` now, or None when none is.

    The lock is tested with a shared, non-blocking ``flock`` that is dropped at once, so the test never waits and
    holds the lock for microseconds only (an extraction starting in that instant is refused, as by a running one).
    The lock file is not created. ``?`` stands for a holder that has not written its pid yet.
    """
    lock = Path(path).with_name(Path(path).name + LOCK_SUFFIX)
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:  # no lock file: no extraction has started, or the last one released it
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _recorded_pid(fd)
    except OSError:  # a filesystem without flock: nobody can hold it there either
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class FileLock:
    """An exclusive, non-blocking ``fcntl.flock`` lock on a lock file that holds the holder's pid; the lock file is
    deleted on :meth:`release` (and the kernel drops the lock if the process dies). Usable as a context manager.

    Args:
        path: the lock file.
        busy: the message when another process holds the lock, from the holder's pid (``?`` before it wrote it).
        error: the exception type raised.

    Raises:
        error: another process holds the lock, or the lock file cannot be created.
    """

    def __init__(self, path: str | os.PathLike, busy: Callable[[str], str], error: type[Exception]) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as err:
                raise error(f"cannot create the lock file {self.path}: {err.strerror or err}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _recorded_pid(fd)
                os.close(fd)
                raise error(busy(holder)) from None
            # the previous holder may have deleted the file between our open and our lock: lock the current one
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Delete the lock file and unlock (idempotent)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "FileLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class CacheLock(FileLock):
    """The one-writer lock of a cache: an exclusive, non-blocking ``fcntl.flock`` lock on ``<cache>.lock``.

    Raises:
        CacheError: another process holds the lock (the message names the cache and the holder's pid),
            or the lock file cannot be created.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.cache_path = Path(path)
        super().__init__(self.cache_path.with_name(self.cache_path.name + LOCK_SUFFIX),
                         lambda holder: f"another extraction (pid {holder}) is writing {self.cache_path}; wait for it "
                                        f"to finish or stop it (lock {self.path})", CacheError)


class ChunkStore:
    """The committed chunks of one extraction, resumed when an earlier run with the same plan was interrupted.

    Use as a context manager. Leaving the block with an exception keeps the committed chunks for a
    later resume (the work folder is removed when nothing was committed); :meth:`assemble` finishes.

    Args:
        path: final path of the cache (``.h5``).
        plan: JSON-serialisable description of the work. Must hold ``splits`` (``{split: {"num_rows": N,
            ...}}``) and ``chunk_rows`` (rows per chunk, a multiple of the batch size so that a resumed run
            encodes exactly the batches of an uninterrupted one); every other key is compared on resume.
        overwrite: replace an existing cache at :meth:`assemble` and start over: an unfinished extraction
            is discarded, unless it is an interrupted ``overwrite`` run of the same plan, which is resumed
            (the same command resumes).
        log: where to print status lines.
        follower: open the work folder that another process of the same distributed job (its rank 0) has
            opened and holds the lock of: no lock, nothing created or removed, only :meth:`commit` (and the
            read-only methods) of the chunks this process is given; :meth:`assemble` is the lock holder's.

    Raises:
        CacheError: the cache exists and ``overwrite`` is False; another process is extracting it; an
            unfinished extraction of it used a different plan; the folder cannot be written. A follower: the
            work folder or its manifest is not there (not on a filesystem shared with rank 0) or holds
            another plan.
    """

    def __init__(self, path: str | os.PathLike, plan: Mapping[str, Any], overwrite: bool = False,
                 log: Callable[[str], None] = print, follower: bool = False) -> None:
        self.path = Path(path)
        self.work = partial_dir(self.path)
        # normalised as it will be stored (tuples become lists); an --overwrite run is resumed only by another
        # --overwrite run, and a plain run's leftovers are discarded by --overwrite (which starts over)
        self.plan = json.loads(json.dumps({**plan, "overwrite": bool(overwrite)}))
        self.chunk_rows = int(self.plan["chunk_rows"])
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {self.chunk_rows}")
        self._log = log
        self._lock: CacheLock | None = None
        if follower:
            self._follow()
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CacheError(f"cannot write cache file {self.path}: {err.strerror or err}") from None
        self._lock = CacheLock(self.path)  # first, so that the checks below cannot race another writer
        try:
            if self.path.exists() and not overwrite:
                hint = ""
                if (_read_manifest(self.work) or {}).get("overwrite"):
                    hint = (f"; an interrupted 'extract --overwrite' of it is in {self.work}: run that again to "
                            "resume it, or delete the folder")
                raise CacheError(f"cache {self.path} exists already; pass --overwrite to replace it{hint}")
            self._open_work()
        except BaseException:
            self._lock.release()
            raise

    def _follow(self) -> None:
        stored = _read_manifest(self.work)
        if stored is None:
            raise CacheError(f"the work folder {self.work} that rank 0 opened is not visible here: every node of a "
                             f"distributed job must see {self.path.parent} on a shared filesystem")
        if stored != self.plan:
            keys = [k for k in sorted(set(stored) | set(self.plan)) if stored.get(k) != self.plan.get(k)]
            raise CacheError(f"this rank's plan differs from rank 0's in {self.work} ("
                             + ", ".join(_describe_change(k, stored.get(k), self.plan.get(k)) for k in keys)
                             + "): every rank must see the same data and options")

    def _open_work(self) -> None:
        _sweep_removing(self.work)
        if self.work.exists() and not self.work.is_dir():
            raise CacheError(f"{self.work} is in the way of the extraction's work folder; move it away")
        if self.work.is_dir():
            stored = _read_manifest(self.work)
            if stored is None:  # killed before the manifest was in place: nothing can have been committed
                _remove_tree(self.work)
            elif stored != self.plan and self.plan["overwrite"]:
                self._log(f"--overwrite: discarding the interrupted extraction in {self.work}")
                _remove_tree(self.work)
            elif stored != self.plan:
                keys = [k for k in sorted(set(stored) | set(self.plan)) if stored.get(k) != self.plan.get(k)]
                if keys == ["overwrite"]:
                    raise CacheError(f"an interrupted 'extract --overwrite' of this cache is in {self.work}; run it "
                                     "again with --overwrite to resume it")
                changes = ", ".join(_describe_change(k, stored.get(k), self.plan.get(k)) for k in keys)
                raise CacheError(f"an interrupted extraction in {self.work} used other settings: {changes}; run it "
                                 "with the same settings to resume, or pass --overwrite to start over")
            else:
                done, total = self._progress()
                self._log(f"resuming the interrupted extraction in {self.work}: {done} of {total} chunks "
                          "already committed")
                return
        try:
            self.work.mkdir()
            manifest = json.dumps(self.plan, indent=1, sort_keys=True).encode()
            _atomic_write(self.work / MANIFEST, lambda handle: handle.write(manifest))
        except OSError as err:
            raise CacheError(f"cannot write cache file {self.path}: {err.strerror or err}") from None

    @property
    def splits(self) -> list[str]:
        """The planned splits, in ``SPLITS`` order."""
        return [s for s in SPLITS if s in self.plan["splits"]]

    def chunks(self, split: str) -> list[tuple[int, int]]:
        """Every chunk of ``split`` as ``(start, stop)`` row ranges."""
        return _ranges(int(self.plan["splits"][split]["num_rows"]), self.chunk_rows)

    def _progress(self) -> tuple[int, int]:
        """``(committed, total)`` chunks over every split."""
        return len(self._committed()), sum(len(self.chunks(s)) for s in self.splits)

    def _stop(self, split: str, start: int) -> int:
        """The end row of the chunk of ``split`` that starts at ``start``."""
        return dict(self.chunks(split))[start]

    def _chunk_path(self, split: str, start: int) -> Path:
        return self.work / f"{split}-{start:010d}.npz"

    def _committed(self) -> set[tuple[str, int]]:
        found = set()
        for p in self.work.iterdir():
            m = _CHUNK_NAME.match(p.name)
            if m and p.is_file():
                found.add((m.group(1), int(m.group(2))))
        return found

    def pending(self, split: str) -> list[tuple[int, int]]:
        """The chunks of ``split`` not committed yet, in row order."""
        done = self._committed()
        return [(a, b) for a, b in self.chunks(split) if (split, a) not in done]

    def space_needed(self, feature_dim: int, num_patches: int, dtype: str | np.dtype,
                     id_chars: int) -> tuple[int, int]:
        """Free disk space the rest of this extraction needs in the cache's folder, in bytes.

        The committed chunks and the assembled cache hold the same rows, and the chunks are deleted only after the
        cache is in place: so the chunks not committed yet cost their rows (:func:`chunk_bytes`), and the assembly
        the whole cache again (:func:`cache.writer.split_bytes` of every split, plus ``FILE_OVERHEAD_BYTES``), about
        twice the cache for a fresh extraction.

        Args:
            feature_dim: D, channels of the class token and of each patch token.
            num_patches: P, patch tokens per image after pooling.
            dtype: storage dtype of the features.
            id_chars: characters of the longest sample id.

        Returns:
            ``(chunks, assembly)``: bytes of the chunks still to commit, and bytes of the assembled cache.
        """
        shape = (feature_dim, num_patches, dtype, id_chars)
        chunks = sum(chunk_bytes(stop - start, *shape) for split in self.splits for start, stop in self.pending(split))
        assembly = FILE_OVERHEAD_BYTES + sum(split_bytes(int(self.plan["splits"][split]["num_rows"]), *shape)
                                             for split in self.splits)
        return chunks, assembly

    def _disk_full_error(self, cause: str, chunks: int, assembly: int) -> CacheError:
        """The one-line error for a disk too full to go on: the folder and ``cause``, the space the rest of the
        extraction needs (``chunks`` and ``assembly`` bytes, see :meth:`space_needed`) and the space free, and that
        the committed chunks are kept for a resume."""
        try:
            free = human_bytes(shutil.disk_usage(self.path.parent).free)
        except OSError:
            free = "an unknown amount"
        done, _ = self._progress()
        kept = (f"the {done} committed chunk{'s are' if done > 1 else ' is'} kept in {self.work}: free space and "
                "run the same extract command again to resume" if done
                else "free space and run the same extract command again")
        return CacheError(f"the disk holding {self.path.parent} {cause}; finishing the extraction needs "
                          f"{describe_need(chunks, assembly)}, {free} is free; {kept}")

    def commit(self, split: str, start: int, cls: np.ndarray, patches: np.ndarray, labels: np.ndarray,
               sample_ids: list[str], token_grid: tuple[int, int], seconds: float = 0.0) -> None:
        """Commit one whole chunk atomically (temporary file, fsync, rename).

        Args:
            split: the split.
            start: the chunk's first row (a chunk boundary).
            cls: (n, D) semantic vectors in the storage dtype.
            patches: (n, P, D) patch tokens in the storage dtype.
            labels: (n,) class indices.
            sample_ids: n sample ids.
            token_grid: (h, w) token grid before pooling.
            seconds: wall time spent encoding the chunk (summed over resumed runs by :meth:`timing`).

        Raises:
            ValueError: ``start`` is not a chunk boundary or the rows do not fill the chunk.
            CacheError: the disk is full (the temporary file is removed; the message says how much the rest of
                the extraction needs, estimated from this chunk's shapes).
        """
        ranges = dict(self.chunks(split))
        if start not in ranges or ranges[start] - start != len(cls):
            raise ValueError(f"{split} rows {start}..{start + len(cls)} are not one planned chunk")
        try:
            _atomic_write(self._chunk_path(split, start), lambda handle: np.savez(
                handle, cls=cls, patches=patches, label=np.asarray(labels, dtype=np.int64),
                sample_id=np.asarray(sample_ids, dtype=str), token_grid=np.asarray(token_grid, dtype=np.int64),
                seconds=np.float64(seconds)))
        except OSError as err:
            if not disk_full(err):
                raise
            shape = (cls.shape[1], patches.shape[1], cls.dtype, max(map(len, sample_ids), default=0))
            raise self._disk_full_error(f"is full ({os.strerror(err.errno)}): committing the chunk {split} rows "
                                        f"{start}..{start + len(cls) - 1} failed", *self.space_needed(*shape)) from None

    def _load(self, split: str, start: int, stop: int, keys: tuple[str, ...] = CHUNK_ARRAYS) -> dict[str, np.ndarray]:
        """Read arrays of one committed chunk (``seconds`` is 0 when absent).

        Raises:
            CacheError: the chunk is unreadable or has the wrong row count; it is deleted so that the next
                run encodes it again.
        """
        path = self._chunk_path(split, start)
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] if key in data.files or key != "seconds" else np.float64(0.0)
                          for key in keys}
            if any(len(arrays[k]) != stop - start for k in ("cls", "patches", "label", "sample_id") if k in arrays):
                raise ValueError("wrong row count")
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            path.unlink(missing_ok=True)
            raise CacheError(f"the committed chunk {path} is damaged ({err}) and was removed; run the same "
                             "extract command again to redo it") from None
        return arrays

    def assemble(self, attrs: Mapping[str, Any], fine_labels: Mapping[str, np.ndarray] | None = None) -> Path:
        """Write the HDF5 cache from the committed chunks, then delete the work folder and the lock.

        Args:
            attrs: the cache's root attributes (see :meth:`CacheWriter.finish`); ``feature_dim``,
                ``num_patches`` and ``token_grid`` are checked against the chunks.
            fine_labels: optional ``{split: (N,) int array}`` stored as ``fine_label`` (the rows in the
                planned order; ``attrs`` then holds ``fine_class_names``).

        Returns:
            The final cache path.

        Raises:
            CacheError: a chunk is missing or damaged, or the chunks disagree with ``attrs``; or the cache's folder
                has less free space than the committed chunks take (the cache holds the same rows: checked before
                writing), or the disk fills while writing (the temporary cache file is removed); the chunks are kept.
            ValueError: this store is a follower.
        """
        if self._lock is None:
            raise ValueError("only the process holding the lock assembles the cache")
        missing = {s: n for s in self.splits if (n := len(self.pending(s)))}
        if missing:
            raise CacheError(f"cannot assemble {self.path}: chunks not committed yet {missing}")
        size = sum(self._chunk_path(s, a).stat().st_size for s in self.splits for a, _ in self.chunks(s))
        if shutil.disk_usage(self.path.parent).free < size:
            raise self._disk_full_error("has too little free space left to assemble the cache", 0, size)
        try:
            final = self._write_cache(attrs, fine_labels)
        except OSError as err:
            if not disk_full(err):
                raise
            raise self._disk_full_error(f"is full ({os.strerror(err.errno)}): assembling the cache {self.path} "
                                        "failed", 0, size) from None
        _remove_tree(self.work)
        self._lock.release()
        return final

    def _write_cache(self, attrs: Mapping[str, Any], fine_labels: Mapping[str, np.ndarray] | None) -> Path:
        """The HDF5 cache from the committed chunks (see :meth:`assemble`); returns its path."""
        with CacheWriter(self.path, overwrite=True) as writer:
            for split in self.splits:
                chunks = self.chunks(split)
                num_rows = int(self.plan["splits"][split]["num_rows"])
                writer.create_split(split, num_rows, int(attrs["feature_dim"]), int(attrs["num_patches"]),
                                    str(attrs["dtype"]))
                digest = hashlib.sha256()
                for start, stop in chunks:
                    arrays = self._load(split, start, stop)
                    expected = (stop - start, int(attrs["num_patches"]), int(attrs["feature_dim"]))
                    grid = [int(v) for v in arrays["token_grid"]]
                    if arrays["patches"].shape != expected or grid != list(attrs["token_grid"]):
                        raise CacheError(f"chunk {split} rows {start}..{stop} has patches {arrays['patches'].shape} "
                                         f"on a {grid} grid; expected {expected} on "
                                         f"{list(attrs['token_grid'])}; pass --overwrite to start over")
                    ids = [str(s) for s in arrays["sample_id"]]
                    digest.update(("\n" if start else "").encode() + "\n".join(ids).encode())
                    writer.write(split, start, arrays["cls"], arrays["patches"], arrays["label"], ids)
                if fine_labels is not None:
                    writer.write_fine_labels(split, fine_labels[split])
                planned = self.plan["splits"][split].get("sample_ids_sha256")
                if planned is not None and digest.hexdigest() != planned:
                    raise CacheError(f"the committed chunks of split {split!r} in {self.work} do not hold the planned "
                                     f"images in order (a chunk was replaced?); delete {self.work} and run again")
            return writer.finish(attrs)

    def geometry(self) -> dict[str, Any]:
        """``token_grid`` (h, w), ``num_patches`` P and ``feature_dim`` D of the first committed chunk.

        Raises:
            CacheError: no chunk is committed, or it is damaged.
        """
        for split, start in sorted(self._committed(), key=lambda c: (SPLITS.index(c[0]), c[1])):
            arrays = self._load(split, start, self._stop(split, start))
            return {"token_grid": [int(v) for v in arrays["token_grid"]],
                    "num_patches": int(arrays["patches"].shape[1]),
                    "feature_dim": int(arrays["cls"].shape[1])}
        raise CacheError(f"no chunk of {self.path} is committed")

    def timing(self) -> tuple[int, float]:
        """``(rows, seconds)``: images encoded and encoding wall time, summed over every committed chunk
        (so over every run of a resumed extraction)."""
        rows, seconds = 0, 0.0
        for split, start in self._committed():
            arrays = self._load(split, start, self._stop(split, start), keys=("label", "seconds"))
            rows += len(arrays["label"])
            seconds += float(arrays["seconds"])
        return rows, seconds

    def close(self) -> None:
        """Release the lock; remove the work folder when no chunk is in it (idempotent; a follower does nothing)."""
        if self._lock is None:
            return
        try:
            if self.work.is_dir() and not self._committed():
                _remove_tree(self.work)
            elif self.work.is_dir():
                done, total = self._progress()
                self._log(f"kept {done} of {total} committed chunks in {self.work}; run the same extract command "
                          "again to resume")
        finally:
            self._lock.release()

    def __enter__(self) -> "ChunkStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


#: Plan keys as the command line names them, for the message that refuses a resume with other settings.
_OPTION_NAMES = {"batch_size": "--batch-size", "chunk_rows": "rows per chunk (--batch-size x --commit-every)",
                 "splits": "the image list", "overwrite": "--overwrite"}


def _describe_change(key: str, old: Any, new: Any) -> str:
    if key == "splits" and isinstance(old, dict) and isinstance(new, dict):
        names = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return f"the image list of split {', '.join(names)} (other images or another order)"
    return f"{_OPTION_NAMES.get(key, key)} (was {_short(old)}, now {_short(new)})"


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_manifest(work: Path) -> dict | None:
    try:
        stored = json.loads((work / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict):
        return None
    stored.setdefault("overwrite", False)  # manifests written before the key existed were plain runs
    return stored


def remove_finished_leftovers(path: str | os.PathLike, plan: Mapping[str, Any]) -> bool:
    """Remove the work folder that an extraction killed right after it renamed its cache into place left behind.

    Returns:
        True when ``path`` is a finished cache and a work folder of the same plan (without --overwrite)
        was removed: that extraction finished. False when there was nothing of the kind.

    Raises:
        CacheError: another process holds the lock.
    """
    path = Path(path)
    work = partial_dir(path)
    removing = work.with_name(work.name + ".removing")
    if not (path.is_file() and (work.is_dir() or removing.is_dir())):
        return False
    lock = CacheLock(path)
    try:
        if removing.is_dir() and not work.is_dir():  # killed while deleting the finished work folder
            _sweep_removing(work)
            return True
        expected = json.loads(json.dumps({**plan, "overwrite": False}))
        if _read_manifest(work) != expected:
            return False
        _remove_tree(work)
        return True
    finally:
        lock.release()


def _remove_tree(folder: Path) -> None:
    """Delete a work folder so that a kill part way never leaves a half-deleted folder under its own name
    (renamed to ``<name>.removing`` first; :func:`_sweep_removing` finishes an interrupted removal)."""
    doomed = folder.with_name(folder.name + ".removing")
    try:
        os.replace(folder, doomed)
    except FileNotFoundError:
        return
    except OSError:  # e.g. a leftover <name>.removing in the way: sweep it and retry once
        _sweep_removing(folder)
        os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _sweep_removing(folder: Path) -> None:
    shutil.rmtree(folder.with_name(folder.name + ".removing"), ignore_errors=True)


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    """Write a file whole or not at all: ``write(handle)`` to a temporary name, fsync, rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
