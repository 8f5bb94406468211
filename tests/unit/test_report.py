"""Report figures (flow/report.py): the score histograms' layout, clipping and decision threshold, inspected through
matplotlib's objects (not pixels)."""

from __future__ import annotations

import pytest

from flow.experiments.config import FitConfig
from flow.experiments.fitting import fit_cache
from flow.experiments.scoring import score_runs
from flow.store.run_folder import list_runs, read_run_record

SMALL_FLOW = {"blocks": 2, "hidden": 8, "heads": 2}


@pytest.fixture
def figures(gaussian_cache, tmp_path, monkeypatch):
    """The figures write_plots makes for normal class 0 of a sanf run, a calibrated knn run (val_fraction 0.5: 20
    held-out rows, enough to flag at alpha 0.05) and an uncalibrated gaussian run, scored: ``{file name: figure}``
    (kept open, not saved), and ``{"runs": the runs folder}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flow.experiments import report

    runs = tmp_path / "runs"
    fit_cache(gaussian_cache, FitConfig(normal="0", **SMALL_FLOW, epochs=1), runs_dir=runs, device="cpu",
              progress=False, log=lambda _: None)
    fit_cache(gaussian_cache, FitConfig(normal="0", method="knn", val_fraction=0.5), runs_dir=runs, log=lambda _: None)
    fit_cache(gaussian_cache, FitConfig(normal="0", method="gaussian"), runs_dir=runs, log=lambda _: None)
    score_runs(runs, device="cpu", log=lambda _: None)
    made = {}

    def keep(fig, path):
        made[path.name] = fig
        return path

    monkeypatch.setattr(report, "_save", keep)
    report.write_plots(tmp_path / "plots", [(run, read_run_record(run)) for run in list_runs(runs)])
    yield made, runs
    plt.close("all")


def test_score_histograms_are_a_grid_readable_at_report_size(figures):
    fig = figures[0]["hist_normal0.png"]
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["gaussian/mahalanobis", "knn/l2", "knn/cosine", "sanf/nll", "sanf/z2"]  # scores only
    assert {ax.get_subplotspec().get_geometry()[:2] for ax in fig.axes} == {(2, 3)}  # 2 rows of 3, one left empty
    width, height = fig.get_size_inches() * 110  # saved at 110 dpi
    assert width < 1600 and height < 1000 and width / height < 2.5


def test_score_histograms_clip_the_x_range_and_say_so(figures):
    for ax in figures[0]["hist_normal0.png"].axes:
        assert ax.get_xlabel().endswith("(clipped to 0.5-99.5th percentile)"), ax.get_xlabel()
    nll = next(ax for ax in figures[0]["hist_normal0.png"].axes if ax.get_title() == "sanf/nll")
    assert nll.get_xlabel() == "nll (nats)\n(clipped to 0.5-99.5th percentile)"


def test_the_decision_threshold_is_drawn_for_a_calibrated_run_only(figures):
    from flow.detectors.calibration import decision_threshold
    from flow.store.run_folder import read_calibration

    made, runs = figures
    (knn,) = [run for run in list_runs(runs) if read_run_record(run)["method"] == "knn"]
    calibration = read_calibration(knn, read_run_record(knn))
    for ax in made["hist_normal0.png"].axes:
        lines = [line for line in ax.get_lines() if line.get_label().startswith("threshold")]
        if ax.get_title().startswith("knn/"):
            (line,) = lines
            expected = decision_threshold(calibration[ax.get_title().split("/")[1]], 0.05)
            assert line.get_xdata()[0] == pytest.approx(expected)
            assert line.get_label() == f"threshold (alpha 0.05): {expected:.4g}"
        else:
            assert not lines, ax.get_title()


def test_the_report_says_when_a_calibrated_run_cannot_flag_anything():
    """18 held-out rows at alpha 0.05 (smallest p-value 1/19): the rates are 0 by construction, and the report says so
    and how many rows would do; with 19 it does not warn. The held-out count is stated either way."""
    from flow.experiments.report import _calibration_part

    def rows(n_calibration):
        return [{"dataset": "d", "backbone": "b", "method": "knn", "setting": "", "score": "cosine",
                 "normal_class": 0, "normal_name": "a", "seed": 0, "alpha": 0.05, "n_calibration": n_calibration,
                 "false_alarm_rate": 0.0, "detection_rate": 0.0}]

    text = "\n".join(_calibration_part(rows(18)))
    assert "from 18 held-out normal rows per run" in text and "alpha = 0.05" in text
    assert "**No image can be flagged** by the runs with 18 held-out rows" in text and "at least 19 rows" in text
    text = "\n".join(_calibration_part(rows(19)))
    assert "from 19 held-out normal rows per run" in text and "No image can be flagged" not in text
    assert _calibration_part([{**rows(0)[0], "false_alarm_rate": ""}]) == []


def test_a_summary_interrupted_while_written_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    import os

    from flow.experiments import report
    from flow.store import run_folder

    rows = [{"cache": "c", "method": "knn", "score": "cosine", "setting": "", "feature_transform": "raw",
             "normal_class": 0, "normal_name": "a", "seed": 0, "auroc": 0.9}]
    path = report.write_summary_csv(tmp_path / "s.csv", rows)
    before = path.read_text()

    def killed(*args):
        raise OSError("killed")

    monkeypatch.setattr(run_folder.os, "replace", killed)
    with pytest.raises(OSError, match="killed"):
        report.write_summary_csv(path, [{**rows[0], "auroc": 0.5}])
    assert path.read_text() == before and os.listdir(tmp_path) == ["s.csv"]  # no half-written file, no leftover
