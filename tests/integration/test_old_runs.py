"""Run folders written before the redesign (commit d73c3ab, flow/ as one package and its own detector arithmetic)
still score, predict and export, giving what that code gave.

``tests/data/old_runs`` holds what d73c3ab wrote (see its README.md: the commands, and how to regenerate it): a
tiny cache (test_vit, random init, 32 px, D = 64, 2 x 2 patch grid, 16 train / 8 test images per class), one run
of each method fitted on class blue with --val-fraction 0.25 (4 calibration rows) -- sanf and sanf-nocaff
(K = 2, H = 8, one epoch; sanf-nocaff on standardized features), knn (pca-whiten features), gaussian -- and that
code's outputs: auroc.csv, auroc_by_anomaly.csv and every run's scores.csv from ``score --alpha 0.5``, and every
run's predictions on seven images from ``predict --alpha 0.5``.

Nothing is downloaded: predict rebuilds the backbone as recorded, timm's test_vit with the seeded random weights
(the same weights as long as timm's test_vit and torch's initialisation do not change; the run records the timm
and torch versions that computed the features).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from test_cli import assert_ok, invoke, read_csv

DATA = Path(__file__).resolve().parents[1] / "data" / "old_runs"
ALPHA = "0.5"  # the old outputs' alpha: with 4 calibration rows no p-value is <= 0.05
RUN_NAMES = sorted(p.name for p in (DATA / "runs").iterdir() if p.is_dir())
METHODS = {"sanf": "sanf", "sanf-nocaff-standardize": "sanf-nocaff", "knn-pca-whiten": "knn", "gaussian": "gaussian"}


def method_label(run_name: str) -> str:
    """``..__<method>[-<transform>]__normal0-blue__seed0`` -> ``<method>[-<transform>]``."""
    return run_name.split("__")[-3]


RUN_IDS = [method_label(name) for name in RUN_NAMES]


@pytest.fixture(scope="module")
def old(tmp_path_factory) -> dict:
    """A copy of tests/data/old_runs whose run.json files name the copied cache.

    ``score`` finds a run's cache by the absolute path its run.json records ("cache"; the fingerprint is then
    checked against the file's content) and offers no option to point it elsewhere: the copies' "cache" entries are
    rewritten, as a user who moved their cache would do. Nothing else in the run folders is touched.
    """
    root = tmp_path_factory.mktemp("old") / "old_runs"
    shutil.copytree(DATA, root)
    (cache,) = sorted((root / "cache").glob("*.h5"))
    for run in (root / "runs").iterdir():
        path = run / "run.json"
        record = json.loads(path.read_text())
        record["cache"] = str(cache)
        path.write_text(json.dumps(record, indent=2))
    return {"root": root, "runs_dir": root / "runs", "cache": cache, "images": root / "images",
            "expected": root / "expected"}


@pytest.fixture(scope="module")
def scored(old) -> dict:
    """``score`` of the redesigned code on the copied old run folders, once for the module."""
    result = invoke("score", "--runs-dir", str(old["runs_dir"]), "--device", "cpu", "--alpha", ALPHA)
    assert_ok(result)
    return old


def _check_rows(new: list[dict], expected: list[dict], columns: list[str], keys: tuple[str, ...], what: str,
                floats: tuple[str, ...], atol: float, rtol: float, cache: str | None = None) -> None:
    """The rows of ``new`` equal those of ``expected`` (matched by ``keys``) in every column of ``expected``: the
    ``floats`` columns within ``atol`` + ``rtol``, p_value exactly (as a number), the others as written (the
    "cache" column: ``cache``)."""
    assert len(new) == len(expected), what
    by_key = {tuple(r[k] for k in keys): r for r in new}
    assert len(by_key) == len(new), what
    for old_row in expected:
        key = tuple(old_row[k] for k in keys)
        assert key in by_key, (what, key)
        row = by_key[key]
        for column in columns:
            if column == "cache" and cache is not None:
                assert row[column] == cache, (what, key)
            elif column == "p_value" and old_row[column] != "":
                assert float(row[column]) == float(old_row[column]), (what, key, row[column], old_row[column])
            elif column in floats and old_row[column] != "":
                assert float(row[column]) == pytest.approx(float(old_row[column]), rel=rtol, abs=atol), \
                    (what, key, column, row[column], old_row[column])
            else:
                assert row[column] == old_row[column], (what, key, column, row[column], old_row[column])


def test_the_old_data_holds_one_calibrated_run_of_each_method():
    """The fixture data itself: every method, each calibrated, a feature transform among them, every old output."""
    assert sorted(RUN_IDS) == sorted(METHODS)
    for name in RUN_NAMES:
        run = DATA / "runs" / name
        record = json.loads((run / "run.json").read_text())
        assert record["format"] == "sanf-ad-run" and record["format_version"] == 1
        assert record["method"] == METHODS[method_label(name)]
        assert record["calibration"]["num_rows"] == 4 and (run / "calibration.csv").is_file()
        assert (run / "model.safetensors").is_file()
        assert (run / "feature_transform.safetensors").is_file() == (record["feature_transform"] != "raw")
        for kind in ("scores", "predictions"):
            assert (DATA / "expected" / f"{name}.{kind}.csv").is_file()
    assert {json.loads((DATA / "runs" / n / "run.json").read_text())["feature_transform"] for n in RUN_NAMES} \
        == {"raw", "standardize", "pca-whiten"}
    assert sum(f.stat().st_size for f in DATA.rglob("*") if f.is_file()) < 1_000_000


def test_run_folders_written_before_the_redesign_still_score_to_the_same_aurocs(scored):
    for table in ("auroc.csv", "auroc_by_anomaly.csv"):
        old_columns, expected = read_csv(scored["expected"] / table)
        new_columns, rows = read_csv(scored["runs_dir"] / table)
        assert new_columns[:len(old_columns)] == old_columns, table
        floats = ("auroc", "aupr", "fpr95", "alpha", "false_alarm_rate", "detection_rate")
        keys = ("run", "score") + (("anomaly_class",) if table == "auroc_by_anomaly.csv" else ())
        _check_rows(rows, expected, old_columns, keys, table, floats, atol=1e-6, rtol=0, cache=str(scored["cache"]))


@pytest.mark.parametrize("name", RUN_NAMES, ids=RUN_IDS)
def test_run_folders_written_before_the_redesign_still_score_each_test_image_the_same(scored, name):
    """Per test row: the same scores (float rounding: the redesign computes in float64 where the old code
    sometimes used float32), the same p-values and decisions."""
    old_columns, expected = read_csv(scored["expected"] / f"{name}.scores.csv")
    new_columns, rows = read_csv(scored["runs_dir"] / name / "scores.csv")
    assert new_columns == old_columns
    scores = tuple(c for c in old_columns if c not in ("sample_id", "label", "is_anomaly", "p_value", "anomalous"))
    _check_rows(rows, expected, old_columns, ("sample_id",), name, scores, atol=0, rtol=1e-5)


@pytest.mark.parametrize("name", RUN_NAMES, ids=RUN_IDS)
def test_run_folders_written_before_the_redesign_still_predict_the_same(old, tmp_path, name):
    """predict on seven images (five of the test split, a grayscale and a 20 x 16 one): the same decisions and
    p-values, the scores within float rounding."""
    out = tmp_path / "predictions.csv"
    assert_ok(invoke("predict", str(old["runs_dir"] / name), str(old["images"]), "--out", str(out), "--alpha", ALPHA,
                     "--num-workers", "0", "--device", "cpu"))
    old_columns, expected = read_csv(old["expected"] / f"{name}.predictions.csv")
    new_columns, rows = read_csv(out)
    assert new_columns == old_columns
    for row in [*rows, *expected]:
        row["file"] = Path(row["path"]).name  # the old predictions name the images where they were made
    assert [r["file"] for r in rows] == [r["file"] for r in expected]
    assert all(r["error"] == "" for r in rows)
    scores = tuple(c for c in old_columns if c not in ("path", "p_value", "anomalous", "error"))
    record = json.loads((old["runs_dir"] / name / "run.json").read_text())["features"]
    note = (f"features computed with timm {record['timm_version']} / torch {record['torch_version']}, this is timm "
            f"{timm.__version__} / torch {torch.__version__}: the seeded random test_vit must be the same")
    _check_rows(rows, expected, [c for c in old_columns if c != "path"], ("file",), f"{name} ({note})", scores,
                atol=0, rtol=1e-5)


@pytest.mark.parametrize("name", RUN_NAMES, ids=RUN_IDS)
def test_run_folders_written_before_the_redesign_still_export(old, tmp_path, name):
    """export, then predict --onnx: the old decisions and p-values; the scores as onnxruntime rounds them."""
    graph, out = tmp_path / "m.onnx", tmp_path / "onnx.csv"
    assert_ok(invoke("export", str(old["runs_dir"] / name), "--out", str(graph), "--alpha", ALPHA,
                     "--check-images", str(old["images"])))
    assert_ok(invoke("predict", str(old["runs_dir"] / name), str(old["images"]), "--onnx", str(graph), "--out",
                     str(out), "--alpha", ALPHA, "--num-workers", "0", "--device", "cpu"))
    old_columns, expected = read_csv(old["expected"] / f"{name}.predictions.csv")
    new_columns, rows = read_csv(out)
    assert new_columns == old_columns
    for row in [*rows, *expected]:
        row["file"] = Path(row["path"]).name
    assert [r["file"] for r in rows] == [r["file"] for r in expected]
    scores = tuple(c for c in old_columns if c not in ("path", "p_value", "anomalous", "error"))
    _check_rows(rows, expected, [c for c in old_columns if c != "path"], ("file",), name, scores,
                atol=0, rtol=1e-4)
