"""The dataset protocols through the CLI: MVTec AD (one cache per category, per-defect-type AUROC) and
CIFAR-100 (superclasses as classes, the fine class kept in the cache)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from cache import FeatureCache
from tests.integration.test_cli import SMALL, assert_input_error, assert_ok, invoke
from tests.unit.test_protocols import _write_cifar100, make_mvtec, no_md5  # noqa: F401 (fixture)

COMMON = ["--backbone", SMALL, "--random-init", "--img-size", "32", "--num-workers", "0", "--device", "cpu"]


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def mvtec_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("mvtec")
    root = make_mvtec(work / "mvtec_anomaly_detection")
    cache_dir, runs = work / "cache", work / "runs"
    results = {"extract": invoke("extract", "--dataset", "mvtec", "--category", "all", "--data-root", str(root),
                                 "--cache-dir", str(cache_dir), *COMMON)}
    caches = sorted(cache_dir.glob("*.h5"))
    results["fit"] = [invoke("fit", "--cache", str(c), "--runs-dir", str(runs), "--epochs", "1", "--hidden", "8",
                             "--device", "cpu") for c in caches]
    results["knn"] = [invoke("fit", "--cache", str(c), "--runs-dir", str(runs), "--method", "knn") for c in caches]
    results["score"] = invoke("score", "--runs-dir", str(runs), "--device", "cpu")
    return {"root": root, "cache_dir": cache_dir, "caches": caches, "runs": runs, "results": results}


def test_mvtec_all_extracts_one_cache_per_category(mvtec_run):
    assert_ok(mvtec_run["results"]["extract"])
    caches = mvtec_run["caches"]
    assert [c.name.split("__")[0] for c in caches] == ["mvtec-bottle", "mvtec-screw"]
    with FeatureCache(caches[0]) as fc:
        assert fc.attrs["dataset"] == "mvtec-bottle"
        assert fc.class_names == ["good", "broken_large", "contamination"]
        assert fc.class_counts("train") == {"good": 6, "broken_large": 0, "contamination": 0}
        assert fc.class_counts("test") == {"good": 3, "broken_large": 2, "contamination": 3}
        assert fc.fine_class_names is None and fc.split("test").fine_labels is None


def test_mvtec_fit_all_fits_the_good_class_only(mvtec_run):
    for result in mvtec_run["results"]["fit"] + mvtec_run["results"]["knn"]:
        assert_ok(result)
    runs = sorted(p.name for p in mvtec_run["runs"].iterdir() if p.is_dir())
    assert len(runs) == 4 and all("__normal0-good__" in name for name in runs)


def test_mvtec_score_reports_auroc_per_defect_type(mvtec_run):
    assert_ok(mvtec_run["results"]["score"])
    assert "auroc_by_anomaly.csv" in mvtec_run["results"]["score"].output
    overall = read_rows(mvtec_run["runs"] / "auroc.csv")
    assert len(overall) == 2 * 2 + 2 * 2  # per category: the flow's nll and z2, knn's l2 and cosine
    by_defect = read_rows(mvtec_run["runs"] / "auroc_by_anomaly.csv")
    bottle = [r for r in by_defect if r["dataset"] == "mvtec-bottle" and r["method"] == "sanf" and r["score"] == "nll"]
    assert [(r["anomaly_name"], r["n_normal"], r["n_anomalous"]) for r in bottle] == [
        ("broken_large", "3", "2"), ("contamination", "3", "3")]
    screw = [r["anomaly_name"] for r in by_defect if r["dataset"] == "mvtec-screw"]
    assert set(screw) == {"scratch_head"} and len(screw) == 4  # sanf nll, z2; knn l2, cosine
    # each defect type's AUROC is the AUROC of the normal test images against that type's images alone
    from flow.experiments.metrics import auroc

    run = mvtec_run["runs"] / bottle[0]["run"]
    scores = read_rows(run / "scores.csv")
    for row in bottle:
        keep = [s for s in scores if s["label"] in ("0", row["anomaly_class"])]
        expected = auroc(np.array([int(s["is_anomaly"]) for s in keep]), np.array([float(s["nll"]) for s in keep]))
        assert float(row["auroc"]) == pytest.approx(expected, abs=5e-7)  # auroc.csv: 6 decimals
    # the overall row pools every defect type
    total = [r for r in overall if r["dataset"] == "mvtec-bottle" and r["method"] == "sanf" and r["score"] == "nll"]
    assert total[0]["n_anomalous"] == "5"


@pytest.mark.parametrize("normal", ["contamination", "2"])
def test_mvtec_naming_a_defect_class_as_normal_is_refused(mvtec_run, tmp_path, normal):
    with FeatureCache(mvtec_run["caches"][0]) as fc:
        assert fc.attrs["normal_classes"] == ["good"] and fc.normal_classes == ["good"]
    result = invoke("fit", "--cache", str(mvtec_run["caches"][0]), "--normal", normal, "--runs-dir",
                    str(tmp_path / "r"), "--epochs", "1", "--device", "cpu")
    assert_input_error(result, "--normal 'contamination': only good can be the normal class of this cache")
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").iterdir())


def test_normal_all_refuses_a_class_without_train_rows(tmp_path):
    from conftest import gaussian_splits, write_cache

    splits = gaussian_splits(n_train=5, n_test=3)
    cls, patches, labels = splits["train"]
    keep = labels != 1  # class b has test images but no train images
    splits["train"] = (cls[keep], patches[keep], labels[keep])
    cache = write_cache(tmp_path / "c.h5", splits, ["a", "b", "c"])
    result = invoke("fit", "--cache", str(cache), "--normal", "all", "--method", "knn", "--runs-dir",
                    str(tmp_path / "runs"))
    assert_input_error(result, "--normal 'b': the train split has no rows of this class")
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_mvtec_all_checks_every_category_before_encoding(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    (root / "zzz" / "train" / "good").mkdir(parents=True)  # sorts last; has no test/
    Image = __import__("PIL.Image", fromlist=["Image"])
    Image.new("RGB", (8, 8)).save(root / "zzz" / "train" / "good" / "0.png")
    result = invoke("extract", "--dataset", "mvtec", "--category", "all", "--data-root", str(root),
                    "--cache-dir", str(tmp_path / "cache"), *COMMON)
    assert_input_error(result, "zzz/test/good is missing")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_score_checks_every_destination_before_writing(mvtec_run, tmp_path):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(mvtec_run["runs"], runs)
    (runs / "auroc_by_anomaly.csv").unlink()
    (runs / "auroc.csv").unlink()
    (runs / "auroc.csv").mkdir()
    result = invoke("score", "--runs-dir", str(runs), "--device", "cpu")
    assert_input_error(result, "auroc.csv: it exists and is not a file")
    assert not (runs / "auroc_by_anomaly.csv").exists()


def test_mvtec_category_errors(mvtec_run, tmp_path):
    result = invoke("extract", "--dataset", "mvtec", "--category", "cable", "--data-root", str(mvtec_run["root"]),
                    "--cache-dir", str(tmp_path), *COMMON)
    assert_input_error(result, "--category must be one of bottle, screw or 'all'; got 'cable'")
    result = invoke("extract", "--dataset", "mvtec", "--category", "all", "--data-root", str(tmp_path),
                    "--cache-dir", str(tmp_path / "c"), *COMMON)
    assert_input_error(result, "no MVTec AD category")
    assert not list(tmp_path.glob("**/*.h5"))


def test_sweep_on_good_defect_folders(tmp_path):
    root = make_mvtec(tmp_path / "mine", {"widget": {"good": (5, 3), "dent": 2, "crack": 2}}) / "widget"
    result = invoke("sweep", "--dataset", "folder", "--layout", "good-defect", "--data-root", str(root),
                    "--cache-dir", str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "runs"),
                    "--methods", "knn,gaussian", *COMMON)
    assert_ok(result)
    summary = next((tmp_path / "runs").glob("*__summary.csv"))
    rows = read_rows(summary)
    assert [r["method"] for r in rows] == ["gaussian", "knn", "knn"]
    assert list(rows[0])[-2:] == ["good", "mean"]
    names = {r["anomaly_name"] for r in read_rows(tmp_path / "runs" / "auroc_by_anomaly.csv")}
    assert names == {"crack", "dent"}


def test_sweep_over_all_mvtec_categories_writes_a_summary_per_category(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    result = invoke("sweep", "--dataset", "mvtec", "--category", "all", "--data-root", str(root), "--cache-dir",
                    str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "runs"), "--methods", "knn", *COMMON)
    assert_ok(result)
    summaries = sorted(p.name.split("__")[0] for p in (tmp_path / "runs").glob("*__summary.csv"))
    assert summaries == ["mvtec-bottle", "mvtec-screw"]
    assert result.output.count("scored ") == 2  # scored once: one line per cache
    for path in (tmp_path / "runs").glob("*__summary.csv"):
        rows = read_rows(path)
        assert {r["dataset"] for r in rows} == {path.name.split("__")[0]} and len(rows) == 2  # knn: l2, cosine


def test_sweep_keeps_runs_fitted_with_the_same_settings_and_refits_on_request(tmp_path):
    root = make_mvtec(tmp_path / "mine", {"widget": {"good": (5, 3), "dent": 2}}) / "widget"
    args = ["sweep", "--dataset", "folder", "--layout", "good-defect", "--data-root", str(root), "--cache-dir",
            str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "runs"), "--methods", "sanf,knn", "--epochs", "1",
            "--hidden", "8", *COMMON]
    first = invoke(*args)
    assert_ok(first)
    flow_run = next(p for p in (tmp_path / "runs").iterdir() if "__sanf__" in p.name)
    weights = (flow_run / "model.safetensors").read_bytes()
    again = invoke(*args)
    assert_ok(again)
    assert again.output.count("kept ") == 2 and "fitted normal class" not in again.output
    assert (flow_run / "model.safetensors").read_bytes() == weights
    refused = invoke(*[a if a != "1" else "2" for a in args])  # another epoch count in the same run folder
    assert_input_error(refused, "holds a run fitted with other settings (--epochs 1, now 2); pass --overwrite")
    assert (flow_run / "model.safetensors").read_bytes() == weights
    other = invoke(*[a if a != "1" else "2" for a in args], "--overwrite")  # fitted again
    assert_ok(other)
    assert "fitted normal class 0 (good)" in other.output and other.output.count("kept ") == 1  # knn kept
    refit = invoke(*args, "--refit", "--overwrite")  # the flow's run now holds 2 epochs: replaced only so
    assert_ok(refit)
    assert "kept " not in refit.output


def test_cifar100_cache_keeps_the_fine_labels(tmp_path, no_md5):  # noqa: F811
    root = _write_cifar100(tmp_path / "c100", {"train": 1, "test": 1})
    result = invoke("extract", "--dataset", "cifar100", "--data-root", str(root), "--no-download",
                    "--cache-dir", str(tmp_path / "cache"), *COMMON)
    assert_ok(result)
    cache = next((tmp_path / "cache").glob("cifar100__*.h5"))
    with FeatureCache(cache) as fc:
        assert len(fc.class_names) == 20 and fc.class_names[0] == "aquatic_mammals"
        assert len(fc.fine_class_names) == 100 and fc.fine_class_names[0] == "apple"
        test = fc.split("test")
        assert test.fine_labels.tolist() == list(range(100))
        assert fc.class_counts("test")["people"] == 5
        assert test.labels[fc.fine_class_names.index("whale")] == 0  # whale is an aquatic mammal
    info = invoke("info", str(cache))
    assert_ok(info)
    assert "  fine labels: 100 of 100 fine classes present" in info.output
    fit = invoke("fit", "--cache", str(cache), "--normal", "people", "--method", "knn", "--runs-dir",
                 str(tmp_path / "runs"))
    assert_ok(fit)
    assert "normal class 14 (people): 5 train rows" in fit.output
