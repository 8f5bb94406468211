"""The command line end to end on tiny generated image folders: extract -> info -> fit -> score, and its errors.

Nothing is downloaded: the backbone is a randomly initialised timm ViT at 32 px (a 2 x 2 token grid).
"""

from __future__ import annotations

import csv
import gc
import json
import math
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from cache import FeatureCache
from extract.datasets import CIFAR10_CLASSES
from flow.experiments.scoring import AUROC_COLUMNS
from flow.store.run_folder import load_run
from pipeline import cli

from conftest import ROOT, make_image_tree

REQUIRED_AUROC_COLUMNS = ["dataset", "backbone", "normal_class", "normal_name", "method", "score", "seed", "auroc",
                          "n_normal", "n_anomalous", "run"]
SCORE_COLUMNS = ["sample_id", "label", "is_anomaly", "nll", "z2"]
BACKBONE = "vit_tiny_patch16_224"
#: timm's smallest ViT (0.4 M parameters, D = 64), for the tests that only need some extraction to happen.
SMALL = "test_vit"
TEST_IDS = [f"test/{c}/{i:03d}.png" for c in ("blue", "red") for i in range(3)]


def extract_args(data_root: Path, cache_dir: Path, *extra: str, backbone: str = BACKBONE) -> list[str]:
    return ["extract", "--dataset", "folder", "--data-root", str(data_root), "--backbone", backbone,
            "--random-init", "--img-size", "32", "--num-workers", "0", "--device", "cpu",
            "--cache-dir", str(cache_dir), *extra]


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def assert_ok(result) -> None:
    assert result.exit_code == 0, result.output


def assert_input_error(result, *fragments: str) -> str:
    """Exit code 2, no traceback, and exactly one ``Error:`` line, the last one on stderr, holding every fragment.

    (stdout may hold the status lines printed before the error; stderr may hold progress bars.)
    """
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert result.stderr.rstrip("\n").splitlines()[-1] == errors[0]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames), list(reader)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """Two classes (blue, red), 4 train / 3 test images each."""
    return make_image_tree(tmp_path_factory.mktemp("images") / "data")


@pytest.fixture(scope="module")
def pipeline_run(tree, tmp_path_factory):
    """extract -> info -> fit (both classes) -> score through CliRunner, once for the module."""
    work = tmp_path_factory.mktemp("pipeline")
    cache_dir, runs_dir = work / "cache", work / "runs"
    results = {"extract": invoke(*extract_args(tree, cache_dir))}
    caches = sorted(cache_dir.glob("*.h5"))
    results["info"] = invoke("info", str(caches[0])) if caches else None
    results["fit"] = invoke("fit", "--cache-dir", str(cache_dir), "--runs-dir", str(runs_dir), "--epochs", "2",
                            "--hidden", "16", "--device", "cpu")
    results["score"] = invoke("score", "--runs-dir", str(runs_dir), "--device", "cpu")
    return {"cache_dir": cache_dir, "runs_dir": runs_dir, "caches": caches, "results": results}


# ----------------------------------------------------------------------------------------------------------------
# the main path
# ----------------------------------------------------------------------------------------------------------------


def test_extract_writes_one_complete_cache(pipeline_run, tree):
    assert_ok(pipeline_run["results"]["extract"])
    caches = pipeline_run["caches"]
    assert len(caches) == 1
    assert caches[0].name.startswith(f"folder__{BACKBONE}__32px__g8__")
    assert list(pipeline_run["cache_dir"].iterdir()) == caches  # no .partial left behind
    output = pipeline_run["results"]["extract"].output
    assert "train 8 images, test 6 images" in output
    assert "weights random-init" in output
    with FeatureCache(caches[0]) as fc:
        assert fc.class_names == ["blue", "red"]
        assert fc.attrs["dataset"] == "folder"
        assert fc.attrs["backbone"] == BACKBONE
        assert fc.attrs["weights_source"] == "random-init"
        assert fc.attrs["input_size"] == [3, 32, 32]
        assert fc.attrs["token_grid"] == [2, 2] and fc.attrs["patch_grid"] == [2, 2]
        assert fc.attrs["feature_dim"] == 192 and fc.attrs["num_patches"] == 4
        assert fc.attrs["num_prefix_tokens"] == 1
        assert fc.attrs["semantic_vector"] == "class_token"
        assert fc.attrs["dtype"] == "float16" and fc.attrs["precision"] == "fp32"
        assert fc.split("test").sample_ids == TEST_IDS
        assert fc.split("train").sample_ids == [f"train/{c}/{i:03d}.png" for c in ("blue", "red") for i in range(4)]
        assert fc.class_counts("train") == {"blue": 4, "red": 4}
        assert fc.class_counts("test") == {"blue": 3, "red": 3}
        cls, patches = fc.split("train").read(slice(None))
        assert cls.shape == (8, 192) and patches.shape == (8, 4, 192)
        assert np.isfinite(cls).all() and np.isfinite(patches).all()
        assert not np.allclose(cls[0], cls[4])


def test_an_average_pooled_vit_stores_its_pooled_embedding(tree, tmp_path):
    """test_vit2 pools the mean of its patch tokens through fc_norm: that is the stored semantic vector, the
    attribute names it."""
    import torch

    from extract import create_backbone

    result = invoke(*extract_args(tree, tmp_path, "--dtype", "float32", backbone="test_vit2"))
    assert_ok(result)
    (path,) = tmp_path.glob("*.h5")
    with FeatureCache(path) as fc:
        assert fc.attrs["semantic_vector"] == "spatial_mean_fc_norm" and fc.attrs["format_version"] == 2
        assert fc.attrs["patch_grid"] == fc.attrs["token_grid"] == [2, 2]  # every patch token, unpooled
        cls, patches = fc.split("train").read(slice(None))
    model, _ = create_backbone("test_vit2", random_init=True, img_size=32)
    with torch.no_grad():
        expected = model.fc_norm(torch.from_numpy(patches).mean(dim=1)).numpy()
    np.testing.assert_allclose(cls, expected, rtol=1e-4, atol=1e-4)
    assert np.abs(cls - patches.mean(axis=1)).max() > 0.1  # not format 1's mean before fc_norm


