"""Summaries of scored runs: the console AUROC table, and the paper's Table 2 shape (one row per method and score,
one column per normal class, mean +- std over seeds) as CSV and as a markdown report."""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from flow.detectors.calibration import DEFAULT_ALPHA, decision_threshold, min_calibration_rows, smallest_p_value
from flow.store.run_folder import PRIMARY_SCORES, atomic_write_text, read_calibration, score_names

SUMMARY_KEYS = ("dataset", "backbone", "method", "setting", "score")


def _cell(values: Sequence[float]) -> str:
    """``"0.9123"`` for one value, ``"0.9123 ± 0.0041"`` (sample standard deviation) for several."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{float(np.mean(values)):.4f} ± {float(np.std(values, ddof=1)):.4f}"


def summarize(rows: list[dict], metric: str = "auroc") -> tuple[list[str], list[dict]]:
    """One row per (dataset, backbone, method, setting, score): a column per normal class and ``mean``.

    ``setting`` labels a sweep's non-default flow (``K2-H1024``); it is empty otherwise.

    A class cell is the mean over seeds of ``metric`` (with the sample standard deviation when there are
    several seeds). ``mean`` is, per seed, the mean over the normal classes, then mean +- std over the seeds
    that have every class; with complete seeds it equals the mean of the class cells.

    Args:
        rows: AUROC rows as returned by :func:`flow.experiments.scoring.score_runs` (keys ``AUROC_COLUMNS``).
        metric: ``auroc``, ``aupr`` or ``fpr95``.

    Returns:
        ``(columns, summary rows)``; class columns are named by the class; the values are strings.
    """
    classes = sorted({(int(r["normal_class"]), r["normal_name"]) for r in rows})
    class_columns = [name for _, name in classes]  # class names are unique in a cache
    grouped: dict[tuple, dict[tuple[int, int], float]] = defaultdict(dict)
    for r in rows:
        grouped[tuple(r.get(k, "") for k in SUMMARY_KEYS)][(int(r["normal_class"]), int(r["seed"]))] = float(r[metric])
    out = []
    for key in sorted(grouped):
        cells = grouped[key]
        seeds = sorted({s for _, s in cells})
        row = dict(zip(SUMMARY_KEYS, key, strict=True))
        row["metric"] = metric
        row["seeds"] = " ".join(str(s) for s in seeds)
        for (k, _name), column in zip(classes, class_columns, strict=True):
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
    atomic_write_text(path, buffer.getvalue())
    return path


def markdown_table(rows: list[dict], metric: str = "auroc") -> str:
    """:func:`summarize` as a markdown table (method / score as the first column)."""
    columns, summary = summarize(rows, metric)
    class_columns = columns[len(SUMMARY_KEYS) + 2:]
    lines = ["| method / score | " + " | ".join(class_columns) + " |",
             "|---|" + "---|" * len(class_columns)]
    for row in summary:
        method = f"{row['method']} [{row['setting']}]" if row["setting"] else row["method"]
        lines.append(f"| {method} / {row['score']} | " + " | ".join(row[c] for c in class_columns) + " |")
    return "\n".join(lines)


#: The key of a record (in memory only, never in ``run.json``) saying that its run was kept, not fitted again.
KEPT = "kept"


@dataclass
class FitTime:
    """The fit wall time of one method's runs: the sum of their recorded ``wall_time_s`` (training only, seconds),
    kept runs (fitted before, not fitted again) with the time recorded when they were fitted."""

    runs: int = 0
    seconds: float = 0.0
    kept_runs: int = 0
    kept_seconds: float = 0.0

    def text(self) -> str:
        """``"24.6 s"``, ``"24.6 s (12.3 s kept)"`` when some runs were kept, ``"12.3 s (kept)"`` when all were."""
        if not self.kept_runs:
            return f"{self.seconds:.1f} s"
        if self.kept_runs == self.runs:
            return f"{self.seconds:.1f} s (kept)"
        return f"{self.seconds:.1f} s ({self.kept_seconds:.1f} s kept)"


def fit_times(records: Sequence[dict]) -> dict[str, FitTime]:
    """:class:`FitTime` per method (sorted by name) of ``run.json`` records; a record holding ``KEPT: True`` is a
    kept run. The console summary of ``run`` and its report both show these, so they agree."""
    out: dict[str, FitTime] = {}
    for record in sorted(records, key=lambda r: r["method"]):
        entry = out.setdefault(record["method"], FitTime())
        seconds = float(record.get("wall_time_s", math.nan))
        entry.runs += 1
        entry.seconds += seconds
        if record.get(KEPT):
            entry.kept_runs += 1
            entry.kept_seconds += seconds
    return out


def write_report(path: Path, rows: list[dict], records: list[dict], title: str,
                 plots: Sequence[Path] = ()) -> Path:
    """A short markdown report: the AUROC summary table, AUPR and FPR at 95 % TPR means, and fit wall time
    per method (:func:`fit_times`: the sum of the runs' ``wall_time_s``, kept runs marked).

    Args:
        path: the ``.md`` file to write.
        rows: AUROC rows of :func:`flow.experiments.scoring.score_runs`.
        records: the ``run.json`` records of the scored runs; ``KEPT: True`` in those of runs kept from before.
        title: the report's heading.
        plots: PNG files to show at the end (linked relative to the report).
    """
    times = fit_times(records)
    count = {method: entry.runs for method, entry in times.items()}
    settings = []
    for method in sorted(count):
        mine = [r for r in records if r["method"] == method]
        seeds = sorted({r["seed"] for r in mine})
        settings.append(f"- {method}: {_plural(len(mine), 'run')}, seeds {' '.join(map(str, seeds))}"
                        + "".join(f", {part}" for part in _settings_of(mine)))
    counts = sorted({(int(r["normal_class"]), r["normal_name"], r["n_normal"], r["n_anomalous"]) for r in rows})
    parts = [f"# {title}", "", f"Cache: `{records[0]['cache'] if records else '?'}`. Test images per normal class: "
             + ", ".join(f"{name} {n} normal / {a} anomalous" for _, name, n, a in counts) + ".", "", *settings, "",
             "AUROC (anomalous = positive; mean ± sample std over seeds where there are several):",
             "", markdown_table(rows, "auroc"), "", "AUPR:", "", markdown_table(rows, "aupr"), "",
             "FPR at 95 % TPR (lower is better):", "", markdown_table(rows, "fpr95"), "",
             *_calibration_part(rows),
             "| method | runs | fit time (sum of the runs' training"
             + ("; kept: fitted before" if any_kept(times) else "") + ") | per run |",
             "|---|---|---|---|"]
    for method, entry in times.items():
        runs = f"{entry.runs} ({entry.kept_runs} kept)" if entry.kept_runs else str(entry.runs)
        parts.append(f"| {method} | {runs} | {entry.text()} | {entry.seconds / entry.runs:.1f} s |")
    if plots:
        parts += ["", "## Plots", ""]
        parts += [f"![{p.stem}]({p.relative_to(path.parent).as_posix()})" for p in plots]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(parts) + "\n")
    return path


def any_kept(times: dict[str, FitTime]) -> bool:
    """Whether any of :func:`fit_times`' entries counts a kept run (the fit-time wording then explains 'kept')."""
    return any(t.kept_runs for t in times.values())


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _settings_of(records: list[dict]) -> list[str]:
    """The settings of one method's runs for the report, each value or the values seen joined by ``/``: epochs
    made (their range when they differ), the flow's K and H, the feature transform, the baseline's parameters,
    the held-out fraction."""

    def values(get) -> str:
        seen = sorted({str(v) for v in map(get, records) if v not in (None, "")})
        return "/".join(seen)

    parts = []
    epochs = sorted({int(r["epochs"]) for r in records if r.get("epochs") is not None})
    if epochs:  # passes made: early stopping varies them per run
        parts.append(f"{epochs[0]} epochs" if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]} epochs")
    if any(isinstance(r.get("flow"), dict) for r in records):
        parts.append(f"K {values(lambda r: r.get('flow', {}).get('num_blocks'))}, "
                     f"H {values(lambda r: r.get('flow', {}).get('hidden'))}")
    transform = values(lambda r: r.get("feature_transform"))
    parts += [f"features {transform}"] if transform else []
    parts += [f"params {records[0]['params']}"] if records[0].get("params") else []
    held_out = values(lambda r: r.get("val_fraction") or None)
    parts += [f"val fraction {held_out} (calibrated)"] if held_out else []
    return parts


