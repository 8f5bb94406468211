"""Scoring the test split of a cache with every run folder: the protocol behind ``score``.

``<runs_dir>/auroc.csv`` collects one row per (run, score type). Calibrated runs (fitted with held-out normal rows)
add the conformal p-values (:mod:`flow.detectors.calibration`) and the realised false-alarm rate on the test
split's normal images.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cache import FeatureCache
from extract.device import resolve_device
from flow.detectors.calibration import (
    DEFAULT_ALPHA,
    check_alpha,
    conformal_p_values,
    false_alarm_band,
    smallest_p_value,
)
from flow.experiments.metrics import MetricError, aupr, auroc, fpr_at_tpr
from flow.store.run_folder import (
    RunError,
    list_runs,
    load_scorer,
    primary_score,
    read_calibration,
    read_run_record,
    score_names,
    write_csv,
)

AUROC_COLUMNS = ("dataset", "backbone", "normal_class", "normal_name", "method", "score", "seed", "auroc",
                 "n_normal", "n_anomalous", "run", "cache", "aupr", "fpr95", "setting", "alpha", "n_calibration",
                 "false_alarm_rate", "detection_rate")
#: Columns of ``auroc_by_anomaly.csv``: the metrics of each run and score on the normal test images against the
#: test images of one anomalous class (MVTec AD: one defect type) at a time.
BY_ANOMALY_COLUMNS = ("dataset", "backbone", "normal_class", "normal_name", "method", "score", "seed", "anomaly_class",
                      "anomaly_name", "auroc", "n_normal", "n_anomalous", "run", "cache", "aupr", "fpr95", "setting")



def score_runs(runs_dir: str | os.PathLike = "runs", batch_size: int = 256, device: str = "auto",
               block_rows: int = 2048, log: Callable[[str], None] = print, alpha: float = DEFAULT_ALPHA,
               only: Sequence[str | os.PathLike] | None = None) -> list[dict]:
    """Score the test split of its cache with every run under ``runs_dir``; write scores and AUROCs.

    The test split is read once per cache in blocks of ``block_rows`` rows and every run on that cache
    scores each block, so memory stays bounded by a block whatever the cache's size.

    Writes ``<run>/scores.csv`` (sample_id, label, is_anomaly, then the method's scores: nll in nats and z2
    for the flows; for a calibrated run also ``p_value``, the conformal p-value of the primary score, and
    ``anomalous``, p_value <= alpha) per run,
    ``<runs_dir>/auroc.csv`` (columns ``AUROC_COLUMNS``: one row per run and score type; the protocol's
    numbers) and ``<runs_dir>/auroc_by_anomaly.csv`` (columns ``BY_ANOMALY_COLUMNS``: normal test images
    against each anomalous class alone, e.g. per MVTec AD defect type).

    Args:
        runs_dir: folder of run folders.
        batch_size: samples per forward pass.
        device: ``auto``, ``cpu`` or ``cuda``.
        block_rows: test rows read from the cache at once.
        log: where to print progress lines.
        alpha: significance level of the calibrated runs' decisions: their AUROC rows also hold the realised
            false-alarm rate (normal test images with p <= alpha, each score with its own calibration) and
            detection rate (anomalous ones), which the guarantee of :mod:`flow.detectors.calibration` bounds by alpha.
        only: score these run folders alone (their ``scores.csv`` is written, ``runs_dir``'s tables are not, so
            that they stay complete); None: every run under ``runs_dir``.

    Returns:
        The AUROC rows (dicts keyed by ``AUROC_COLUMNS``; the calibration columns empty for other runs).

    Raises:
        RunError: no runs, a run's cache is missing or its fingerprint changed.
        CacheError: a cache is invalid.
        MetricError: non-finite scores, or a test split without normal or anomalous samples.
    """
    alpha = check_alpha(alpha)
    dev = resolve_device(device)
    runs = list_runs(runs_dir) if only is None else [Path(run) for run in only]
    if not runs:
        raise RunError(f"no fitted runs under {runs_dir}; run 'fit' first")
    by_cache: dict[str, list[Path]] = {}
    for run in runs:
        by_cache.setdefault(read_run_record(run)["cache"], []).append(run)
    rows: list[dict] = []
    by_anomaly: list[dict] = []
    pending_writes: list[tuple] = []
    for cache_path, cache_runs in by_cache.items():
        if not Path(cache_path).exists():
            raise RunError(f"the cache of run {cache_runs[0].name} is missing: {cache_path}")
        with FeatureCache(cache_path) as fc:
            fingerprint = fc.fingerprint()
            loaded = []
            for run in cache_runs:
                record = read_run_record(run)
                scorer = load_scorer(run, dev)
                if record["cache_fingerprint"] != fingerprint:
                    raise RunError(f"the cache {cache_path} changed since run {run.name} was fitted "
                                   f"(fingerprint {fingerprint[:12]} != {record['cache_fingerprint'][:12]}); "
                                   "fit again")
                loaded.append((run, scorer, record, read_calibration(run, record)))
            test = fc.split("test")
            if test.num_rows == 0:
                raise RunError(f"the test split of {cache_path} is empty: nothing to score")
            scores = {run: {key: [] for key in score_names(record)} for run, _, record, _ in loaded}
            start = time.perf_counter()
            for _, cls_np, patches_np in test.iter_blocks(block_rows):
                for run, scorer, record, _ in loaded:  # each run with its own feature transform
                    block = scorer.scores(cls_np, patches_np, batch_size)
                    for key in score_names(record):
                        scores[run][key].append(block[key])
            elapsed = time.perf_counter() - start
            labels = test.labels
            sample_ids = test.sample_ids
            class_names = fc.class_names
            for run, _, record, calibration in loaded:
                per_run = {key: np.concatenate(parts) for key, parts in scores[run].items()}
                normal_rows = labels == record["normal_class"]
                is_anomaly = (~normal_rows).astype(np.int64)
                anomaly_classes = np.unique(labels[~normal_rows]).tolist()
                columns = dict(per_run)
                decisions = {}
                if calibration is not None:
                    p_values = {key: conformal_p_values(calibration[key], per_run[key]) for key in per_run}
                    columns["p_value"] = p_values[primary_score(record)]
                    columns["anomalous"] = (columns["p_value"] <= alpha).astype(np.int64)
                    decisions = {key: _decision_rates(p <= alpha, normal_rows, alpha, len(calibration[key]))
                                 for key, p in p_values.items()}
                    primary = primary_score(record)
                    log(_calibration_line(run.name, primary, decisions[primary], alpha, len(calibration[primary]),
                                          int(normal_rows.sum()), int((~normal_rows).sum())))
                pending_writes.append((run / "scores.csv", sample_ids, labels, is_anomaly, columns))
                for key in score_names(record):
                    try:
                        metrics = _metrics(is_anomaly, per_run[key])
                    except MetricError as err:
                        raise MetricError(f"run {run.name}, score {key}: {err}") from None
                    head = {"dataset": record["dataset"], "backbone": record["backbone"],
                            "normal_class": record["normal_class"], "normal_name": record["normal_name"],
                            "method": record["method"], "setting": record.get("setting", ""), "score": key,
                            "seed": record["seed"], "n_normal": int(normal_rows.sum()), "run": run.name,
                            "cache": cache_path}
                    rows.append({**head, **metrics, "n_anomalous": int(is_anomaly.sum()), **decisions.get(key, {})})
                    for c in anomaly_classes:  # one anomalous class at a time
                        subset = normal_rows | (labels == c)
                        by_anomaly.append({**head, "anomaly_class": c, "anomaly_name": class_names[c],
                                           **_metrics(is_anomaly[subset], per_run[key][subset]),
                                           "n_anomalous": int((labels == c).sum())})
            log(f"scored {test.num_rows} test rows of {Path(cache_path).name} with {len(loaded)} run(s) "
                f"in {elapsed:.1f} s")
    # every AUROC is computed, and every destination checked, before anything is written: an error leaves the
    # earlier outputs as they were
    tables = [Path(runs_dir) / "auroc_by_anomaly.csv", Path(runs_dir) / "auroc.csv"] if only is None else []
    outputs = [args[0] for args in pending_writes] + tables
    for path in outputs:
        if os.path.lexists(path) and not path.is_file():
            raise RunError(f"cannot write {path}: it exists and is not a file; move it away")
    for args in pending_writes:
        _write_scores(*args)
    rows.sort(key=lambda r: (r["dataset"], r["backbone"], r["method"], r["setting"], r["normal_class"], r["seed"],
                             r["score"]))
    by_anomaly.sort(key=lambda r: (r["dataset"], r["backbone"], r["method"], r["setting"], r["normal_class"],
                                   r["seed"], r["score"], r["anomaly_class"]))
    if tables:
        write_csv(tables[0], BY_ANOMALY_COLUMNS, by_anomaly)
        write_csv(tables[1], AUROC_COLUMNS, rows)
    return rows


def _metrics(is_anomaly: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """auroc, aupr and fpr95 of scores (N,) against 0/1 labels (N,) (anomalous positive;
    :mod:`flow.experiments.metrics`)."""
    return {name: fn(is_anomaly, scores) for name, fn in (("auroc", auroc), ("aupr", aupr), ("fpr95", fpr_at_tpr))}


def _calibration_line(name: str, score: str, rates: dict, alpha: float, n_cal: int, n_normal: int,
                      n_anomalous: int) -> str:
    """What ``score`` prints for a calibrated run: the realised false-alarm rate against its expected band."""
    flagged = round(rates["false_alarm_rate"] * n_normal)
    if smallest_p_value(n_cal) > alpha:
        return (f"run {name}: with {n_cal} held-out normal row{'s' if n_cal != 1 else ''} no p-value can be <= alpha "
                f"{alpha} (the smallest is 1/{n_cal + 1}), so nothing is flagged; hold out more rows")
    return (f"run {name} ({score}): false-alarm rate {rates['false_alarm_rate']:.4f} at alpha {alpha} ({flagged} of "
            f"{n_normal} normal test images flagged; at most alpha expected when they are exchangeable with the "
            f"{n_cal} held-out normal rows, 95 % beta-binomial band up to "
            f"{false_alarm_band(n_normal, alpha, num_calibration=n_cal):.4f}, binomial "
            f"{false_alarm_band(n_normal, alpha):.4f}); detection rate {rates['detection_rate']:.4f} "
            f"({round(rates['detection_rate'] * n_anomalous)} of {n_anomalous} anomalous)")


def _decision_rates(flagged: np.ndarray, normal_rows: np.ndarray, alpha: float, n_calibration: int) -> dict:
    """The calibration columns of an AUROC row: the share of normal test images flagged (false alarms) and of
    anomalous ones (detections), at ``alpha`` with ``n_calibration`` held-out rows."""
    return {"alpha": alpha, "n_calibration": n_calibration,
            "false_alarm_rate": float(flagged[normal_rows].mean()) if normal_rows.any() else float("nan"),
            "detection_rate": float(flagged[~normal_rows].mean()) if (~normal_rows).any() else float("nan")}


def _write_scores(path: Path, sample_ids: list[str], labels: np.ndarray, is_anomaly: np.ndarray,
                  scores: dict[str, np.ndarray]) -> None:
    rows = [{"sample_id": s, "label": int(label), "is_anomaly": int(a)}
            for s, label, a in zip(sample_ids, labels, is_anomaly, strict=True)]
    for key, values in scores.items():
        for row, value in zip(rows, values, strict=True):
            row[key] = int(value) if key == "anomalous" else float(value)  # written by write_csv's csv_value
    write_csv(path, ("sample_id", "label", "is_anomaly", *scores), rows)