def test_info_prints_attributes_shapes_and_counts(pipeline_run):
    result = pipeline_run["results"]["info"]
    assert_ok(result)
    lines = result.output.splitlines()
    assert f"backbone: {BACKBONE}" in lines
    assert 'class_names: ["blue", "red"]' in lines
    assert "dataset: folder" in lines
    assert "feature_dim: 192" in lines
    assert "format: sanf-ad-features" in lines
    assert "format_version: 2" in lines
    assert "complete: True" in lines
    assert "[train] cls (8, 192)  patches (8, 4, 192)  label (8,)" in lines
    assert "[test] cls (6, 192)  patches (6, 4, 192)  label (6,)" in lines
    assert lines[lines.index("[train] cls (8, 192)  patches (8, 4, 192)  label (8,)") + 1] == "  blue: 4, red: 4"
    assert lines[lines.index("[test] cls (6, 192)  patches (6, 4, 192)  label (6,)") + 1] == "  blue: 3, red: 3"


def _run_dirs(runs_dir: Path) -> list[Path]:
    return sorted(p for p in runs_dir.iterdir() if p.is_dir())


def test_fit_saves_a_run_per_class(pipeline_run):
    assert_ok(pipeline_run["results"]["fit"])
    cache = pipeline_run["caches"][0]
    runs = _run_dirs(pipeline_run["runs_dir"])
    assert [p.name for p in runs] == [f"{cache.stem}__sanf__normal0-blue__seed0",
                                      f"{cache.stem}__sanf__normal1-red__seed0"]
    with FeatureCache(cache) as fc:
        fingerprint = fc.fingerprint()
    for k, run in enumerate(runs):
        assert (run / "model.safetensors").is_file()
        record = json.loads((run / "run.json").read_text())
        assert record["format"] == "sanf-ad-run" and record["format_version"] == 1
        assert record["method"] == "sanf"
        assert record["dataset"] == "folder" and record["backbone"] == BACKBONE
        assert record["normal_class"] == k and record["normal_name"] == ["blue", "red"][k]
        assert record["seed"] == 0
        assert record["flow"] == {"dim": 192, "num_blocks": 4, "hidden": 16, "num_heads": 4, "alpha": 3.0,
                                  "use_caff": True}
        assert record["train"] == {"epochs": 2, "batch_size": 32, "lr": 5e-5, "betas": [0.8, 0.8], "eps": 1e-4,
                                   "weight_decay": 1e-5}
        assert record["epochs"] == 2
        assert len(record["epoch_losses"]) == 2 and all(math.isfinite(x) for x in record["epoch_losses"])
        assert record["final_train_loss"] == record["epoch_losses"][-1]
        assert record["num_train"] == 4
        assert record["cache"] == str(cache.resolve())
        assert record["cache_fingerprint"] == fingerprint
        model, loaded_record = load_run(run)
        assert loaded_record == record
        assert model.config.hidden == 16
    output = pipeline_run["results"]["fit"].output
    assert output.count("fitted normal class") == 2


def test_score_writes_auroc_and_per_run_scores(pipeline_run):
    result = pipeline_run["results"]["score"]
    assert_ok(result)
    runs_dir = pipeline_run["runs_dir"]
    assert f"wrote {runs_dir / 'auroc.csv'}" in result.output
    assert "AUROC  dataset=folder  backbone=vit_tiny_patch16_224" in result.output
    header, rows = read_csv(runs_dir / "auroc.csv")
    assert header == list(AUROC_COLUMNS)
    assert header[:len(REQUIRED_AUROC_COLUMNS)] == REQUIRED_AUROC_COLUMNS
    assert [(r["normal_class"], r["score"]) for r in rows] == [("0", "nll"), ("0", "z2"), ("1", "nll"), ("1", "z2")]
    runs = {p.name: p for p in _run_dirs(runs_dir)}
    for row in rows:
        k = int(row["normal_class"])
        assert row["dataset"] == "folder" and row["backbone"] == BACKBONE
        assert row["normal_name"] == ["blue", "red"][k]
        assert row["method"] == "sanf" and row["seed"] == "0"
        assert row["n_normal"] == "3" and row["n_anomalous"] == "3"
        assert row["run"].endswith(f"__sanf__normal{k}-{row['normal_name']}__seed0")
        assert row["cache"] == str(pipeline_run["caches"][0].resolve())
        # the AUROC is the one of the run's own scores.csv
        score_header, scores = read_csv(runs[row["run"]] / "scores.csv")
        assert score_header == SCORE_COLUMNS
        assert [s["sample_id"] for s in scores] == TEST_IDS
        assert [s["label"] for s in scores] == ["0", "0", "0", "1", "1", "1"]
        assert [int(s["is_anomaly"]) for s in scores] == [int(int(s["label"]) != k) for s in scores]
        values = np.array([float(s[row["score"]]) for s in scores])
        assert np.isfinite(values).all()
        expected = roc_auc_score([int(s["is_anomaly"]) for s in scores], values)
        assert float(row["auroc"]) == pytest.approx(expected, abs=1e-6)  # written with 6 decimals
    for run in runs.values():
        _, scores = read_csv(run / "scores.csv")
        assert all(float(s["z2"]) >= 0 for s in scores)


def test_no_caff_and_normal_by_name(pipeline_run, tmp_path):
    runs_dir = tmp_path / "runs"
    cache = pipeline_run["caches"][0]
    assert_ok(invoke("fit", "--cache", str(cache), "--normal", "red", "--no-caff", "--runs-dir", str(runs_dir),
                     "--epochs", "1", "--hidden", "8", "--seed", "3", "--device", "cpu"))
    runs = _run_dirs(runs_dir)
    assert [p.name for p in runs] == [f"{cache.stem}__sanf-nocaff__normal1-red__seed3"]
    record = json.loads((runs[0] / "run.json").read_text())
    assert record["method"] == "sanf-nocaff"
    assert record["flow"]["use_caff"] is False
    assert record["normal_class"] == 1 and record["normal_name"] == "red" and record["seed"] == 3
    assert_ok(invoke("score", "--runs-dir", str(runs_dir), "--device", "cpu"))
    _, rows = read_csv(runs_dir / "auroc.csv")
    assert [(r["method"], r["normal_class"], r["normal_name"], r["score"], r["seed"]) for r in rows] == [
        ("sanf-nocaff", "1", "red", "nll", "3"), ("sanf-nocaff", "1", "red", "z2", "3")]