def _calibration_part(rows: list[dict]) -> list[str]:
    """The report's realised false-alarm and detection rates of the calibrated runs ([] when there are none)."""
    calibrated = [r for r in rows if r.get("false_alarm_rate") not in (None, "")]
    if not calibrated:
        return []
    alphas = sorted({float(r["alpha"]) for r in calibrated})
    sizes = sorted({int(r["n_calibration"]) for r in calibrated})
    held_out = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    blind = sorted({int(r["n_calibration"]) for r in calibrated
                    if smallest_p_value(int(r["n_calibration"])) > float(r["alpha"])})
    warning = [(f"**No image can be flagged** by the runs with {'/'.join(map(str, blind))} held-out rows: the "
                "smallest p-value with n held-out rows is 1/(n + 1), above alpha; their rates below are 0 by "
                f"construction. Hold out at least {min_calibration_rows(alphas[0])} rows (a larger --val-fraction) "
                "or raise --alpha."), ""] if blind else []
    return [(f"Calibrated runs (conformal p-values from {held_out} held-out normal rows per run; anomalous when "
             f"p <= alpha = {'/'.join(f'{a:g}' for a in alphas)}). False-alarm rate, the share of normal test "
             "images flagged (at most alpha in expectation):"), "", *warning,
            markdown_table(calibrated, "false_alarm_rate"), "",
            "Detection rate, the share of anomalous test images flagged:", "",
            markdown_table(calibrated, "detection_rate"), ""]


