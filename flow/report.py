"""Summaries of scored runs: the paper's Table 2 shape (one row per method and score, one column per normal class,
mean +- std over seeds) as CSV and as a markdown report."""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

SUMMARY_KEYS = ("dataset", "backbone", "method", "score")


def _cell(values: Sequence[float]) -> str:
    """``"0.9123"`` for one value, ``"0.9123 ± 0.0041"`` (sample standard deviation) for several."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{float(np.mean(values)):.4f} ± {float(np.std(values, ddof=1)):.4f}"


def summarize(rows: list[dict], metric: str = "auroc") -> tuple[list[str], list[dict]]:
    """One row per (dataset, backbone, method, score): a column per normal class and ``mean``.

    A class cell is the mean over seeds of ``metric`` (with the sample standard deviation when there are
    several seeds). ``mean`` is, per seed, the mean over the normal classes, then mean +- std over the seeds
    that have every class; with complete seeds it equals the mean of the class cells.

    Args:
        rows: AUROC rows as returned by :func:`flow.runs.score_runs` (keys ``AUROC_COLUMNS``).
        metric: ``auroc``, ``aupr`` or ``fpr95``.

    Returns:
        ``(columns, summary rows)``; class columns are named ``<index> <name>``; the values are strings.
    """
    classes = sorted({(int(r["normal_class"]), r["normal_name"]) for r in rows})
    class_columns = [f"{k} {name}" for k, name in classes]
    grouped: dict[tuple, dict[tuple[int, int], float]] = defaultdict(dict)
    for r in rows:
        grouped[tuple(r[k] for k in SUMMARY_KEYS)][(int(r["normal_class"]), int(r["seed"]))] = float(r[metric])
    out = []
    for key in sorted(grouped):
        cells = grouped[key]
        seeds = sorted({s for _, s in cells})
        row = dict(zip(SUMMARY_KEYS, key))
        row["metric"] = metric
        row["seeds"] = " ".join(str(s) for s in seeds)
        for (k, name), column in zip(classes, class_columns):
            values = [cells[(k, s)] for s in seeds if (k, s) in cells]
            row[column] = _cell(values) if values else ""
        complete = [s for s in seeds if all((k, s) in cells for k, _ in classes)]
        row["mean"] = _cell([float(np.mean([cells[(k, s)] for k, _ in classes])) for s in complete]) \
            if complete else ""
        out.append(row)
    return [*SUMMARY_KEYS, "metric", "seeds", *class_columns, "mean"], out


def write_summary_csv(path: Path, rows: list[dict], metric: str = "auroc") -> Path:
    """Write :func:`summarize` as CSV (UTF-8)."""
    columns, summary = summarize(rows, metric)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(summary)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(buffer.getvalue(), encoding="utf-8")
    return path


def markdown_table(rows: list[dict], metric: str = "auroc") -> str:
    """:func:`summarize` as a markdown table (method / score as the first column)."""
    columns, summary = summarize(rows, metric)
    class_columns = columns[len(SUMMARY_KEYS) + 2:]
    lines = ["| method / score | " + " | ".join(class_columns) + " |",
             "|---|" + "---|" * len(class_columns)]
    for row in summary:
        lines.append(f"| {row['method']} / {row['score']} | " + " | ".join(row[c] for c in class_columns) + " |")
    return "\n".join(lines)


def write_report(path: Path, rows: list[dict], records: list[dict], title: str) -> Path:
    """A short markdown report: the AUROC summary table, AUPR and FPR at 95 % TPR means, and fit wall time
    per method (the sum of the runs' ``wall_time_s``).

    Args:
        path: the ``.md`` file to write.
        rows: AUROC rows of :func:`flow.runs.score_runs`.
        records: the ``run.json`` records of the scored runs.
        title: the report's heading.
    """
    seconds: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for record in records:
        seconds[record["method"]] += float(record.get("wall_time_s", math.nan))
        count[record["method"]] += 1
    parts = [f"# {title}", "", "AUROC (anomalous = positive; mean ± sample std over seeds where there are several):",
             "", markdown_table(rows, "auroc"), "", "AUPR:", "", markdown_table(rows, "aupr"), "",
             "FPR at 95 % TPR (lower is better):", "", markdown_table(rows, "fpr95"), "",
             "| method | runs | fit wall time (s, sum) | per run (s) |", "|---|---|---|---|"]
    for method in sorted(seconds):
        parts.append(f"| {method} | {count[method]} | {seconds[method]:.1f} | {seconds[method] / count[method]:.1f} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path


__all__ = ["markdown_table", "summarize", "write_report", "write_summary_csv"]