def test_normal_by_index(pipeline_run, tmp_path):
    runs_dir = tmp_path / "runs"
    assert_ok(invoke("fit", "--cache", str(pipeline_run["caches"][0]), "--normal", "0", "--runs-dir",
                     str(runs_dir), "--epochs", "1", "--hidden", "8", "--device", "cpu"))
    assert [json.loads((p / "run.json").read_text())["normal_name"] for p in _run_dirs(runs_dir)] == ["blue"]


def test_end_to_end_in_a_subprocess(tree, tmp_path):
    """The real entry point, ``python pipeline.py ...``, run from the repository root."""
    cache_dir, runs_dir = tmp_path / "cache", tmp_path / "runs"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "pipeline.py", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)

    done = run(*extract_args(tree, cache_dir))
    assert done.returncode == 0, done.stderr
    done = run("fit", "--cache-dir", str(cache_dir), "--runs-dir", str(runs_dir), "--normal", "blue",
               "--epochs", "1", "--hidden", "8", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "fitted normal class 0 (blue): 4 train rows, 1 epoch," in done.stdout
    done = run("score", "--runs-dir", str(runs_dir), "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert f"wrote {runs_dir / 'auroc.csv'}" in done.stdout
    header, rows = read_csv(runs_dir / "auroc.csv")
    assert header[:len(REQUIRED_AUROC_COLUMNS)] == REQUIRED_AUROC_COLUMNS
    assert [(r["normal_name"], r["method"], r["score"]) for r in rows] == [("blue", "sanf", "nll"),
                                                                         ("blue", "sanf", "z2")]
    assert all(0.0 <= float(r["auroc"]) <= 1.0 for r in rows)
    (run_dir,) = [p for p in runs_dir.iterdir() if p.is_dir()]
    assert sorted(p.name for p in run_dir.iterdir()) == ["model.safetensors", "run.json", "scores.csv"]


# ----------------------------------------------------------------------------------------------------------------
# bad input: exit code 2 and one line
# ----------------------------------------------------------------------------------------------------------------


def test_unknown_dataset(tmp_path):
    result = invoke("extract", "--dataset", "imagenet", "--cache-dir", str(tmp_path))
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1
    assert "Invalid value for '--dataset'" in errors[0]
    assert ("'imagenet' is not one of 'cifar10', 'cifar100', 'stl10', 'mnist', 'svhn', 'fashion-mnist', "
            "'cats-vs-dogs', 'mvtec', 'digits', 'folder'") in errors[0]
    assert not tmp_path.joinpath("cache").exists() and list(tmp_path.iterdir()) == []


def test_normal_out_of_range(pipeline_run, tmp_path):
    cache = str(pipeline_run["caches"][0])
    for value in ("2", "-1"):
        result = invoke("fit", "--cache", cache, "--normal", value, "--runs-dir", str(tmp_path / "runs"))
        line = assert_input_error(result, "--normal must be 'all', an index 0..1 or one of blue, red",
                                  f"got '{value}'")
        assert result.output.splitlines() == [line]
    assert not (tmp_path / "runs").exists()


def test_unknown_class_name(pipeline_run, tmp_path):
    result = invoke("fit", "--cache", str(pipeline_run["caches"][0]), "--normal", "green", "--runs-dir",
                    str(tmp_path / "runs"))
    assert_input_error(result, "or one of blue, red; got 'green'")


def test_cache_dir_with_two_caches(pipeline_run, tmp_path):
    cache_dir = tmp_path / "caches"
    cache_dir.mkdir()
    first = cache_dir / "a.h5"
    second = cache_dir / "b.h5"
    shutil.copyfile(pipeline_run["caches"][0], first)
    shutil.copyfile(pipeline_run["caches"][0], second)
    result = invoke("fit", "--cache-dir", str(cache_dir), "--runs-dir", str(tmp_path / "runs"))
    assert_input_error(result, f"--cache-dir {cache_dir} holds 2 caches; pass --cache with one of: "
                               f"{first} (the same attributes as another), {second} (the same attributes as another)")


def test_cache_dir_without_cache(tmp_path):
    result = invoke("fit", "--cache-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs"))
    assert_input_error(result, f"no cache (*.h5) in --cache-dir {tmp_path}; run 'extract' first or pass --cache")


def test_cache_that_is_not_hdf5(tmp_path):
    bogus = tmp_path / "bogus.h5"
    bogus.write_text("definitely not HDF5\n")
    result = invoke("fit", "--cache", str(bogus), "--runs-dir", str(tmp_path / "runs"))
    assert_input_error(result, f"{bogus} is not a readable HDF5 file")
    assert_input_error(invoke("info", str(bogus)), f"{bogus} is not a readable HDF5 file")
    assert_input_error(invoke("info", str(tmp_path / "absent.h5")), "absent.h5 does not exist")


def test_score_with_empty_runs_dir(tmp_path):
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    result = invoke("score", "--runs-dir", str(runs_dir))
    assert_input_error(result, f"no fitted runs under {runs_dir}; run 'fit' first")
    assert not (runs_dir / "auroc.csv").exists()


def test_score_refuses_a_replaced_cache(tree, tmp_path):
    cache_dir, runs_dir = tmp_path / "cache", tmp_path / "runs"
    assert_ok(invoke(*extract_args(tree, cache_dir, backbone=SMALL)))
    assert_ok(invoke("fit", "--cache-dir", str(cache_dir), "--runs-dir", str(runs_dir), "--normal", "0",
                     "--epochs", "1", "--hidden", "8", "--device", "cpu"))
    (cache,) = cache_dir.glob("*.h5")
    # the same extraction again without --overwrite is refused and changes nothing
    before = cache.read_bytes()
    assert_input_error(invoke(*extract_args(tree, cache_dir, backbone=SMALL)), "exists already; pass --overwrite")
    assert cache.read_bytes() == before
    # another extraction replaces the file under the same name (a new random backbone: new features)
    assert_ok(invoke(*extract_args(tree, cache_dir, "--overwrite", backbone=SMALL)))
    assert sorted(cache_dir.iterdir()) == [cache]
    result = invoke("score", "--runs-dir", str(runs_dir), "--device", "cpu")
    assert_input_error(result, f"the cache {cache.resolve()} changed since run", "fit again")
    assert not (runs_dir / "auroc.csv").exists()
    # a deleted cache is named as well
    cache.unlink()
    assert_input_error(invoke("score", "--runs-dir", str(runs_dir)), "is missing", str(cache.resolve()))


def test_folder_data_root_missing(tmp_path):
    missing = tmp_path / "no-such-folder"
    result = invoke(*extract_args(missing, tmp_path / "cache", backbone=SMALL))
    assert_input_error(result, f"--data-root {missing} does not exist")
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


def test_folder_data_root_without_splits(tmp_path):
    root = tmp_path / "flat"
    make_image_tree(root, per_split={"train": 1})
    result = invoke(*extract_args(root, tmp_path / "cache", backbone=SMALL))
    assert_input_error(result, f"{root / 'test'} is missing")


def _reap_loader_workers(before: set) -> None:
    """End the DataLoader worker processes started since ``before`` and left behind (see the xfail below).

    torch's SIGCHLD handler would raise in this process when one of its workers dies by a signal, so it is
    set aside while they are killed and reaped.
    """
    previous = signal.getsignal(signal.SIGCHLD)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        for child in multiprocessing.active_children():
            if child.pid not in before:
                child.kill()
                child.join(10)
    finally:
        signal.signal(signal.SIGCHLD, previous)
    gc.collect()


def _extract_with_a_bad_image(tmp_path, workers: str, monkeypatch):
    """An image that goes bad after the check before encoding (or that the check lets through): met mid-extraction."""
    monkeypatch.setattr("extract.run.check_readable", lambda *args, **kwargs: None)
    root = make_image_tree(tmp_path / "data", per_split={"train": 2, "test": 1})
    bad = root / "test" / "red" / "000.png"
    bad.write_bytes(b"not a png at all")
    cache_dir = tmp_path / "cache"
    args = extract_args(root, cache_dir, backbone=SMALL)
    args[args.index("--num-workers") + 1] = workers
    return bad, cache_dir, invoke(*args)


def _children() -> set:
    return {child.pid for child in multiprocessing.active_children()}


@pytest.mark.parametrize("workers", ["0", "1"])
def test_unreadable_image_is_named(tmp_path, workers, monkeypatch):
    before = _children()
    try:
        bad, cache_dir, result = _extract_with_a_bad_image(tmp_path, workers, monkeypatch)
    finally:
        _reap_loader_workers(before)
    assert_input_error(result, f"cannot read image {bad}", "; replace it with a readable image and run the same "
                               "command again to resume, or remove it and run again with --overwrite to start over "
                               "(the image list changes)")
    # the train split (one chunk) was committed before the test image failed: kept for a resume, no .h5
    work = [p for p in cache_dir.iterdir()]
    assert len(work) == 1 and work[0].name.endswith(".h5.partial") and work[0].is_dir()
    assert "kept 1 of 2 committed chunks" in result.stdout
    assert "run the same extract command again to resume" in result.stdout
    # repair the image and run the same command: only the missing chunk is encoded
    make_image_tree(tmp_path / "fixed", per_split={"train": 2, "test": 1})
    bad.write_bytes((tmp_path / "fixed" / "test" / "red" / "000.png").read_bytes())
    args = extract_args(bad.parents[2], cache_dir, backbone=SMALL)
    resumed = invoke(*args)
    assert_ok(resumed)
    assert "1 of 2 chunks already committed" in resumed.output
    assert "encoded 2 images" in resumed.output  # the test split only
    assert [p.suffix for p in cache_dir.iterdir()] == [".h5"]


def test_failed_extraction_leaves_no_worker_processes(tmp_path, monkeypatch):
    before = _children()
    try:
        _, _, result = _extract_with_a_bad_image(tmp_path, "1", monkeypatch)
        assert result.exit_code == 2
        assert _children() - before == set()
    finally:
        _reap_loader_workers(before)


def test_cifar10_folder_with_wrong_counts(tmp_path):
    root = make_image_tree(tmp_path / "cifar", classes=CIFAR10_CLASSES, per_split={"train": 1, "test": 1}, size=8)
    result = invoke("extract", "--dataset", "cifar10", "--data-root", str(root), "--no-download", "--backbone",
                    SMALL, "--random-init", "--img-size", "32", "--num-workers", "0", "--device", "cpu",
                    "--cache-dir", str(tmp_path / "cache"))
    assert_input_error(result, "CIFAR-10 train must hold 5000 images per class",
                       "found {'airplane': 1, 'automobile': 1, 'bird': 1, 'cat': 1, 'deer': 1, 'dog': 1, "
                       "'frog': 1, 'horse': 1, 'ship': 1, 'truck': 1}")


def test_unknown_backbone(tree, tmp_path):
    args = extract_args(tree, tmp_path / "cache")
    args[args.index("--backbone") + 1] = "no_such_net"
    assert_input_error(invoke(*args), "--backbone 'no_such_net' is not a timm model name")


# ----------------------------------------------------------------------------------------------------------------
# found by trying to break the CLI
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option,value", [("--lr", "inf"), ("--weight-decay", "inf"), ("--clamp", "nan"),
                                          ("--beta1", "nan")])
