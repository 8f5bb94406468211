"""Use a fitted run on new images: ``pipeline.py predict``.

The run's backbone and preprocessing are rebuilt from the provenance it records (:mod:`extract.encode`), each
image is encoded as the cached images were (storage rounding included), scored by the run's detector and, for a
calibrated run, given its conformal p-value (:mod:`flow.detectors.calibration`) and a decision at ``alpha``. The same
prediction runs through an exported ONNX graph (:mod:`flow.deploy.export`) with ``onnx=MODEL.onnx``.

Output: one CSV row per input file, in order: ``path``, ``score`` (the run's primary score), every score of the
method, ``p_value``, ``anomalous`` (0/1) and ``error`` (why a file could not be scored; its scores are then
empty). Nothing is dropped: a file that cannot be read keeps its row.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from extract.backbone import file_sha256
from extract.device import resolve_device
from extract.encode import CacheEncoder, list_images, preprocessing_only, rebuild_encoder
from extract.run import non_finite_rows
from flow.deploy.runtime import onnx_session, read_metadata, run_features, transform_sha256
from flow.detectors.calibration import DEFAULT_ALPHA, check_alpha, conformal_p_values, smallest_p_value
from flow.detectors.scorer import Scorer
from flow.store.run_folder import (
    RunError,
    check_not_a_run_file,
    check_writable_dir,
    load_scorer,
    primary_score,
    read_calibration,
    read_run_record,
    score_names,
    write_csv,
)

PREDICTIONS_FILE = "predictions.csv"


@dataclass
class PredictionSummary:
    """What :func:`predict` did.

    Attributes:
        out: the CSV written.
        num_files: rows written (one per input file).
        num_scored: rows with scores.
        num_errors: rows with an error instead of scores.
        num_flagged: rows with ``anomalous = 1`` (None for a run without calibration).
        skipped: files inside the folders given that are not images by extension (not in the CSV).
        alpha: the significance level of the decisions.
        calibrated: whether the run has held-out normal scores (p-values and decisions).
    """

    out: Path
    num_files: int
    num_scored: int
    num_errors: int
    num_flagged: int | None
    skipped: list[str]
    alpha: float
    calibrated: bool

    def line(self) -> str:
        """The one summary line printed at the end."""
        errors = f", {self.num_errors} could not be read (reason in the error column)" if self.num_errors else ""
        n, skipped = len(self.skipped), ""
        if n:
            skipped = ("; 1 file in the folders given is not an image and was skipped" if n == 1 else
                       f"; {n} files in the folders given are not images and were skipped")
        if self.calibrated:
            flagged = f"{self.num_flagged} flagged anomalous at alpha {self.alpha}"
        else:
            flagged = ("no decisions: the run has no held-out normal scores (fit it with --val-fraction, e.g. 0.2, "
                       "for p-values and decisions)")
        return f"scored {self.num_scored} of {self.num_files} images{errors}; {flagged}{skipped} -> {self.out}"


def prediction_columns(record: dict) -> list[str]:
    """``path, score, <every score of the method>, p_value, anomalous, error``."""
    return ["path", "score", *score_names(record), "p_value", "anomalous", "error"]


def _rows(files: list[str], scores: dict[str, np.ndarray], errors: list[str], record: dict,
          calibration: dict[str, np.ndarray] | None, alpha: float) -> tuple[list[dict], int | None]:
    """CSV rows and the number flagged, from per-file scores (NaN where a file has an error)."""
    primary = primary_score(record)
    p_values = conformal_p_values(calibration[primary], scores[primary]) if calibration is not None else None
    rows, flagged = [], 0
    for i, path in enumerate(files):
        row = {"path": path, "error": errors[i]}
        if not errors[i]:
            row["score"] = float(scores[primary][i])  # floats are written by write_csv (flow.store.run_folder.csv_value)
            row.update({name: float(scores[name][i]) for name in score_names(record)})
            if p_values is not None:
                row["p_value"] = float(p_values[i])
                row["anomalous"] = int(p_values[i] <= alpha)
                flagged += row["anomalous"]
        rows.append(row)
    return rows, (flagged if p_values is not None else None)


def score_files(batches, num_files: int, names: tuple[str, ...] | list[str], score_block: Callable
                ) -> tuple[dict[str, np.ndarray], list[str]]:
    """The loop both prediction paths share: every score of every file, NaN and the reason where a file has none.

    Args:
        batches: ``(indices, images, errors)`` triples (:meth:`extract.encode.CacheEncoder.batches`).
        num_files: how many files the batches cover.
        names: the score names.
        score_block: ``(images (B, 3, H, W) of the readable files, their indices, errors) -> {name: (B,)}``; it may
            set ``errors[i]`` for a file whose features turn out unusable.

    Returns:
        ``({name: (num_files,) float64}, errors)``; scores are NaN wherever ``errors`` is not empty.
    """
    scores = {name: np.full(num_files, np.nan) for name in names}
    errors = [""] * num_files
    for indices, images, batch_errors in batches:
        for j, e in zip(indices, batch_errors):
            errors[j] = e
        ok = [j for j, e in enumerate(batch_errors) if not e]
        if not ok:
            continue
        rows = [indices[j] for j in ok]
        block = score_block(images[ok], rows, errors)
        for name in names:
            scores[name][rows] = block[name]
    _drop_errors(scores, errors)
    return scores, errors


def _score_torch(scorer: Scorer, record: dict, encoder: CacheEncoder, files: list[str], batch_size: int,
                 num_workers: int, progress: bool) -> tuple[dict[str, np.ndarray], list[str]]:
    """Every score of every file with the run's own transform and detector (the code ``score`` uses); NaN for
    unreadable files."""

    def score_block(images: torch.Tensor, rows: list[int], errors: list[str]) -> dict[str, np.ndarray]:
        cls, patches, beyond_range = encoder.encode_with_range(images)
        finite = ~_check_finite(cls, patches, beyond_range, rows, errors, files, encoder.features["dtype"])
        block = {name: np.full(len(rows), np.nan) for name in score_names(record)}
        if finite.any():  # the detectors see finite rows only (a non-finite row has no meaningful score)
            scored = scorer.scores(cls[finite], patches[finite], batch_size)
            for name in score_names(record):
                block[name][finite] = scored[name]
        return block

    return score_files(encoder.batches(files, batch_size, num_workers, progress=progress), len(files),
                       score_names(record), score_block)


def _check_finite(cls: np.ndarray, patches: np.ndarray, beyond_range: np.ndarray, indices: list[int],
                  errors: list[str], files: list[str], dtype: str) -> np.ndarray:
    """An error for each image with non-finite features, naming the cause: the backbone's own output, or finite
    features beyond the range of the run's storage dtype (the run was fitted on features rounded to it).

    Returns:
        (B,) bool, the rows with non-finite features.
    """
    bad = non_finite_rows(cls, patches)
    for j in np.flatnonzero(bad):
        errors[indices[j]] = (f"the features of {files[indices[j]]} exceed the range of {dtype}, the dtype the "
                              "run's cache stored them in (fit on a cache extracted with --dtype float32)"
                              if beyond_range[j] else
                              f"the backbone gave non-finite features for {files[indices[j]]}")
    return bad


def _drop_errors(scores: dict[str, np.ndarray], errors: list[str]) -> None:
    """NaN for the rows with an error; an error for rows whose scores are not finite."""
    for name, values in scores.items():
        for i in np.flatnonzero(~np.isfinite(values)):
            if not errors[i]:
                errors[i] = f"non-finite {name} score"
    for i, e in enumerate(errors):
        if e:
            for values in scores.values():
                values[i] = np.nan


def score_with_onnx(onnx_path: str | os.PathLike, run: Path, record: dict, prep: CacheEncoder, files: list[str],
                    batch_size: int, num_workers: int, progress: bool,
                    log: Callable[[str], None] = print) -> tuple[dict[str, np.ndarray], list[str]]:
    """Every score of every file through onnxruntime; NaN and the reason for files that cannot be read or whose
    scores are not finite (:func:`score_files`).

    Raises:
        RunError: the graph cannot be loaded, or was exported from another run (its metadata says which).
    """
    session = onnx_session(onnx_path)
    meta = read_metadata(session)
    if meta.get("cache_fingerprint") != record["cache_fingerprint"] or meta.get("run_created") != record.get(
            "created", "") or meta.get("method") != record["method"] or meta.get("model_sha256") != file_sha256(
            Path(run) / "model.safetensors") or meta.get("feature_transform_sha256", "") != transform_sha256(run):
        raise RunError(f"--onnx {onnx_path} was exported from another run ({meta.get('run', 'no sanf_ad metadata')}); "
                       "export this run, or pass the run it came from")
    names = list(score_names(record))
    log(f"onnxruntime {onnx_path}: {meta.get('backbone')} + {record['method']}, opset {meta.get('opset')}")
    def score_block(images: torch.Tensor, rows: list[int], errors: list[str]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, {"images": images.numpy()})))

    return score_files(prep.batches(files, batch_size, num_workers, normalise=False, progress=progress), len(files),
                       names, score_block)


def predict(run: str | os.PathLike, paths: list[str], out: str | os.PathLike | None = None,
            alpha: float = DEFAULT_ALPHA, batch_size: int = 64, num_workers: int = 2, device: str = "auto",
            onnx: str | os.PathLike | None = None, weights: str | None = None, progress: bool = True,
            log: Callable[[str], None] = print) -> PredictionSummary:
    """Score new image files with a fitted run and write one CSV row per file.

    Args:
        run: a run folder (any method).
        paths: image files and folders (searched recursively; see :func:`extract.encode.list_images`).
        out: the CSV to write; default ``<run>/predictions.csv``. Written atomically.
        alpha: significance level: a calibrated run flags an image when its p-value is <= alpha.
        batch_size: images per forward pass.
        num_workers: DataLoader worker processes decoding images.
        device: ``auto``, ``cpu`` or ``cuda`` (the PyTorch path).
        onnx: an ONNX graph exported from this run (``pipeline.py export``): run the prediction through
            onnxruntime instead of PyTorch; the CSV has the same columns.
        weights: the backbone's weights file, when it moved since extraction (its sha256 must match).
        progress: show a progress bar.
        log: where to print status lines.

    Returns:
        A :class:`PredictionSummary`.

    Raises:
        RunError: the run is unreadable, or its calibration is damaged.
        BackboneError: the backbone or its weights cannot be rebuilt as recorded.
        ValueError: no paths, a bad ``alpha``, or an output that cannot be written.
    """
    alpha = check_alpha(alpha)
    if not paths:
        raise ValueError("predict needs at least one PATH (image files or folders)")
    missing = [path for path in paths if not os.path.exists(path)]
    if missing:  # a mistyped folder is an error, not an empty prediction
        raise ValueError(f"PATH {missing[0]} does not exist")
    run = Path(run)
    record = read_run_record(run)
    calibration = read_calibration(run, record)
    out = Path(out) if out is not None else run / PREDICTIONS_FILE
    check_writable_dir(out.parent, "--out")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name")
    check_not_a_run_file(out)
    listed = list_images(list(paths))
    if any(os.path.exists(f) and os.path.samefile(f, out) for f in listed.files if os.path.isfile(out)):
        raise ValueError(f"--out {out} is one of the input images; choose another name")
    if not listed.files:
        n = len(listed.skipped)
        raise ValueError(f"no image files under {', '.join(paths)}"
                         + (f" ({n} file{'' if n == 1 else 's'} that {'is' if n == 1 else 'are'} not an image"
                            f"{'' if n == 1 else 's'})" if n else ""))
    if calibration is not None and smallest_p_value(len(calibration[primary_score(record)])) > alpha:
        log(f"note: with {len(calibration[primary_score(record)])} held-out rows no p-value can be <= alpha "
            f"{alpha}, so nothing will be flagged; hold out more rows (--val-fraction) or raise --alpha")
    features = run_features(run, record)
    if onnx is None:
        dev = resolve_device(device)
        encoder = rebuild_encoder(features, dev, weights=weights, log=log)
        scores, errors = _score_torch(load_scorer(run, dev), record, encoder, listed.files, batch_size, num_workers,
                                      progress)
    else:
        scores, errors = score_with_onnx(onnx, run, record, preprocessing_only(features), listed.files, batch_size,
                                         num_workers, progress, log)
    rows, flagged = _rows(listed.files, scores, errors, record, calibration, alpha)
    write_csv(out, prediction_columns(record), rows)
    num_errors = sum(1 for e in errors if e)
    return PredictionSummary(out, len(rows), len(rows) - num_errors, num_errors, flagged, listed.skipped, alpha,
                             calibration is not None)


__all__ = ["PREDICTIONS_FILE", "PredictionSummary", "predict", "prediction_columns", "score_with_onnx",
           "score_files"]