#: x-axis labels of the score histograms.
SCORE_UNITS = {"nll": "nll (nats)", "z2": "z2 (mean squared latent)", "l2": "mean L2 distance to 2 nearest",
               "cosine": "mean cosine distance", "mahalanobis": "squared Mahalanobis distance"}


def read_scores(path: Path) -> dict[str, np.ndarray]:
    """A run's ``scores.csv`` as arrays: ``is_anomaly`` (N,) int and one float64 (N,) array per score."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = [c for c in reader.fieldnames if c not in ("sample_id", "label", "is_anomaly")]
        rows = list(reader)
    out = {"is_anomaly": np.array([int(r["is_anomaly"]) for r in rows])}
    for column in columns:
        out[column] = np.array([float(r[column]) for r in rows])
    return out


#: Resolution of the saved PNGs (dots per inch): figure sizes in inches times this are their pixel sizes.
PLOT_DPI = 110
#: The score histograms' x range: these percentiles of the normal and anomalous scores together.
HIST_PERCENTILES = (0.5, 99.5)
#: Panels per row of the score histograms (3 x 3.6 in at PLOT_DPI: 1188 px wide, readable in a report).
HIST_COLUMNS = 3


@dataclass
class HistPanel:
    """One panel of :func:`score_histograms`: the scores (N,) of one (method, score) and their 0/1 labels (N,),
    1 = anomalous; ``threshold``: the decision threshold of a calibrated run (None otherwise) at ``alpha``."""

    label: str
    truth: np.ndarray
    values: np.ndarray
    threshold: float | None = None
    alpha: float | None = None


def score_histograms(panels: Sequence[HistPanel], title: str):
    """A matplotlib figure of score histograms: a grid of :data:`HIST_COLUMNS` panels a row (as many rows as
    needed), each with the normal and anomalous test images' scores as densities over 60 shared bins, its x range
    clipped to the :data:`HIST_PERCENTILES` of its scores (said on the axis label; scores outside are not drawn),
    and, for a calibrated run, the decision threshold at alpha as a dashed vertical line (labelled with its value,
    also when it lies outside the clipped range).

    Args:
        panels: one per (method, score); at least one.
        title: the figure's title.

    Returns:
        The figure (the caller saves and closes it).
    """
    import matplotlib.pyplot as plt

    ncols = min(HIST_COLUMNS, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.8 * nrows + 0.3), squeeze=False)
    low_q, high_q = HIST_PERCENTILES
    for ax in axes.flat[len(panels):]:
        fig.delaxes(ax)
    for ax, panel in zip(axes.flat, panels, strict=False):
        low, high = (float(v) for v in np.percentile(panel.values, [low_q, high_q]))
        if high <= low:  # constant scores: a unit-wide range around them
            low, high = low - 0.5, high + 0.5
        bins = np.linspace(low, high, 61)
        ax.hist(panel.values[panel.truth == 0], bins=bins, alpha=0.6, density=True, label="normal")
        ax.hist(panel.values[panel.truth == 1], bins=bins, alpha=0.6, density=True, label="anomalous")
        if panel.threshold is not None:
            ax.axvline(panel.threshold, color="black", linestyle="--", linewidth=1,
                       label=f"threshold (alpha {panel.alpha:g}): {panel.threshold:.4g}")
        ax.set_xlim(low, high)
        ax.set_title(panel.label, fontsize=9)
        unit = SCORE_UNITS.get(panel.label.split("/")[-1], "score")
        ax.set_xlabel(f"{unit}\n(clipped to {low_q:g}-{high_q:g}th percentile)", fontsize=8)
        ax.set_ylabel("density", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    return fig


def write_plots(folder: Path, runs: list[tuple[Path, dict]], alpha: float = DEFAULT_ALPHA) -> list[Path]:
    """PNG figures (matplotlib, Agg; :data:`PLOT_DPI`) of scored runs, one set per normal class, plus the training
    losses.

    - ``roc_normal<k>.png``: ROC curves of every (method, score) of normal class k on one axes (flows: the
      lowest seed), with the AUROC in the legend (scikit-learn's ``roc_curve``).
    - ``hist_normal<k>.png``: :func:`score_histograms` of every (method, score) of normal class k; a calibrated
      run's panels show its decision threshold at ``alpha`` (:func:`flow.detectors.calibration.decision_threshold` of
      the score's held-out normal scores).
    - ``loss.png``: train loss per epoch of every flow run (and held-out loss where recorded), nats/dim.

    Args:
        folder: where the PNGs go (created).
        runs: ``(run folder, run.json record)`` of runs that hold a ``scores.csv``.
        alpha: significance level of the calibrated runs' thresholds.

    Returns:
        The written paths.

    Raises:
        RunError: a calibrated run's ``calibration.csv`` is missing or damaged.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    by_class: dict[tuple[int, str], dict[str, tuple[Path, dict]]] = defaultdict(dict)
    for path, record in sorted(runs, key=lambda item: item[1]["seed"]):
        by_class[(record["normal_class"], record["normal_name"])].setdefault(_label(record), (path, record))
    for (k, name), methods in sorted(by_class.items()):
        panels = []
        for label, (path, record) in sorted(methods.items()):
            scores = read_scores(path / "scores.csv")
            calibration = read_calibration(path, record)
            for score in score_names(record):  # not the p_value / anomalous columns of a calibrated run
                threshold = None if calibration is None else decision_threshold(calibration[score], alpha)
                panels.append(HistPanel(f"{label}/{score}", scores["is_anomaly"], scores[score], threshold,
                                        alpha if threshold is not None else None))
        fig, ax = plt.subplots(figsize=(5, 5))
        for panel in panels:
            fpr, tpr, _ = roc_curve(panel.truth, panel.values)
            ax.plot(fpr, tpr, label=f"{panel.label} ({roc_auc_score(panel.truth, panel.values):.3f})")
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.5, linestyle=":")
        ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=f"normal class {class_label(k, name)}")
        ax.legend(fontsize=7, loc="lower right")
        written.append(_save(fig, folder / f"roc_normal{k}.png"))
        written.append(_save(score_histograms(panels, f"scores, normal class {class_label(k, name)}"),
                             folder / f"hist_normal{k}.png"))
    flows = [(path, record) for path, record in runs if record.get("epoch_losses")]
    if flows:
        fig, ax = plt.subplots(figsize=(6, 4))
        for _path, record in flows:
            epochs = np.arange(1, len(record["epoch_losses"]) + 1)
            setting = f" {record['setting']}" if record.get("setting") else ""
            line, = ax.plot(epochs, record["epoch_losses"], linewidth=0.8, marker=".",
                            label=f"{record['method']}{setting} class {record['normal_name']} seed {record['seed']}")
            if record.get("val_losses"):
                ax.plot(epochs, record["val_losses"], linewidth=0.8, linestyle="--", color=line.get_color())
        held_out = any(record.get("val_losses") for _, record in flows)
        ax.set(xlabel="epoch", ylabel="train loss (nats/dim)" + ("; dashed: held out" if held_out else ""),
               title="flow training")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=5, ncol=2)
        written.append(_save(fig, folder / "loss.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return path


__all__ = ["KEPT", "FitTime", "HistPanel", "any_kept", "auroc_table", "class_label", "fit_times", "markdown_table",
           "method_means", "read_scores", "score_histograms", "summarize", "write_plots", "write_report",
           "write_summary_csv"]


def class_label(k: int, name: str) -> str:
    """A normal class as tables and plots name it: ``3 cat``, or ``3`` alone when its name is its index (digits)."""
    return str(name) if str(name) == str(k) else f"{k} {name}"


def _label(row: dict) -> str:
    """``sanf`` or, for a sweep's non-default setting, ``sanf[K2-H1024]``."""
    return f"{row['method']}[{row['setting']}]" if row.get("setting") else row["method"]


def auroc_table(rows: list[dict]) -> str:
    """A plain-text table: one line per normal class, one column per (method, score), and the mean.

    AUROCs of several seeds of the same run settings are averaged. One table per (dataset, backbone).
    """
    out = []
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["backbone"]), []).append(row)
    for (dataset, backbone), group in groups.items():
        columns = sorted({(_label(r), r["score"]) for r in group})
        classes = sorted({(r["normal_class"], r["normal_name"]) for r in group})
        cell: dict[tuple, list[float]] = {}
        for r in group:
            cell.setdefault((r["normal_class"], _label(r), r["score"]), []).append(r["auroc"])
        names = [f"{m}/{s}" for m, s in columns]
        width = max(12, *(len(n) for n in names))
        first = max(14, *(len(class_label(k, n)) for k, n in classes))
        out.append(f"AUROC  dataset={dataset}  backbone={backbone}")
        out.append("normal class".ljust(first) + "".join(n.rjust(width + 2) for n in names))
        means = {c: [] for c in columns}
        for k, name in classes:
            line = class_label(k, name).ljust(first)
            for c in columns:
                values = cell.get((k, *c))
                if values:
                    v = float(np.mean(values))
                    means[c].append(v)
                    line += f"{v:.4f}".rjust(width + 2)
                else:
                    line += "-".rjust(width + 2)
            out.append(line)
        out.append("mean".ljust(first) + "".join(
            (f"{np.mean(means[c]):.4f}" if means[c] else "-").rjust(width + 2) for c in columns))
    return "\n".join(out)


def method_means(rows: list[dict]) -> str:
    """One line comparing the methods on the same features: the mean AUROC over normal classes of each method's
    primary score (:data:`flow.store.run_folder.PRIMARY_SCORES`) (seeds averaged first), e.g. ``mean AUROC on the same
    features: sanf nll 0.8123, knn cosine 0.9011, gaussian mahalanobis 0.9102``."""
    per: dict[tuple[int, str], dict[int, list[float]]] = {}  # (method order, label) -> class -> AUROCs
    for r in rows:
        if PRIMARY_SCORES.get(r["method"]) == r["score"]:
            key = (list(PRIMARY_SCORES).index(r["method"]), f"{_label(r)} {r['score']}")
            per.setdefault(key, {}).setdefault(r["normal_class"], []).append(r["auroc"])
    parts = [f"{name} {np.mean([np.mean(v) for v in by_class.values()]):.4f}"
             for (_, name), by_class in sorted(per.items())]
    return "mean AUROC over the normal classes, same features: " + ", ".join(parts)