def test_non_finite_hyperparameters_are_refused(pipeline_run, tmp_path, option, value):
    result = invoke("fit", "--cache-dir", str(pipeline_run["cache_dir"]), "--runs-dir", str(tmp_path / "runs"),
                    option, value)
    assert result.exit_code == 2
    assert f"Invalid value for '{option}'" in result.output and "not a finite number" in result.output
    assert not (tmp_path / "runs").exists()


def test_diverging_training_is_a_one_line_error(pipeline_run, tmp_path):
    result = invoke("fit", "--cache-dir", str(pipeline_run["cache_dir"]), "--runs-dir", str(tmp_path / "runs"),
                    "--normal", "blue", "--epochs", "3", "--hidden", "16", "--lr", "1e30", "--device", "cpu")
    assert_input_error(result, "non-finite")
    assert not (tmp_path / "runs").exists()  # nothing saved, and the --runs-dir it created removed again


def test_unwritable_runs_dir_is_refused_before_training(pipeline_run, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = invoke("fit", "--cache-dir", str(pipeline_run["cache_dir"]), "--runs-dir", str(blocker / "runs"),
                    "--epochs", "1", "--hidden", "16", "--device", "cpu")
    assert_input_error(result, f"--runs-dir {blocker / 'runs'}: cannot write there")
    assert "fitted" not in result.output


def test_a_file_in_the_place_of_a_run_folder_is_refused(pipeline_run, tmp_path):
    from flow.store.run_folder import run_name

    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / run_name(pipeline_run["caches"][0].stem, "sanf", 0, "blue", 0)).write_text("not a run")
    result = invoke("fit", "--cache-dir", str(pipeline_run["cache_dir"]), "--runs-dir", str(runs),
                    "--normal", "blue", "--epochs", "1", "--hidden", "16", "--device", "cpu")
    assert_input_error(result, "exists and is not a run folder")


