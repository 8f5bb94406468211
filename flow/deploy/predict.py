"""Use a fitted run on new images: ``pipeline.py predict``.

A :class:`Predictor` loads a run once: its backbone and preprocessing are rebuilt from the provenance it records
(:mod:`extract.encode`), each image (a file, a PIL image or an array) is encoded as the cached images were (storage
rounding included), scored by the run's :class:`~flow.detectors.scorer.Scorer` (the module ``score`` runs) and, for
a calibrated run, given its conformal p-value and a decision at ``alpha``
(:class:`~flow.detectors.calibration.ConformalCalibration`). The same prediction runs through an exported ONNX graph
(:mod:`flow.deploy.export`) with ``onnx=MODEL.onnx``. :func:`predict` is ``pipeline.py predict``: files in, a CSV
out.

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
from extract.encode import ImageInput, image_batches, list_images, preprocessing_only, rebuild_encoder
from extract.run import non_finite_rows
from flow.deploy.runtime import onnx_session, read_metadata, run_features, transform_sha256
from flow.detectors.calibration import DEFAULT_ALPHA, ConformalCalibration, check_alpha, smallest_p_value
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


@dataclass
class Predictions:
    """A run's results on N new images, in input order.

    Attributes:
        names: each input's name: its path, or ``<image i>`` for an image given in memory.
        scores: every score of the method, ``{name: (N,) float64}`` (higher = more anomalous; NaN where ``errors``).
        primary_score: the score that ``score`` is and that the p-value is of.
        p_value: (N,) float64 conformal p-values, or None for a run without held-out rows.
        anomalous: (N,) bool, ``p_value <= alpha``, or None for a run without held-out rows.
        errors: why an input could not be scored, ``""`` where it was.
        alpha: the significance level of the decisions.
    """

    names: list[str]
    scores: dict[str, np.ndarray]
    primary_score: str
    p_value: np.ndarray | None
    anomalous: np.ndarray | None
    errors: list[str]
    alpha: float

    def __len__(self) -> int:
        return len(self.names)

    @property
    def score(self) -> np.ndarray:
        """(N,) the primary score."""
        return self.scores[self.primary_score]

    def rows(self) -> list[dict]:
        """One dict per image with the columns of :func:`prediction_columns` (``path`` = the name)."""
        rows = []
        for i, name in enumerate(self.names):
            row = {"path": name, "error": self.errors[i]}
            if not self.errors[i]:
                row["score"] = float(self.score[i])  # floats are written by write_csv (run_folder.csv_value)
                row.update({key: float(values[i]) for key, values in self.scores.items()})
                if self.p_value is not None:
                    row["p_value"] = float(self.p_value[i])
                    row["anomalous"] = int(self.anomalous[i])
            rows.append(row)
        return rows


class Predictor:
    """A fitted run ready for new images: loaded once, then :meth:`predict` as often as needed.

    Args:
        run: a run folder (any method).
        device: ``auto``, ``cpu`` or ``cuda`` (the PyTorch path).
        onnx: an ONNX graph exported from this run: score through onnxruntime instead of PyTorch.
        weights: the backbone's weights file, when it moved since extraction (its sha256 must match).
        log: where to print status lines.

    Raises:
        RunError: the run is unreadable, its calibration is damaged, or the ONNX graph was exported from another
            run.
        BackboneError: the backbone or its weights cannot be rebuilt as recorded.
    """

    def __init__(self, run: str | os.PathLike, device: str = "auto", onnx: str | os.PathLike | None = None,
                 weights: str | None = None, log: Callable[[str], None] = print) -> None:
        self.run = Path(run)
        self.record = read_run_record(self.run)
        self.calibration = read_calibration(self.run, self.record)
        self.features = run_features(self.run, self.record)
        self.names = list(score_names(self.record))
        self.primary_score = primary_score(self.record)
        self.session = None
        if onnx is None:
            self.device = resolve_device(device)
            self.encoder = rebuild_encoder(self.features, self.device, weights=weights, log=log)
            self.scorer = load_scorer(self.run, self.device)
        else:  # the graph holds the backbone and runs on onnxruntime's CPU provider: nothing to say otherwise
            if weights is not None:
                raise ValueError(f"--weights {weights} sets the PyTorch backbone; with --onnx the backbone is the "
                                 "graph's: give one of them")
            if device == "cuda":
                raise ValueError("--device cuda: the --onnx graph runs on onnxruntime's CPU provider; use --device "
                                 "cpu or auto, or drop --onnx")
            self.encoder = preprocessing_only(self.features)
            self.session = _checked_session(onnx, self.run, self.record)
            meta = read_metadata(self.session)
            log(f"onnxruntime {onnx}: {meta.get('backbone')} + {self.record['method']}, opset {meta.get('opset')}")

    @property
    def calibrated(self) -> bool:
        """Whether the run has held-out normal scores (p-values and decisions)."""
        return self.calibration is not None

    @property
    def num_calibration(self) -> int:
        """n, the held-out normal rows (0 for a run without)."""
        return 0 if self.calibration is None else len(self.calibration[self.primary_score])

    def predict(self, images: list[ImageInput], alpha: float = DEFAULT_ALPHA, batch_size: int = 64,
                num_workers: int = 0, progress: bool = False) -> Predictions:
        """Score images: file paths, PIL images or arrays (H, W) or (H, W, 3) of 8-bit values (0-255).

        An input that cannot be read or whose features are not finite keeps its place, with NaN scores and the
        reason in ``errors``.

        Raises:
            ValueError: a bad ``alpha``.
        """
        alpha = check_alpha(alpha)
        names = [str(item) if isinstance(item, (str, os.PathLike)) else f"<image {i}>" for i, item in enumerate(images)]
        normalise = self.session is None
        batches = image_batches(images, self.encoder.transform(normalise), self.encoder.size, batch_size, num_workers,
                                progress)
        score_block = self._score_torch if self.session is None else self._score_onnx
        scores, errors = score_files(batches, len(images), self.names,
                                     lambda block, rows, errs: score_block(block, rows, errs, names, batch_size))
        p_value = anomalous = None
        if self.calibration is not None:
            post = ConformalCalibration(self.calibration[self.primary_score], alpha)
            p, flagged = post(torch.from_numpy(scores[self.primary_score]))
            p_value, anomalous = p.numpy(), flagged.numpy()
        return Predictions(names, scores, self.primary_score, p_value, anomalous, errors, alpha)

    def _score_torch(self, images: torch.Tensor, rows: list[int], errors: list[str], names: list[str],
                     batch_size: int) -> dict[str, np.ndarray]:
        cls, patches, beyond_range = self.encoder.encode_with_range(images)
        finite = ~_check_finite(cls, patches, beyond_range, rows, errors, names, self.features["dtype"])
        block = {name: np.full(len(rows), np.nan) for name in self.names}
        if finite.any():  # the detectors see finite rows only (a non-finite row has no meaningful score)
            scored = self.scorer.scores(cls[finite], patches[finite], batch_size)
            for name in self.names:
                block[name][finite] = scored[name]
        return block

    def _score_onnx(self, images: torch.Tensor, rows: list[int], errors: list[str], names: list[str],
                    batch_size: int) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.session.run(self.names, {"images": images.numpy()}), strict=True))


def _checked_session(onnx_path: str | os.PathLike, run: Path, record: dict):
    """An onnxruntime session of ``onnx_path``, checked to be an export of this very run (its metadata).

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
    return session


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
        for j, e in zip(indices, batch_errors, strict=True):
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


