"""Run storage: the folder of one fitted detector, written atomically and read back with checks.

A run is a folder ``<runs_dir>/<name>/`` holding ``model.safetensors`` (the flow's state dict, or the baseline's
arrays), ``run.json`` (every setting, the cache and its fingerprint, the train loss per epoch, wall time) and,
when it was fitted with held-out normal rows (``fit --val-fraction``), ``calibration.csv`` (their scores, for the
conformal p-values of :mod:`flow.detectors.calibration`). ``score`` adds ``scores.csv``.

This module knows files and formats only: nothing here fits or scores.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cache import FileLock
from flow.detectors.base import Detector
from flow.detectors.calibration import DEFAULT_ALPHA, ConformalCalibration
from flow.detectors.registry import BASELINES, FLOW_METHODS, METHODS, PRIMARY_SCORES, detector_class, method_score_names
from flow.detectors.scorer import Scorer
from flow.detectors.transforms import FEATURE_TRANSFORMS, PAPER_FEATURES, FeatureTransform
from flow.model.sanf import FlowConfig, parameter_count
from flow.model.train import FlowTrainingError

RUN_FORMAT = "sanf-ad-run"
RUN_VERSION = 1
#: The file of a calibrated run holding the scores of its held-out normal train rows.
CALIBRATION_FILE = "calibration.csv"
#: The fitted statistics of a run's feature transform (``standardize``, ``pca-whiten``), safetensors.
TRANSFORM_FILE = "feature_transform.safetensors"


class RunError(Exception):
    """A run folder or its cache is missing, changed or unreadable."""


class RunLock(FileLock):
    """One writer per run folder: an exclusive lock on ``<runs_dir>/.<name>.lock``, held while the run is fitted
    and written (two fits of the same run at once would otherwise interleave their files). A context manager.

    Raises:
        RunError: another process holds it (the message names the run and the holder's pid).
    """

    def __init__(self, run: str | os.PathLike) -> None:
        run = Path(run)
        run.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(run.parent / f".{run.name}.lock",
                         lambda holder: f"the run {run} is being fitted by pid {holder}; wait for it to finish or "
                                        "choose another --runs-dir", RunError)


def umask_mode(mode: int) -> int:
    """``mode`` with the process umask applied (tempfile creates 0600 files and 0700 folders)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:  # file names
            handle.write(text)
        os.chmod(tmp, umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_name(cache_stem: str, method: str, normal_class: int, normal_name: str, seed: int, setting: str = "") -> str:
    """``<cache>__<method>[-<setting>]__normal<k>-<name>__seed<s>``, with characters other than letters, digits,
    ``.``, ``_`` and ``-`` in the class name replaced by ``-`` (Fashion-MNIST has ``T-shirt/top``)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", normal_name)
    label = f"{method}-{setting}" if setting else method
    return f"{cache_stem}__{label}__normal{normal_class}-{safe}__seed{seed}"


def check_not_a_run_file(out: Path, option: str = "--out") -> None:
    """Refuse an output path that is one of a run folder's own files (run.json, model.safetensors, ...).

    Raises:
        ValueError: names the option and the file.
    """
    own = ("run.json", "model.safetensors", CALIBRATION_FILE, TRANSFORM_FILE, "scores.csv")
    if out.name in own and (out.parent / "run.json").is_file():
        raise ValueError(f"{option} {out} is a file of the run folder {out.parent}; choose another name")


def check_writable_dir(folder: Path, option: str) -> None:
    """Create ``folder`` if needed and check that files can be written in it.

    Raises:
        ValueError: it cannot be created or written (the message names the option and the path).
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ValueError(f"{option} {folder}: cannot write there ({err.strerror or err})") from None


def primary_score(record: dict) -> str:
    """The run's primary score: ``record["primary_score"]`` (written since calibration was added), else the
    method's entry of :data:`PRIMARY_SCORES`."""
    return record.get("primary_score") or PRIMARY_SCORES[record["method"]]


def calibration_text(rows: Sequence[int], sample_ids: Sequence[str], scores: dict[str, np.ndarray]) -> str:
    """``calibration.csv``: one line per held-out normal train row: ``row`` (index in the cache's train split),
    ``sample_id``, then every score (as :func:`csv_value` writes it: 9 significant digits)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["row", "sample_id", *scores])
    for i, (row, sample_id) in enumerate(zip(rows, sample_ids, strict=True)):
        writer.writerow([int(row), sample_id, *(csv_value(name, values[i]) for name, values in scores.items())])
    return buffer.getvalue()


def read_calibration(path: str | os.PathLike, record: dict) -> dict[str, np.ndarray] | None:
    """The held-out normal scores of a calibrated run, ``{score name: (n,) float64}``; None for a run fitted
    without held-out rows (``record["calibration"]`` absent).

    Raises:
        RunError: the file is missing or damaged, lacks one of the method's scores, holds non-finite values, or its
            row count differs from ``record["calibration"]["num_rows"]``.
    """
    info = record.get("calibration")
    if not info:
        return None
    path = Path(path)
    file = path / CALIBRATION_FILE
    try:
        with open(file, newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            columns = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise RunError(f"run {path}: cannot read {CALIBRATION_FILE} ({err})") from None
    missing = [name for name in score_names(record) if name not in columns]
    if missing:
        raise RunError(f"run {path}: {CALIBRATION_FILE} lacks the score columns {missing}")
    try:
        out = {name: np.array([float(r[name]) for r in rows], dtype=np.float64) for name in score_names(record)}
    except (TypeError, ValueError):
        raise RunError(f"run {path}: {CALIBRATION_FILE} holds a value that is not a number") from None
    if len(rows) != info.get("num_rows") or not rows:
        raise RunError(f"run {path}: {CALIBRATION_FILE} holds {len(rows)} rows, run.json says "
                       f"{info.get('num_rows')}")
    if not all(np.isfinite(v).all() for v in out.values()):
        raise RunError(f"run {path}: {CALIBRATION_FILE} holds non-finite scores")
    return out


def save_run(runs_dir: Path, name: str, state: dict[str, torch.Tensor], record: dict,
             files: dict[str, str | dict[str, np.ndarray]] | None = None) -> Path:
    """Write a run folder atomically (a temporary folder renamed into place); replaces a run of that name.

    ``files`` maps further file names of the run to their text (``calibration.csv``) or, for a ``.safetensors``
    name, to a dict of arrays (the feature transform's statistics), written in the same folder before it is put
    in place, so a run is never seen without them.

    Raises:
        FlowTrainingError: the weights hold NaN or infinite values (nothing is written).
        RunError: something other than a run folder is in the way.
    """
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise FlowTrainingError(f"run {name}: {len(bad)} weight tensors hold NaN or infinite values after "
                                "training (check --lr and --weight-decay); nothing saved")
    final = runs_dir / name
    if final.exists() and not (final / "run.json").is_file():
        raise RunError(f"{final} exists and is not a run folder; move it away")
    runs_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=runs_dir, prefix=f".{name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, umask_mode(0o777))
        save_file(state, str(tmp / "model.safetensors"))
        for file_name, content in (files or {}).items():
            if isinstance(content, dict):
                save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in content.items()},
                          str(tmp / file_name))
            else:
                (tmp / file_name).write_text(content)
        (tmp / "run.json").write_text(json.dumps(record, indent=2) + "\n")
        for file in tmp.iterdir():  # safetensors writes 0600 files; a run is shared like any other output
            os.chmod(file, umask_mode(0o666))
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _move_into_place(folder: Path, final: Path, attempts: int = 5) -> None:
    """Rename ``folder`` to ``final``, replacing an existing ``final`` whole.

    On Linux an existing run is swapped with the new one atomically (``renameat2(RENAME_EXCHANGE)``), so
    readers and a process killed at any moment see either the old run or the new one, never neither.
    Elsewhere the old run is renamed aside first (a window of two renames). A concurrent writer of the
    same run makes this retry instead of failing.
    """
    for _ in range(attempts):
        if final.exists() and _exchange(folder, final):
            shutil.rmtree(folder, ignore_errors=True)  # now holds the old run
            return
        aside = None
        if final.exists():
            aside = _aside(final, ".old")
            try:
                os.replace(final, aside)
            except FileNotFoundError:  # another writer moved it first
                pass
        try:
            os.replace(folder, final)
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            continue  # another writer put its run in place meanwhile: replace that one
        finally:
            if aside is not None:
                shutil.rmtree(aside.parent, ignore_errors=True)
        return
    raise RunError(f"could not put the run {final} in place: other processes keep writing it")


def _aside(run: Path, suffix: str) -> Path:
    """A free path in a new hidden folder beside ``run`` (which :func:`list_runs` skips), to move ``run`` to before
    deleting that folder."""
    return Path(tempfile.mkdtemp(dir=run.parent, prefix=f".{run.name}.", suffix=suffix)) / "run"


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2(..., RENAME_EXCHANGE)``; False where unsupported."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # no libc, or glibc older than 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOENT):  # unsupported here, or b vanished
        return False
    raise OSError(code, os.strerror(code), str(b))


#: Keys every run.json holds, with their types; flows add ``flow`` (dict), baselines ``params`` (dict) and
#: ``scores`` (list of score names).
RECORD_TYPES = {"method": str, "dataset": str, "backbone": str, "normal_class": int, "normal_name": str, "seed": int,
                "cache": str, "cache_fingerprint": str}


def read_run_record(path: str | os.PathLike) -> dict:
    """Read and check a run folder's ``run.json``.

    Raises:
        RunError: unreadable, not JSON, of another format or version, or lacking a required key; the
            message names the run folder.
    """
    path = Path(path)
    try:
        record = json.loads((path / "run.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunError(f"run {path}: cannot read run.json ({err})") from None
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT \
            or record.get("format_version") != RUN_VERSION:
        raise RunError(f"run {path}: run.json is not a {RUN_FORMAT} v{RUN_VERSION} record")
    types = dict(RECORD_TYPES)
    types.update({"flow": dict} if record.get("method") in FLOW_METHODS else {"params": dict, "scores": list})
    missing = [key for key in types if key not in record]
    if missing:
        raise RunError(f"run {path}: run.json lacks {missing}")
    wrong = [key for key, kind in types.items() if not isinstance(record[key], kind) or isinstance(record[key], bool)]
    if wrong:
        raise RunError(f"run {path}: run.json has values of the wrong type for {wrong}")
    if record["method"] not in METHODS:
        raise RunError(f"run {path}: unknown method {record['method']!r} (this build has {', '.join(METHODS)})")
    if record["method"] in BASELINES and list(record["scores"]) != list(BASELINES[record["method"]].score_names):
        raise RunError(f"run {path}: run.json lists scores {record['scores']} for {record['method']}")
    calibration = record.get("calibration")
    if calibration is not None and not (isinstance(calibration, dict) and isinstance(calibration.get("num_rows"), int)
                                        and not isinstance(calibration.get("num_rows"), bool)):
        raise RunError(f"run {path}: run.json's calibration entry is malformed")
    if "primary_score" in record and record["primary_score"] not in score_names(record):
        raise RunError(f"run {path}: run.json's primary_score {record['primary_score']!r} is not one of "
                       f"{', '.join(score_names(record))}")
    return record


def feature_transform_name(record: dict) -> str:
    """The run's ``--transform`` (feature transform) (``raw`` for runs fitted before the option)."""
    return record.get("feature_transform", PAPER_FEATURES)


def load_feature_transform(path: str | os.PathLike, record: dict) -> FeatureTransform:
    """The feature transform a run was fitted with, with its fitted statistics (:data:`TRANSFORM_FILE`).

    Raises:
        RunError: an unknown transform name, or statistics missing, unreadable or of the wrong width.
    """
    name = feature_transform_name(record)
    if name not in FEATURE_TRANSFORMS:
        raise RunError(f"run {path}: run.json's feature_transform {name!r} is not one of "
                       f"{', '.join(FEATURE_TRANSFORMS)}")
    state = {}
    file = Path(path) / TRANSFORM_FILE
    if file.exists():
        try:
            state = {key: value.numpy() for key, value in load_file(str(file)).items()}
        except Exception as err:  # OSError, or safetensors' own error type on a damaged file
            raise RunError(f"run {path}: cannot read {TRANSFORM_FILE} ({err})") from None
    try:
        transform = FeatureTransform.from_state(name, state)
    except ValueError as err:
        raise RunError(f"run {path}: {err} ({TRANSFORM_FILE})") from None
    features = record.get("features")
    width = features.get("feature_dim") if isinstance(features, dict) else None
    if transform.shift is not None and width is not None and transform.shift.shape[0] != width:
        raise RunError(f"run {path}: {TRANSFORM_FILE} is {transform.shift.shape[0]} wide, the features {width}")
    return transform


def score_names(record: dict) -> tuple[str, ...]:
    """The scores a run's method gives: ``nll``, ``z2`` for the flows; the baseline's own otherwise."""
    return method_score_names(record["method"])


def load_run(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Detector, dict]:
    """Load a run folder's fitted detector (eval mode, on ``device``) and record.

    Raises:
        RunError: ``run.json`` or ``model.safetensors`` is missing, damaged, of another format, or the
            weights do not fit the recorded detector; the message names the run folder.
    """
    path = Path(path)
    record = read_run_record(path)
    method = record["method"]
    params = record["params"] if method in BASELINES else {"flow": record["flow"]}
    if method in FLOW_METHODS:
        try:
            expected = parameter_count(FlowConfig.from_dict(record["flow"]))
        except Exception as err:  # TypeError, ValueError, or torch's errors on impossible sizes
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise RunError(f"run {path}: run.json has an invalid flow configuration ({first})") from None
    try:
        state = load_file(str(path / "model.safetensors"))
    except Exception as err:  # OSError, or safetensors' own error type on a damaged file
        raise RunError(f"run {path}: cannot read model.safetensors ({err})") from None
    if method in FLOW_METHODS:
        stored = sum(v.numel() for k, v in state.items() if "perm" not in k)
        if stored != expected:  # checked before building the model, which run.json could make of any size
            raise RunError(f"run {path}: model.safetensors does not fit the flow described in run.json "
                           f"({stored:,} weights stored, {expected:,} expected)")
    try:
        detector = detector_class(method).from_state(params, state)
    except RuntimeError:  # load_state_dict: missing, unexpected or mis-shaped tensors
        raise RunError(f"run {path}: model.safetensors does not fit the flow described in run.json") from None
    except (TypeError, ValueError, KeyError) as err:
        raise RunError(f"run {path}: model.safetensors or run.json does not describe a {method} "
                       f"detector ({err})") from None
    return detector.to(device).eval(), record


def load_scorer(path: str | os.PathLike, device: str | torch.device = "cpu", calibrated: bool = False,
                alpha: float = DEFAULT_ALPHA) -> Scorer:
    """A run folder as one :class:`~flow.detectors.scorer.Scorer`: its feature transform, detector and (with
    ``calibrated``, for a run fitted with held-out rows) the conformal calibration of its primary score at ``alpha``.

    Raises:
        RunError: as :func:`load_run`, :func:`load_feature_transform` and :func:`read_calibration`.
    """
    detector, record = load_run(path, device)
    calibration = read_calibration(path, record) if calibrated else None
    post = None if calibration is None else ConformalCalibration(calibration[primary_score(record)], alpha)
    return Scorer(detector, load_feature_transform(path, record), post).to(device).eval()


def list_runs(runs_dir: str | os.PathLike) -> list[Path]:
    """Run folders (those holding a ``run.json``) directly under ``runs_dir``, sorted by name."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    return sorted(p for p in runs_dir.iterdir() if not p.name.startswith(".") and (p / "run.json").is_file())


def remove_run(path: str | os.PathLike) -> None:
    """Remove a run folder whole: it is renamed aside first (a hidden name), so that a process killed during the
    removal leaves either the whole run or nothing under its name.

    Raises:
        RunError: ``path`` is not a run folder (no readable ``run.json``): nothing is removed.
    """
    path = Path(path)
    read_run_record(path)
    aside = _aside(path, ".removing")
    os.replace(path, aside)
    shutil.rmtree(aside.parent, ignore_errors=True)


#: The columns of ``auroc.csv`` and ``auroc_by_anomaly.csv`` that hold a rate in [0, 1] measured on the test split,
#: written with :data:`METRIC_DECIMALS` decimals.
METRIC_COLUMNS = ("auroc", "aupr", "fpr95", "false_alarm_rate", "detection_rate")
#: Decimals of a metric (:data:`METRIC_COLUMNS`) in a CSV.
METRIC_DECIMALS = 6
#: Significant digits of every other float in a CSV (scores, p-values, alpha).
SIGNIFICANT_DIGITS = 9


def csv_value(column: str, value):
    """``value`` as every CSV of the project writes it (auroc.csv, auroc_by_anomaly.csv, scores.csv,
    calibration.csv, predictions.csv): a fixed precision per kind of column, so no float prints as
    ``0.6418999999999999``; anything but a float is returned unchanged (ints, strings, ``""``).

    - Metrics (:data:`METRIC_COLUMNS`: AUROC, AUPR, FPR95, false-alarm and detection rates) get ``%.6f``:
      they are shares of image pairs or images of the test split, whose sampling error is above 1e-3 for any
      test split here, so 1e-6 loses nothing measurable (and every value of a split of up to 1,000 x 1,000
      pairs or 10^6 images stays exact to rounding).
    - Every other float (scores in nats or distances, ``z2``, p-values, alpha) gets 9 significant digits
      (``%.9g``): float32's round-trip precision, so a score computed in float32 (the flows) reads back exactly,
      and 1e-9 relative is far below how far scores are reproducible (1e-5 across batch sizes, README). The
      conformal p-values read from ``calibration.csv`` compare new scores with these 9-digit held-out scores;
      ``anomalous`` columns are decided on the unrounded p-value.

    NaN and infinities print as ``nan`` / ``inf`` (as Python reads them back).
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (float, np.floating)):
        return value
    if column in METRIC_COLUMNS:
        return f"{float(value):.{METRIC_DECIMALS}f}"
    return f"{float(value):.{SIGNIFICANT_DIGITS}g}"


def write_csv(path: Path, columns: Sequence[str], rows: list[dict]) -> None:
    """Write ``rows`` (dicts keyed by ``columns``) as a CSV file, atomically (a temporary file renamed); floats are
    written by :func:`csv_value`."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: csv_value(key, value) for key, value in row.items()} for row in rows)
    atomic_write_text(path, buffer.getvalue())