@pytest.mark.parametrize("content,fragment", [("[]", "is not a sanf-ad-run v1 record"),
                                              ('{"format": "sanf-ad-run", "format_version": 1}', "lacks"),
                                              ('{"trunc', "cannot read run.json")])
def test_score_names_a_damaged_run_json(pipeline_run, tmp_path, content, fragment):
    runs = tmp_path / "runs"
    shutil.copytree(pipeline_run["runs_dir"], runs)
    victim = sorted(p for p in runs.iterdir() if p.is_dir())[0]
    (victim / "run.json").write_text(content)
    assert_input_error(invoke("score", "--runs-dir", str(runs), "--device", "cpu"), f"run {victim}", fragment)


def test_score_names_weights_that_do_not_fit_the_record(pipeline_run, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(pipeline_run["runs_dir"], runs)
    victim = sorted(p for p in runs.iterdir() if p.is_dir())[0]
    record = json.loads((victim / "run.json").read_text())
    record["flow"]["hidden"] = 32
    (victim / "run.json").write_text(json.dumps(record))
    assert_input_error(invoke("score", "--runs-dir", str(runs), "--device", "cpu"), f"run {victim}",
                       "does not fit the flow described in run.json")


def test_img_size_smaller_than_the_patch(tree, tmp_path):
    args = extract_args(tree, tmp_path / "cache")
    args[args.index("--img-size") + 1] = "8"
    assert_input_error(invoke(*args), "--img-size 8 is smaller than the patch size 16")


def test_class_names_that_look_like_indices(tmp_path):
    root = make_image_tree(tmp_path / "data", classes=("1", "2", "all"), per_split={"train": 2, "test": 1})
    assert_ok(invoke(*extract_args(root, tmp_path / "cache", backbone=SMALL)))
    result = invoke("fit", "--cache-dir", str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "runs"),
                    "--normal", "1", "--epochs", "1", "--hidden", "8", "--device", "cpu")
    assert_ok(result)
    assert "fitted normal class 0 (1)" in result.output
    result = invoke("fit", "--cache-dir", str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "runs"),
                    "--normal", "all", "--epochs", "1", "--hidden", "8", "--device", "cpu")
    assert "fitted normal class 2 (all)" in result.output and "normal class 0" not in result.output


def test_baseline_methods_fit_and_score_next_to_the_flow(tmp_path):
    """knn and gaussian through the CLI on a cache whose answer is known (shifted Gaussian classes)."""
    from conftest import gaussian_splits, write_cache

    cache = write_cache(tmp_path / "c.h5", gaussian_splits(n_train=40, n_test=20, dim=6), ["a", "b", "c"])
    runs = tmp_path / "runs"
    for method in ("knn", "gaussian", "sanf-nocaff"):
        flow = ("--epochs", "1", "--hidden", "8") if method.startswith("sanf") else ()  # the baselines train nothing
        assert_ok(invoke("fit", "--cache", str(cache), "--normal", "a", "--method", method, "--runs-dir", str(runs),
                         *flow, "--device", "cpu"))
    result = invoke("score", "--runs-dir", str(runs), "--device", "cpu")
    assert_ok(result)
    header, rows = read_csv(runs / "auroc.csv")
    assert {"aupr", "fpr95"} <= set(header)
    got = {(r["method"], r["score"]): r for r in rows}
    assert sorted(got) == [("gaussian", "mahalanobis"), ("knn", "cosine"), ("knn", "l2"), ("sanf-nocaff", "nll"),
                           ("sanf-nocaff", "z2")]
    for method, score in [("gaussian", "mahalanobis"), ("knn", "l2")]:  # classes 6 sqrt(2) apart: separable
        assert float(got[method, score]["auroc"]) >= 0.99 and float(got[method, score]["fpr95"]) <= 0.05
    knn_run = runs / got["knn", "l2"]["run"]
    assert json.loads((knn_run / "run.json").read_text())["params"] == {"k": 2}
    score_header, _ = read_csv(knn_run / "scores.csv")
    assert score_header == ["sample_id", "label", "is_anomaly", "l2", "cosine"]
    assert "knn/l2" in result.output and "gaussian/mahalanobis" in result.output
    conflict = invoke("fit", "--cache", str(cache), "--method", "knn", "--no-caff", "--runs-dir", str(runs))
    assert_input_error(conflict, "--no-caff means --method sanf-nocaff; got --method knn")