def predict(run: str | os.PathLike, paths: list[str], out: str | os.PathLike | None = None,
            alpha: float = DEFAULT_ALPHA, batch_size: int = 64, num_workers: int = 2, device: str = "auto",
            onnx: str | os.PathLike | None = None, weights: str | None = None, progress: bool = True,
            log: Callable[[str], None] = print) -> PredictionSummary:
    """Score new image files with a fitted run and write one CSV row per file (``pipeline.py predict``).

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
    read_calibration(run, record)  # a damaged calibration is refused before anything else is done
    out = Path(out) if out is not None else run / PREDICTIONS_FILE
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name")
    check_not_a_run_file(out)
    listed = list_images(list(paths))
    if any(os.path.exists(f) and os.path.samefile(f, out) for f in listed.files if os.path.isfile(out)):
        raise ValueError(f"--out {out} is one of the input images; choose another name")
    if onnx is not None and os.path.isfile(out) and os.path.samefile(onnx, out):
        raise ValueError(f"--out {out} is the --onnx graph; choose another name")
    if not listed.files:
        n = len(listed.skipped)
        raise ValueError(f"no image files under {', '.join(paths)}"
                         + (f" ({n} file{'' if n == 1 else 's'} that {'is' if n == 1 else 'are'} not an image"
                            f"{'' if n == 1 else 's'})" if n else ""))
    check_writable_dir(out.parent, "--out")  # created once the inputs are known good, not by a refused call
    predictor = Predictor(run, device=device, onnx=onnx, weights=weights, log=log)
    if predictor.calibrated and smallest_p_value(predictor.num_calibration) > alpha:
        log(f"note: with {predictor.num_calibration} held-out rows no p-value can be <= alpha {alpha}, so nothing "
            "will be flagged; hold out more rows (--val-fraction) or raise --alpha")
    result = predictor.predict(listed.files, alpha=alpha, batch_size=batch_size, num_workers=num_workers,
                               progress=progress)
    write_csv(out, prediction_columns(record), result.rows())
    num_errors = sum(1 for e in result.errors if e)
    flagged = int(result.anomalous[[not e for e in result.errors]].sum()) if predictor.calibrated else None
    return PredictionSummary(out, len(result), len(result) - num_errors, num_errors, flagged, listed.skipped, alpha,
                             predictor.calibrated)


__all__ = ["PREDICTIONS_FILE", "PredictionSummary", "Predictions", "Predictor", "predict", "prediction_columns",
           "score_files"]
