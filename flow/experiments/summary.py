"""The last step of a sweep (``pipeline.py sweep`` and ``demo``): score, then write each cache's summary, report and
plots and print the AUROC tables."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from flow.experiments.report import (
    KEPT,
    any_kept,
    auroc_table,
    fit_times,
    method_means,
    write_plots,
    write_report,
    write_summary_csv,
)
from flow.experiments.scoring import score_runs
from flow.store.run_folder import read_run_record


def summarise(caches: list[Path], fitted: dict[Path, set[str]], kept: set[str], runs_dir: str | Path,
              device: str = "auto", alpha: float = 0.05, means: bool = False,
              log: Callable[[str], None] = print) -> list[dict]:
    """Score every run under ``runs_dir`` (``auroc.csv`` stays complete), then for each cache write
    ``<cache>__summary.csv``, ``__report.md`` and ``__plots/`` of the runs fitted or kept by this sweep and print its
    AUROC table (with ``means``, each method's mean too), and the fit times.

    Args:
        caches: the sweep's caches.
        fitted: the run folder names fitted or kept, per cache (:func:`flow.experiments.sweep.fit_sweep`).
        kept: the names of those kept (fitted before).
        runs_dir: the runs folder.
        device: ``auto``, ``cpu`` or ``cuda``.
        alpha: the significance level of the calibrated runs' decisions and histogram thresholds.
        means: print each method's mean AUROC under the table.
        log: where the tables and lines go.

    Returns:
        The AUROC rows of every run under ``runs_dir`` (:func:`flow.experiments.scoring.score_runs`).
    """
    all_rows = score_runs(runs_dir=runs_dir, device=device, log=log, alpha=alpha)
    written, records = [], []
    for cache in caches:
        rows = [r for r in all_rows if r["run"] in fitted.get(cache, set())]
        scored = [(Path(runs_dir) / name, {**read_run_record(Path(runs_dir) / name), KEPT: name in kept})
                  for name in dict.fromkeys(r["run"] for r in rows)]
        records += [r for _, r in scored]
        stem = Path(runs_dir) / Path(cache).stem
        summary = write_summary_csv(stem.with_name(stem.name + "__summary.csv"), rows)
        plots = write_plots(stem.with_name(stem.name + "__plots"), scored, alpha=alpha)
        report = write_report(stem.with_name(stem.name + "__report.md"), rows, [r for _, r in scored],
                              f"{rows[0]['dataset']} / {rows[0]['backbone']}" if rows else str(cache), plots)
        log(auroc_table(rows))
        if means:
            log(method_means(rows))
        written.append(f"{summary}, {report} ({len(plots)} plots)")
    times = fit_times(records)
    log("fit wall time per method, the sum of its runs' training"
        + (" (kept: fitted before, their recorded time)" if any_kept(times) else "")
        + ": " + ", ".join(f"{m} {t.text()}" for m, t in times.items()))
    log(f"wrote {'; '.join(written)} and {Path(runs_dir) / 'auroc.csv'}")
    return all_rows


__all__ = ["summarise"]