def test_a_cache_is_not_reused_once_the_images_of_its_folder_tree_changed(tmp_path):
    data = make_image_tree(tmp_path / "data")
    args = ["sweep", *extract_args(data, tmp_path / "cache", backbone=SMALL)[1:], "--methods", "knn", "--normal",
            "blue", "--runs-dir", str(tmp_path / "runs")]
    assert_ok(invoke(*args))
    (cache,) = (tmp_path / "cache").glob("*.h5")
    before = cache.read_bytes()
    blue = sorted((data / "train" / "blue").iterdir())
    shutil.copy(blue[0], data / "train" / "blue" / "added.png")  # one more train image
    refused = invoke(*args)
    assert_input_error(refused, f"the cache {cache} holds other train images than the dataset has now ({2 * len(blue)} "
                                f"in the cache, {2 * len(blue) + 1} now): run 'extract' with --overwrite")
    assert cache.read_bytes() == before


def test_sweep_fits_every_method_and_seed_and_writes_the_summary(tree, tmp_path):
    """``run``: extract once (then reuse), two seeds of the flow, the baselines once, a summary whose mean
    column is the mean of its class columns, and a report."""
    cache_dir, runs = tmp_path / "cache", tmp_path / "runs"
    extraction = extract_args(tree, cache_dir, backbone=SMALL)[1:]  # without the subcommand
    args = ["sweep", *extraction, "--methods", "sanf,knn,gaussian", "--seeds", "0,1", "--epochs", "1",
            "--runs-dir", str(runs)]
    result = invoke(*args)
    assert_ok(result)
    (cache,) = cache_dir.glob("*.h5")
    header, rows = read_csv(runs / f"{cache.stem}__summary.csv")
    assert header == ["dataset", "backbone", "method", "setting", "score", "metric", "seeds", "blue", "red",
                      "mean"]
    got = {(r["method"], r["score"]): r for r in rows}
    assert sorted(got) == [("gaussian", "mahalanobis"), ("knn", "cosine"), ("knn", "l2"), ("sanf", "nll"),
                           ("sanf", "z2")]
    assert got["sanf", "nll"]["seeds"] == "0 1" and got["knn", "l2"]["seeds"] == "0"
    assert " ± " in got["sanf", "nll"]["blue"] and " ± " not in got["knn", "l2"]["blue"]
    _, auroc_rows = read_csv(runs / "auroc.csv")
    for (method, score), row in got.items():
        per_class = [float(row[c].split(" ± ")[0]) for c in ("blue", "red")]
        assert float(row["mean"].split(" ± ")[0]) == pytest.approx(np.mean(per_class), abs=1e-4)
        raw = [float(r["auroc"]) for r in auroc_rows if (r["method"], r["score"]) == (method, score)]
        assert len(raw) == (4 if method == "sanf" else 2)  # 2 classes x seeds
        assert float(row["mean"].split(" ± ")[0]) == pytest.approx(np.mean(raw), abs=1e-4)
    report = (runs / f"{cache.stem}__report.md").read_text()
    assert report.startswith("# folder / test_vit") and "| sanf / nll |" in report and "fit time" in report
    plots = sorted(p.name for p in (runs / f"{cache.stem}__plots").iterdir())
    assert plots == ["hist_normal0.png", "hist_normal1.png", "loss.png", "roc_normal0.png", "roc_normal1.png"]
    assert all((runs / f"{cache.stem}__plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    assert f"]({cache.stem}__plots/roc_normal0.png)" in report
    assert "seeds 0 1, 1 epochs" in report and "blue 3 normal / 3 anomalous" in report
    # a second run reuses the cache, and its summary holds only what it fitted (not the earlier runs)
    again = invoke("sweep", *extraction, "--runs-dir", str(runs), "--methods", "knn", "--normal", "red")
    assert_ok(again)
    assert "using the existing cache" in again.output
    header, rows = read_csv(runs / f"{cache.stem}__summary.csv")
    assert [(r["method"], r["score"]) for r in rows] == [("knn", "cosine"), ("knn", "l2")]
    assert header[-2:] == ["red", "mean"]
    assert len(read_csv(runs / "auroc.csv")[1]) == 2 * 2 * 2 + 2 * 2 + 2  # auroc.csv still lists every run
    bad = invoke("sweep", *extraction, "--methods", "sanf,nope")
    assert bad.exit_code == 2 and "'nope' is not one of sanf, sanf-nocaff, knn, gaussian" in bad.output


def test_fit_time_is_the_same_in_the_console_and_the_report_kept_runs_marked(tree, tmp_path):
    """A run kept from before (not fitted again) counts with the time recorded when it was fitted, marked kept, in
    the console summary line as in the report."""
    cache_dir, runs = tmp_path / "cache", tmp_path / "runs"
    extraction = extract_args(tree, cache_dir, backbone=SMALL)[1:]
    args = ["sweep", *extraction, "--methods", "sanf,knn", "--hidden", "8", "--epochs", "1", "--normal", "blue",
            "--runs-dir", str(runs)]
    assert_ok(first := invoke(*args))
    records = [json.loads((p / "run.json").read_text()) for p in runs.iterdir() if (p / "run.json").is_file()]
    recorded = {r["method"]: r["wall_time_s"] for r in records}
    (cache,) = cache_dir.glob("*.h5")
    line = next(x for x in first.output.splitlines() if x.startswith("fit wall time per method"))
    for method in ("sanf", "knn"):
        assert f"{method} {recorded[method]:.1f} s" in line and "kept" not in line.split(": ", 1)[1], line
        assert f"| {method} | 1 | {recorded[method]:.1f} s |" in (runs / f"{cache.stem}__report.md").read_text()
    again = invoke(*args)
    assert_ok(again)
    line = next(x for x in again.output.splitlines() if x.startswith("fit wall time per method"))
    report = (runs / f"{cache.stem}__report.md").read_text()
    for method in ("sanf", "knn"):
        assert f"{method} {recorded[method]:.1f} s (kept)" in line, line
        assert f"| {method} | 1 (1 kept) | {recorded[method]:.1f} s (kept) |" in report, report


def test_sweep_over_blocks_gives_labelled_rows(tree, tmp_path):
    cache_dir, runs = tmp_path / "cache", tmp_path / "runs"
    extraction = extract_args(tree, cache_dir, backbone=SMALL)[1:]
    result = invoke("sweep", *extraction, "--methods", "sanf", "--blocks", "1,4", "--hidden", "8", "--epochs", "1",
                    "--normal", "blue", "--runs-dir", str(runs))
    assert_ok(result)
    (cache,) = cache_dir.glob("*.h5")
    _, rows = read_csv(runs / f"{cache.stem}__summary.csv")
    assert sorted((r["setting"], r["score"]) for r in rows) == [("K1-H8", "nll"), ("K1-H8", "z2"), ("K4-H8", "nll"),
                                                              ("K4-H8", "z2")]
    names = sorted(p.name for p in runs.iterdir() if p.is_dir() and "__plots" not in p.name)
    assert [n.split("__")[-3] for n in names] == ["sanf-K1-H8", "sanf-K4-H8"]
    assert "sanf[K1-H8]/nll" in result.output
    bad = invoke("sweep", *extraction, "--blocks", "2,0", "--runs-dir", str(runs))
    assert bad.exit_code == 2 and "'0' is not an integer in 1..256" in bad.output


def test_layer_is_recorded_and_names_its_cache(tmp_path):
    """--layer is a cache attribute and part of the name's hash; the default keeps the name caches had before the
    option existed (digits__test_vit__32px__g0__1d17e41d.h5 was written by the code without --layer)."""
    args = ["extract", "--dataset", "digits", "--backbone", "test_vit", "--random-init", "--img-size", "32",
            "--patch-grid", "0", "--num-workers", "0", "--device", "cpu", "--dtype", "float32",
            "--cache-dir", str(tmp_path)]
    assert_ok(invoke(*args))
    assert_input_error(invoke(*args, "--layer", "final"), "digits__test_vit__32px__g0__1d17e41d.h5 exists already")
    result = invoke(*args, "--layer", "block-0")
    assert_ok(result)
    assert "(layer block-0)" in result.output
    names = sorted(p.name for p in tmp_path.glob("*.h5"))
    assert len(names) == 2 and "digits__test_vit__32px__g0__1d17e41d.h5" in names
    (other,) = [n for n in names if n != "digits__test_vit__32px__g0__1d17e41d.h5"]
    with FeatureCache(tmp_path / "digits__test_vit__32px__g0__1d17e41d.h5") as final, \
            FeatureCache(tmp_path / other) as block:
        assert final.attrs["layer"] == "final" and block.attrs["layer"] == "block-0"
        assert not np.allclose(final.split("test").read(slice(0, 4))[0], block.split("test").read(slice(0, 4))[0])
    assert_input_error(invoke(*args, "--layer", "block-99"), "--layer block-99", "has block-0 .. block-")


def test_train_subset_is_recorded_and_names_its_cache(tmp_path):
    """--train-per-class N keeps N train images per class (seed 0), records both in the cache and gets its own name;
    the test split stays whole."""
    args = ["extract", "--dataset", "digits", "--backbone", "test_vit", "--random-init", "--img-size", "32",
            "--patch-grid", "0", "--num-workers", "0", "--device", "cpu", "--dtype", "float32",
            "--cache-dir", str(tmp_path), "--train-per-class", "5"]
    result = invoke(*args)
    assert_ok(result)
    assert "train: 5 images per class (seed 0)" in result.output
    (name,) = [p.name for p in tmp_path.glob("*.h5")]
    assert name != "digits__test_vit__32px__g0__1d17e41d.h5"  # the name of the cache of every train image
    with FeatureCache(tmp_path / name) as fc:
        assert fc.attrs["train_per_class"] == 5 and fc.attrs["train_subset_seed"] == 0
        assert np.bincount(fc.split("train").labels).tolist() == [5] * 10
        assert fc.split("test").num_rows == 899
    assert_input_error(invoke(*args[:-1], "0"), "--train-per-class")


def test_sweep_over_transforms_gives_labelled_rows(tree, tmp_path):
    """sweep --transform a,b: one run per transform and method, labelled rows; a kept run is kept per transform."""
    cache_dir, runs = tmp_path / "cache", tmp_path / "runs"
    extraction = extract_args(tree, cache_dir, backbone=SMALL)[1:]
    args = ["sweep", *extraction, "--methods", "knn,sanf", "--transform", "raw,standardize", "--hidden", "8",
            "--epochs", "1", "--normal", "blue", "--runs-dir", str(runs)]
    result = invoke(*args)
    assert_ok(result)
    (cache,) = cache_dir.glob("*.h5")
    _, rows = read_csv(runs / f"{cache.stem}__summary.csv")
    assert sorted((r["method"], r["setting"], r["score"]) for r in rows) == [
        ("knn", "", "cosine"), ("knn", "", "l2"), ("knn", "standardize", "cosine"), ("knn", "standardize", "l2"),
        ("sanf", "", "nll"), ("sanf", "", "z2"), ("sanf", "standardize", "nll"), ("sanf", "standardize", "z2")]
    assert "knn[standardize]/cosine" in result.output and "sanf[standardize]/nll" in result.output
    again = invoke(*args)
    assert_ok(again)
    assert again.output.count("kept ") == 4
    assert "4 runs fitted before with the same settings, not fitted again (--refit fits them again)" in again.output
    refitted = invoke(*args, "--refit")
    assert_ok(refitted)
    assert "kept " not in refitted.output and "not fitted again" not in refitted.output
    bad = invoke("sweep", *extraction, "--methods", "knn", "--transform", "raw,whiten", "--runs-dir", str(runs))
    assert bad.exit_code == 2
    assert "'whiten' is not one of auto, raw, l2, ssqrt-l2, standardize, pca-whiten" in bad.output


def test_sweep_with_val_fraction_calibrates_every_run(tree, tmp_path):
    """run --val-fraction: every run (flows and baselines) holds out normal rows and is calibrated, so scores.csv
    holds p-values and decisions at --alpha, auroc.csv the realised rates, and the report both rates and the
    settings; --early-stop without --val-fraction is refused before anything is extracted."""
    cache_dir, runs = tmp_path / "cache", tmp_path / "runs"
    extraction = extract_args(tree, cache_dir, backbone=SMALL)[1:]
    args = ["sweep", *extraction, "--methods", "sanf,knn", "--hidden", "8", "--epochs", "3", "--runs-dir", str(runs)]
    refused = invoke(*args, "--early-stop")
    assert_input_error(refused, "--early-stop needs held-out normal rows", "--val-fraction")
    assert not cache_dir.exists() or not list(cache_dir.iterdir())
    result = invoke(*args, "--val-fraction", "0.5", "--alpha", "0.5", "--early-stop")
    assert_ok(result)
    (cache,) = cache_dir.glob("*.h5")
    _, auroc_rows = read_csv(runs / "auroc.csv")
    assert len(auroc_rows) == 2 * (2 + 2)  # 2 classes x (sanf nll, z2 + knn l2, cosine)
    for row in auroc_rows:
        assert (row["alpha"], row["n_calibration"]) == ("0.5", "2")  # half of the 4 train images held out
        assert 0 <= float(row["false_alarm_rate"]) <= 1 and 0 <= float(row["detection_rate"]) <= 1
        record = json.loads((runs / row["run"] / "run.json").read_text())
        assert record["val_fraction"] == 0.5
        header, scores = read_csv(runs / row["run"] / "scores.csv")
        assert "p_value" in header and "anomalous" in header and len(scores) == 6
    report = (runs / f"{cache.stem}__report.md").read_text()
    assert "False-alarm rate" in report and "Detection rate" in report and "alpha = 0.5" in report
    assert "- knn: 2 runs, seeds 0, features " in report and "val fraction 0.5 (calibrated)" in report
    assert "K 4, H 8" in report
    again = invoke(*args, "--val-fraction", "0.5", "--alpha", "0.5", "--early-stop")
    assert_ok(again)
    assert again.output.count("kept ") == 4  # the same settings: every run kept
    refused = invoke(*args, "--normal", "blue")  # other settings in the same run folders: not replaced silently
    assert_input_error(refused, "holds a run fitted with other settings (--early-stop True, now not set); pass "
                                "--overwrite to replace it")
    uncalibrated = invoke(*args, "--normal", "blue", "--overwrite")
    assert_ok(uncalibrated)
    assert "kept " not in uncalibrated.output  # another val fraction: fitted, not taken for the calibrated runs


def test_demo_writes_the_report_and_plots_of_a_sweep(tmp_path, monkeypatch):
    """demo = a sweep's summary, report and plots on the digits, plus each method's mean (the backbone swapped for a
    small random ViT here: the demo's own EfficientNet-Lite0 extraction takes minutes)."""
    import extract.run

    real = extract.run.extract_features

    def small(*args, **kwargs):
        return real(*args, **{**kwargs, "backbone": "test_vit", "random_init": True, "img_size": 32, "patch_grid": 0})

    monkeypatch.setattr(extract.run, "extract_features", small)
    runs = tmp_path / "runs"
    result = invoke("demo", "--cache-dir", str(tmp_path / "cache"), "--runs-dir", str(runs), "--steps", "1",
                    "--device", "cpu")
    assert_ok(result)
    (cache,) = (tmp_path / "cache").glob("*.h5")
    assert "mean AUROC over the normal classes, same features: sanf nll " in result.output
    header, rows = read_csv(runs / f"{cache.stem}__summary.csv")
    assert header[-1] == "mean" and len(header) == 7 + 10 + 1  # the keys, a column per digit, the mean
    assert sorted({r["method"] for r in rows}) == ["gaussian", "knn", "sanf"]
    report = (runs / f"{cache.stem}__report.md").read_text()
    assert report.startswith("# digits / test_vit") and "| sanf / nll |" in report
    assert len(list((runs / f"{cache.stem}__plots").glob("hist_normal*.png"))) == 10


def test_the_sanf_ad_console_script_is_the_pipeline_main():
    """The installed ``sanf-ad`` command is ``pipeline.main`` (as ``python pipeline.py``), not the bare click group:
    on rank 1 of a torchrun job a command-line error is left to rank 0 to print."""
    script = Path(sys.executable).parent / "sanf-ad"
    if not script.is_file():
        pytest.skip(f"the package is not installed in this environment ({script} is absent)")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    alone = subprocess.run([str(script), "fit", "--epochs", "0"], env=env, capture_output=True, text=True, timeout=120)
    assert alone.returncode == 2 and "Usage: sanf-ad fit" in alone.stderr and "--epochs" in alone.stderr
    rank1 = subprocess.run([str(script), "fit", "--epochs", "0"], env={**env, "RANK": "1", "WORLD_SIZE": "2"},
                           capture_output=True, text=True, timeout=120)
    assert rank1.returncode == 2 and rank1.stderr == "" and rank1.stdout == ""


def test_sweep_checks_every_fit_before_the_first_and_leaves_no_empty_runs_dir(tree, tmp_path):
    """--val-fraction 0.7 holds out 3 of the 4 train images: the flow could fit on 1 row, k-NN (k = 2) cannot; run
    refuses before fitting the flow (it used to fit it, then stop at k-NN with an error not naming --val-fraction),
    and a refused fit leaves no empty --runs-dir (a new-user trial found both)."""
    cache_dir, runs = tmp_path / "cache", tmp_path / "runs"
    extraction = extract_args(tree, cache_dir, backbone=SMALL)[1:]
    result = invoke("sweep", *extraction, "--methods", "sanf,knn", "--hidden", "8", "--epochs", "1",
                    "--val-fraction", "0.7", "--runs-dir", str(runs))
    assert_input_error(result, "--method knn needs at least 2 train rows; normal class 'blue' has 4, 1 after "
                               "--val-fraction 0.7 holds out 3; lower --val-fraction")
    assert "fitted" not in result.output and not runs.exists()
    (cache,) = cache_dir.glob("*.h5")
    fit = invoke("fit", "--cache", str(cache), "--method", "gaussian", "--val-fraction", "0.7", "--runs-dir", str(runs))
    assert_input_error(fit, "--method gaussian needs at least 2 train rows")
    assert not runs.exists()
    assert_ok(invoke("fit", "--cache", str(cache), "--method", "knn", "--val-fraction", "0.5", "--runs-dir", str(runs)))
