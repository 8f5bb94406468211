"""fit/score on a cache: runs, AUROC rows and table, metrics on hand-made scores, argument resolution."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from flow.experiments.config import FitConfig
from flow.experiments.fitting import find_cache, fit_cache, resolve_normal, split_holdout
from flow.experiments.metrics import MetricError, auroc
from flow.experiments.report import auroc_table
from flow.experiments.scoring import AUROC_COLUMNS, score_runs
from flow.model.train import TrainConfig
from flow.store.run_folder import RunError, list_runs, load_run, remove_run

from conftest import gaussian_splits, write_cache

SMALL_FLOW = {"blocks": 2, "hidden": 16, "heads": 2}
FAST = {"epochs": 20, "batch_size": 16, "lr": 3e-3}


def quiet(_msg):
    pass


def test_auroc_exact_values_on_hand_made_scores():
    labels = np.array([0, 0, 0, 1, 1])
    assert auroc(labels, np.array([0.1, 0.2, 0.3, 0.8, 0.9])) == 1.0
    assert auroc(labels, np.array([0.9, 0.8, 0.7, 0.2, 0.1])) == 0.0  # reversed: reported, never flipped
    assert auroc(labels, np.ones(5)) == 0.5
    # one anomaly ranked below one normal: 5 of 6 pairs right
    assert auroc(labels, np.array([0.1, 0.2, 0.5, 0.4, 0.9])) == pytest.approx(5 / 6)


def test_auroc_refuses_non_finite_scores_and_a_single_class():
    with pytest.raises(MetricError, match="2 of 4 anomaly scores are NaN or infinite"):
        auroc(np.array([0, 0, 1, 1]), np.array([0.1, np.nan, np.inf, 0.3]))
    with pytest.raises(MetricError, match="0 normal and 3 anomalous"):
        auroc(np.ones(3), np.array([0.1, 0.2, 0.3]))


def test_resolve_normal():
    names = ["cat", "dog", "T-shirt/top"]
    assert resolve_normal("all", names) == [0, 1, 2]
    assert resolve_normal("1", names) == [1]
    assert resolve_normal(2, names) == [2]
    assert resolve_normal("T-shirt/top", names) == [2]
    with pytest.raises(ValueError, match=r"an index 0\.\.2 or one of cat, dog, T-shirt/top; got '3'"):
        resolve_normal("3", names)
    assert resolve_normal("1", ["1", "2", "all"]) == [0]  # a class name wins over an index
    assert resolve_normal("all", ["1", "2", "all"]) == [2]
    with pytest.raises(ValueError, match=r"one of cat, dog, T-shirt/top; got 'cow'"):
        resolve_normal("cow", names)


def test_find_cache(tmp_path):
    with pytest.raises(ValueError, match="no cache"):
        find_cache(None, tmp_path)
    (tmp_path / "a.h5").write_bytes(b"")
    assert find_cache(None, tmp_path) == tmp_path / "a.h5"
    (tmp_path / "b.h5").write_bytes(b"")
    with pytest.raises(ValueError, match="holds 2 caches.*a.h5.*b.h5"):
        find_cache(None, tmp_path)
    assert find_cache(tmp_path / "b.h5", tmp_path) == tmp_path / "b.h5"


def test_several_caches_are_listed_with_what_tells_them_apart(tmp_path):
    """Only the attributes that differ, read from the root attributes; an unreadable candidate is named as such."""
    import h5py

    splits, names = gaussian_splits(n_train=2, n_test=2, grid=(2, 2)), ["a", "b", "c"]
    a = write_cache(tmp_path / "a.h5", splits, names, backbone="vit_small_patch16_224", input_size=[3, 224, 224])
    b = write_cache(tmp_path / "b.h5", gaussian_splits(n_train=2, n_test=2, grid=(1, 1)), names, patch_grid=(1, 1),
                    backbone="vit_base_patch16_384", input_size=[3, 384, 384], data_source="folder /data/x",
                    dtype="float16")
    (tmp_path / "c.h5").write_bytes(b"not hdf5")
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(ValueError) as err:
        find_cache(None, tmp_path)
    message = str(err.value)
    assert "\n" not in message  # one line: the CLI prints an error's first line
    assert message == (
        f"--cache-dir {tmp_path} holds 4 caches; pass --cache with one of: "
        f"{a} (backbone vit_small_patch16_224, img size 224 px, patch grid 2x2, data source tests, dtype float32), "
        f"{b} (backbone vit_base_patch16_384, img size 384 px, patch grid 1x1, data source folder /data/x, "
        f"dtype float16), "
        f"{tmp_path / 'c.h5'} (unreadable: not a readable HDF5 file (truncated or of another kind)), "
        f"{tmp_path / 'd.h5'} (unreadable: not a sanf-ad-features cache (format attribute: 'something-else'))")


def test_caches_alike_in_every_setting_are_told_apart_by_what_else_differs(tmp_path):
    import h5py

    splits, names = gaussian_splits(n_train=2, n_test=2), ["a", "b", "c"]
    a, b = (write_cache(tmp_path / name, splits, names) for name in ("a.h5", "b.h5"))
    for path, when in ((a, "2024-01-01T00:00:00"), (b, "2024-02-01T00:00:00")):
        with h5py.File(path, "a") as f:  # two extractions of the same settings, at different times
            f.attrs["created"] = when
    with pytest.raises(ValueError, match=f"one of: {a} \\(created 2024-01-01T00:00:00\\), "
                                         f"{b} \\(created 2024-02-01T00:00:00\\)$"):
        find_cache(None, tmp_path)


def test_split_holdout_is_disjoint_and_seeded():
    fit, val = split_holdout(50, 0.2, seed=0)
    assert len(val) == 10 and len(fit) == 40
    assert sorted(fit.tolist() + val.tolist()) == list(range(50))
    assert split_holdout(50, 0.2, seed=0)[1].tolist() == val.tolist()
    assert split_holdout(50, 0.2, seed=1)[1].tolist() != val.tolist()
    assert len(split_holdout(50, 0.0, seed=0)[1]) == 0
    with pytest.raises(ValueError, match="val-fraction"):
        split_holdout(50, 1.0, seed=0)


def test_fit_and_score_separate_gaussian_classes(gaussian_cache, tmp_path):
    """Classes N(6 e_k, I): every normal class is detected with AUROC >= 0.99 by both scores."""
    runs = tmp_path / "runs"
    outcomes = fit_cache(gaussian_cache, FitConfig(normal="all", seed=0, **SMALL_FLOW, **FAST), runs_dir=runs,
                         device="cpu", progress=False, log=quiet)
    assert [o.record["normal_class"] for o in outcomes] == [0, 1, 2]
    record = outcomes[0].record
    assert record["num_train"] == 40 and record["epochs"] == 20 and len(record["epoch_losses"]) == 20
    assert record["flow"]["hidden"] == 16 and record["train"]["lr"] == 3e-3 and record["seed"] == 0
    assert (outcomes[0].path / "model.safetensors").is_file()
    rows = score_runs(runs, device="cpu", log=quiet)
    assert len(rows) == 6
    for row in rows:
        assert row["auroc"] >= 0.99, row
        assert row["n_normal"] == 20 and row["n_anomalous"] == 40
    with open(runs / "auroc.csv") as handle:
        table = list(csv.DictReader(handle))
    assert tuple(table[0]) == AUROC_COLUMNS
    assert {(r["normal_name"], r["score"]) for r in table} == {(n, s) for n in "abc" for s in ("nll", "z2")}
    with open(outcomes[1].path / "scores.csv") as handle:
        scores = list(csv.DictReader(handle))
    assert len(scores) == 60 and list(scores[0]) == ["sample_id", "label", "is_anomaly", "nll", "z2"]
    assert sum(int(r["is_anomaly"]) for r in scores) == 40
    assert all(int(r["is_anomaly"]) == (int(r["label"]) != 1) for r in scores)


def test_remove_run_removes_a_run_whole_and_refuses_a_folder_that_is_not_a_run(gaussian_cache, tmp_path):
    runs = tmp_path / "runs"
    outcomes = fit_cache(gaussian_cache, FitConfig(normal="all", method="knn"), runs_dir=runs, device="cpu",
                         progress=False, log=quiet)
    remove_run(outcomes[0].path)
    assert list_runs(runs) == [o.path for o in outcomes[1:]]
    assert sorted(p.name for p in runs.iterdir()) == sorted(o.path.name for o in outcomes[1:])  # nothing hidden left
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(RunError, match="cannot read run.json"):
        remove_run(other)
    assert (other / "keep.txt").read_text() == "mine"


def test_saved_run_reloads_to_identical_scores(gaussian_cache, tmp_path):
    import torch

    from cache import FeatureCache
    outcome = fit_cache(gaussian_cache, FitConfig(normal="b", **SMALL_FLOW, epochs=1), runs_dir=tmp_path / "runs",
                        device="cpu", progress=False, log=quiet)[0]
    model, record = load_run(outcome.path)
    assert record == json.loads((outcome.path / "run.json").read_text())
    with FeatureCache(gaussian_cache) as fc:
        cls, patches = fc.split("test").read(slice(None))
    a = model.scores(torch.from_numpy(cls), torch.from_numpy(patches))
    model2, _ = load_run(outcome.path)
    b = model2.scores(torch.from_numpy(cls), torch.from_numpy(patches))
    np.testing.assert_array_equal(a["nll"], b["nll"])


def test_same_seed_gives_identical_scores(gaussian_cache, tmp_path):
    for name in ("r1", "r2"):
        fit_cache(gaussian_cache, FitConfig(normal="0", **SMALL_FLOW, epochs=2), runs_dir=tmp_path / name, device="cpu",
                  progress=False, log=quiet)
        score_runs(tmp_path / name, device="cpu", log=quiet)
    run = next((tmp_path / "r1").glob("*/scores.csv")).parent.name
    assert (tmp_path / "r1" / run / "scores.csv").read_text() == (tmp_path / "r2" / run / "scores.csv").read_text()


def test_val_fraction_holds_out_train_rows(gaussian_cache, tmp_path):
    outcome = fit_cache(gaussian_cache, FitConfig(normal="0", **SMALL_FLOW, epochs=3, val_fraction=0.25),
                        runs_dir=tmp_path / "runs", device="cpu", progress=False, log=quiet)[0]
    assert outcome.record["num_train"] == 30 and outcome.record["num_val"] == 10
    assert len(outcome.record["val_losses"]) == 3


def test_steps_trains_exactly_that_many_optimiser_steps(gaussian_cache, tmp_path, monkeypatch):
    """--steps counts optimiser steps whatever the row count: 30 rows in batches of 8 are 4 steps an epoch, so 6
    steps are one epoch and half of the next (its loss the mean of its 2 steps); the record says what was done."""
    import torch

    calls = []
    step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: (calls.append(1), step(self, *a, **k))[1])
    config = {"steps": 6, "batch_size": 8}
    logs = []
    outcome = fit_cache(gaussian_cache, FitConfig(normal="0", **SMALL_FLOW, **config, val_fraction=0.25),
                        runs_dir=tmp_path / "runs", device="cpu", progress=False, log=logs.append)[0]
    assert len(calls) == 6
    record = outcome.record
    assert record["num_train"] == 30 and record["steps"] == 6 and record["epochs"] == 2
    assert record["train"]["steps"] == 6 and len(record["epoch_losses"]) == 2 == len(record["val_losses"])
    assert "6 steps (1.5 epochs)" in logs[-1]
    # the epoch count of a --steps run does not matter, and an epoch-counted run records what it did before
    assert (TrainConfig(steps=6, epochs=99).total_steps(30) == 6
            and TrainConfig(epochs=3, batch_size=8).total_steps(30) == 12)
    assert "steps" not in TrainConfig(epochs=3).to_dict()
    with pytest.raises(ValueError, match="--steps must be >= 1; got 0"):
        TrainConfig(steps=0)


def test_early_stop_ends_at_the_first_epoch_whose_train_loss_is_below_the_held_out_loss(gaussian_cache, tmp_path):
    config = {"epochs": 200, "batch_size": 8, "lr": 1e-3, "early_stop": True}
    logs = []
    (outcome,) = fit_cache(gaussian_cache, FitConfig(normal="0", **SMALL_FLOW, **config, val_fraction=0.25),
                           runs_dir=tmp_path / "runs", device="cpu", progress=False, log=logs.append)
    record = outcome.record
    train, held_out = record["epoch_losses"], record["val_losses"]
    assert record["stopped_early"] and 1 < record["epochs"] < 200 and len(train) == len(held_out) == record["epochs"]
    assert train[-1] < held_out[-1] and all(t >= v for t, v in zip(train[:-1], held_out[:-1], strict=True))
    assert record["steps"] == 4 * record["epochs"]  # 30 fit rows in batches of 8
    assert record["train"]["early_stop"] is True
    assert f"stopped early after {record['epochs']} epochs" in logs[-1]
    # the same fit without the rule runs all its epochs and passes through the same first ones
    (full,) = fit_cache(gaussian_cache, FitConfig(normal="0", **SMALL_FLOW, epochs=record["epochs"] + 2, batch_size=8,
                                                  lr=1e-3, val_fraction=0.25),
                        runs_dir=tmp_path / "full", device="cpu", progress=False, log=quiet)
    assert not full.record["stopped_early"] and full.record["epochs"] == record["epochs"] + 2
    np.testing.assert_allclose(full.record["epoch_losses"][:len(train)], train, rtol=1e-5)
    with pytest.raises(ValueError, match=r"--early-stop needs held-out normal rows .*--val-fraction"):
        fit_cache(gaussian_cache, FitConfig(normal="0", **SMALL_FLOW, **config), runs_dir=tmp_path / "none",
                  device="cpu", progress=False, log=quiet)
    assert not (tmp_path / "none").exists()


def test_score_refuses_a_changed_or_missing_cache(tmp_path):
    cache = write_cache(tmp_path / "c.h5", gaussian_splits(), ["a", "b", "c"])
    fit_cache(cache, FitConfig(normal="0", **SMALL_FLOW, epochs=1), runs_dir=tmp_path / "runs", device="cpu",
              progress=False, log=quiet)
    write_cache(tmp_path / "c.h5", gaussian_splits(seed=5), ["a", "b", "c"])  # re-extracted: other content
    with pytest.raises(RunError, match="changed since run"):
        score_runs(tmp_path / "runs", device="cpu", log=quiet)
    (tmp_path / "c.h5").unlink()
    with pytest.raises(RunError, match="missing"):
        score_runs(tmp_path / "runs", device="cpu", log=quiet)
    with pytest.raises(RunError, match="no fitted runs"):
        score_runs(tmp_path / "empty", device="cpu", log=quiet)


def test_fit_refuses_a_normal_class_without_train_rows(tmp_path):
    splits = gaussian_splits()
    cls, patches, labels = splits["train"]
    keep = labels != 2
    splits["train"] = (cls[keep], patches[keep], labels[keep])
    cache = write_cache(tmp_path / "c.h5", splits, ["a", "b", "c"])
    with pytest.raises(ValueError, match="'c': the train split has no rows"):
        fit_cache(cache, FitConfig(normal="c", **SMALL_FLOW, epochs=1), runs_dir=tmp_path / "runs", device="cpu",
                  progress=False, log=quiet)


def test_auroc_table_mean_is_the_mean_of_its_rows():
    rows = [dict(dataset="d", backbone="b", normal_class=k, normal_name=f"c{k}", method="sanf", score="nll",
                 auroc=v) for k, v in enumerate([0.9, 0.8, 0.6])]
    rows += [dict(dataset="d", backbone="b", normal_class=0, normal_name="c0", method="sanf", score="z2", auroc=a)
             for a in (0.5, 0.7)]  # two seeds: averaged in the cell
    text = auroc_table(rows)
    lines = text.splitlines()
    assert lines[0] == "AUROC  dataset=d  backbone=b"
    mean_line = lines[-1].split()
    assert mean_line[0] == "mean" and mean_line[1] == "0.7667" and mean_line[2] == "0.6000"
    assert lines[2].split()[-1] == "0.6000"


def test_run_names_are_single_path_components():
    from flow.store.run_folder import run_name

    assert run_name("c", "sanf", 0, "T-shirt/top", 2) == "c__sanf__normal0-T-shirt-top__seed2"
    assert run_name("c", "sanf-nocaff", 3, "cat", 0) == "c__sanf-nocaff__normal3-cat__seed0"


def test_run_files_follow_the_umask(gaussian_cache, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        outcome = fit_cache(gaussian_cache, FitConfig(normal="a", **SMALL_FLOW, epochs=1), runs_dir=tmp_path / "runs",
                            device="cpu", progress=False, log=quiet)[0]
        score_runs(tmp_path / "runs", device="cpu", log=quiet)
    finally:
        os.umask(old)
    assert stat.S_IMODE(outcome.path.stat().st_mode) == 0o755
    for path in (tmp_path / "runs" / "auroc.csv", outcome.path / "scores.csv", outcome.path / "run.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert [p.name for p in (tmp_path / "runs").iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("exchange", [True, False])
def test_replacing_a_run_leaves_no_window_and_no_leftovers(tmp_path, monkeypatch, exchange):
    import flow.store.run_folder as runs_module

    if not exchange:  # the portable path: rename the old run aside, then the new one in
        monkeypatch.setattr(runs_module, "_exchange", lambda a, b: False)
    runs = tmp_path / "runs"
    runs.mkdir()
    final = runs / "r"
    for version in ("old", "new"):
        folder = runs / f".r.{version}.tmp"
        folder.mkdir()
        (folder / "run.json").write_text(version)
        runs_module._move_into_place(folder, final)
    assert (final / "run.json").read_text() == "new"
    assert [p.name for p in runs.iterdir()] == ["r"]


def test_exchange_swaps_two_folders_atomically_on_linux(tmp_path):
    import sys

    from flow.store.run_folder import _exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not _exchange(a, b):  # not Linux, glibc < 2.28, or a filesystem without RENAME_EXCHANGE
        pytest.skip(f"renameat2(RENAME_EXCHANGE) is not available here ({sys.platform})")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"
    assert _exchange(a, tmp_path / "missing") is False


def test_aupr_and_fpr_at_95_tpr_exact_values_on_hand_made_scores():
    from flow.experiments.metrics import aupr, fpr_at_tpr

    labels = np.array([0, 0, 1, 1])
    assert aupr(labels, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert fpr_at_tpr(labels, [0.1, 0.2, 0.8, 0.9]) == 0.0
    assert fpr_at_tpr(labels, [0.9, 0.8, 0.2, 0.1]) == 1.0  # reversed: every normal image is flagged first
    # descending: 0.8 (anomalous) P=1 R=1/2; 0.4 (normal); 0.35 (anomalous) P=2/3 R=1 -> AP = 1/2 + 1/3
    assert aupr(labels, [0.1, 0.4, 0.35, 0.8]) == pytest.approx(5 / 6)
    assert fpr_at_tpr(labels, [0.1, 0.4, 0.35, 0.8]) == 0.5  # catching both anomalies flags 0.4
    assert fpr_at_tpr(labels, [0.1, 0.4, 0.35, 0.8], tpr=0.5) == 0.0
    # 20 anomalies: 95 % TPR = 19 caught; the 20th-highest anomaly sits below 3 of 10 normal scores
    labels = np.array([0] * 10 + [1] * 20)
    scores = np.concatenate([np.arange(10) / 10, np.r_[np.arange(19) + 10.0, 0.65]])
    assert fpr_at_tpr(labels, scores) == 0.0 and fpr_at_tpr(labels, scores, tpr=1.0) == 0.3
    with pytest.raises(MetricError, match="AUPR needs normal and anomalous samples"):
        aupr([1, 1], [0.1, 0.2])
    with pytest.raises(MetricError, match="1 of 2 anomaly scores are NaN or infinite; no FPR computed"):
        fpr_at_tpr([0, 1], [0.1, np.inf])
    with pytest.raises(ValueError, match=r"tpr must be in \(0, 1\], got 0"):
        fpr_at_tpr([0, 1], [0.1, 0.2], tpr=0)


def test_summary_cells_are_mean_and_sample_std_over_seeds():
    from flow.experiments.report import markdown_table, summarize

    def row(k, seed, value, method="sanf"):
        return dict(dataset="d", backbone="b", method=method, score="nll", normal_class=k, normal_name=f"c{k}",
                    seed=seed, auroc=value)

    rows = [row(0, 0, 0.90), row(0, 1, 0.80), row(1, 0, 0.70), row(1, 1, 0.50), row(0, 0, 0.6, "knn"),
            row(1, 0, 0.4, "knn")]
    columns, summary = summarize(rows)
    assert columns == ["dataset", "backbone", "method", "setting", "score", "metric", "seeds", "c0", "c1", "mean"]
    knn, sanf = summary
    assert sanf["c0"] == "0.8500 ± 0.0707" and sanf["c1"] == "0.6000 ± 0.1414"  # std with ddof = 1
    assert sanf["mean"] == "0.7250 ± 0.1061"  # per seed: 0.80 and 0.65
    assert knn["seeds"] == "0" and knn["mean"] == "0.5000"
    # a seed missing a class does not enter the mean column
    _, partial = summarize(rows[:3])
    assert partial[0]["mean"] == "0.8000" and partial[0]["c1"] == "0.7000"
    assert "| sanf / nll | 0.8500 ± 0.0707 | 0.6000 ± 0.1414 | 0.7250 ± 0.1061 |" in markdown_table(rows)


def test_csv_value_writes_a_fixed_precision_per_kind_of_column():
    from flow.store.run_folder import csv_value

    assert csv_value("auroc", 0.6418999999999999) == "0.641900" and csv_value("fpr95", 1.0) == "1.000000"
    assert csv_value("false_alarm_rate", float("nan")) == "nan"
    assert csv_value("nll", 0.1 + 0.2) == "0.3" and csv_value("p_value", 1 / 3) == "0.333333333"
    assert csv_value("nll", np.float64(123456.78901234)) == "123456.789"
    f32 = np.float32(1234.56789)
    assert np.float32(float(csv_value("z2", float(f32)))) == f32  # float32 scores read back exactly
    assert csv_value("seed", 3) == 3 and csv_value("run", "x") == "x" and csv_value("aupr", "") == ""


def _floats_written_fixed(path, metric_columns=()):
    """Every float cell of a CSV: metrics with 6 decimals, the rest at most 9 significant digits."""
    import re

    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows
    checked = 0
    for row in rows:
        for column, cell in row.items():
            if column in metric_columns:
                assert re.fullmatch(r"[01]\.\d{6}|nan", cell), (path.name, column, cell)
                checked += 1
            elif re.fullmatch(r"-?\d*\.\d+(e[-+]\d+)?", cell):
                assert f"{float(cell):.9g}" == cell, (path.name, column, cell)
                checked += 1
    assert checked


def test_every_csv_of_fit_and_score_writes_floats_with_a_fixed_precision(gaussian_cache, tmp_path):
    """auroc.csv, auroc_by_anomaly.csv, scores.csv and calibration.csv: no float printed as 0.6418999999999999;
    the rounded files still read back (score's p-values from calibration.csv, the AUROC from scores.csv)."""
    from flow.experiments.report import read_scores
    from flow.store.run_folder import read_calibration, read_run_record

    metrics = ("auroc", "aupr", "fpr95", "false_alarm_rate", "detection_rate")
    runs = tmp_path / "runs"
    for method in ("knn", "gaussian"):
        fit_cache(gaussian_cache, FitConfig(normal="0", method=method, val_fraction=0.25), runs_dir=runs, log=quiet)
    rows = score_runs(runs, device="cpu", log=quiet)
    _floats_written_fixed(runs / "auroc.csv", metrics)
    _floats_written_fixed(runs / "auroc_by_anomaly.csv", metrics)
    for run in sorted(p for p in runs.iterdir() if p.is_dir()):
        _floats_written_fixed(run / "scores.csv")
        _floats_written_fixed(run / "calibration.csv")
        assert read_calibration(run, read_run_record(run)) is not None
        scores = read_scores(run / "scores.csv")
        row = next(r for r in rows if r["run"] == run.name)
        assert auroc(scores["is_anomaly"], scores[row["score"]]) == pytest.approx(row["auroc"], abs=1e-9)


def test_a_flow_run_weighs_4_bytes_a_parameter_as_the_docs_say(gaussian_cache, tmp_path):
    """model.safetensors: float32 weights (4 bytes a parameter), 2 int64 permutations of D per block, a header; the
    disk figures of docs/usage.md for D = 1280 follow from the same count."""
    import re
    from pathlib import Path

    from flow.model.sanf import FlowConfig, parameter_count

    outcome = fit_cache(gaussian_cache, FitConfig(normal="0", **SMALL_FLOW, epochs=1), runs_dir=tmp_path / "runs",
                        device="cpu", progress=False, log=quiet)[0]
    size = (outcome.path / "model.safetensors").stat().st_size
    weights = 4 * outcome.record["num_parameters"] + 2 * SMALL_FLOW["blocks"] * 6 * 8  # D = 6
    assert weights < size < weights + 16_384
    readme = (Path(__file__).resolve().parents[2] / "docs" / "usage.md").read_text()  # the disk-space figures
    full = parameter_count(FlowConfig(dim=1280))
    assert f"{full:,} parameters x 4 bytes =\n  **{4 * full / 1e6:.1f} MB**" in readme
    narrow = parameter_count(FlowConfig(dim=1280, hidden=256))
    mlp = parameter_count(FlowConfig(dim=1280, use_caff=False))
    assert re.search(rf"`--hidden 256`: {4 * narrow / 1e6:.0f} MB; `sanf-nocaff`: {4 * mlp / 1e6:.0f} MB", readme)
