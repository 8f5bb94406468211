"""The command line as a thin layer over the configuration and the API: option names are the fields of FitConfig,
an option is given once, old spellings still work, options a method does not use are refused, run folders are
never replaced by a fit of other settings without --overwrite nor written by two fits at once."""

from __future__ import annotations

import dataclasses

import click
import numpy as np
import pytest
from test_cli import SMALL, assert_input_error, assert_ok, extract_args, invoke

import pipeline

from conftest import gaussian_splits, make_image_tree, write_cache

FIT = ("--epochs", "1", "--hidden", "8", "--device", "cpu")


@pytest.fixture
def small_cache(tmp_path):
    return write_cache(tmp_path / "c.h5", gaussian_splits(n_train=12, n_test=6), ["a", "b", "c"])


def test_fit_options_are_the_fields_of_fit_config_with_the_same_defaults():
    from flow.experiments.config import FitConfig

    ctx = click.Context(pipeline.fit)
    params = {p.name: p for p in pipeline.fit.params}
    # options whose CLI default None stands for the field's default (told apart from an explicit value: --transform
    # against its old spelling --features, --method against --no-caff)
    implicit = {"transform": "auto", "method": "sanf"}
    for field in dataclasses.fields(FitConfig):
        assert field.name in params, f"FitConfig.{field.name} has no fit option"
        option = params[field.name]
        assert option.opts == ["--" + field.name.replace("_", "-")], option.opts
        default = option.get_default(ctx)
        assert (implicit[field.name] if default is None and field.name in implicit else default) == field.default, \
            field.name


def test_the_cli_defaults_are_the_apis():
    import flow.api
    from flow.detectors.registry import METHODS
    from flow.detectors.transforms import DEFAULT_FEATURES, FEATURE_CHOICES

    assert pipeline.DEFAULT_CACHE_DIR == flow.api.DEFAULT_CACHE_DIR == "caches"
    assert pipeline.DEFAULT_RUNS_DIR == flow.api.DEFAULT_RUNS_DIR
    assert pipeline.METHODS == list(METHODS)
    assert pipeline.FEATURES_CHOICES == list(FEATURE_CHOICES) and pipeline.DEFAULT_FEATURES == DEFAULT_FEATURES


def test_an_option_given_twice_is_refused(small_cache, tmp_path):
    result = invoke("fit", "--cache", str(small_cache), "--transform", "raw", "--transform", "l2", "--runs-dir",
                    str(tmp_path / "runs"))
    assert result.exit_code == 2 and "--transform given twice" in result.output
    assert not (tmp_path / "runs").exists()
    both = invoke("reproduce", "--out", str(tmp_path / "out"), "--keep-runs", "--no-keep-runs")
    assert both.exit_code == 2
    assert "--keep-runs and --no-keep-runs given together (one option); give one of them" in both.output
    assert not (tmp_path / "out").exists()


def test_old_spellings_work_with_a_note(small_cache, tmp_path):
    runs = tmp_path / "runs"
    fit = invoke("fit", "--cache", str(small_cache), "--normal", "a", "--features", "l2", "--no-caff", *FIT,
                 "--runs-dir", str(runs))
    assert_ok(fit)
    assert "note: --features is deprecated; use --transform" in fit.stderr
    assert "note: --no-caff is deprecated; use --method sanf-nocaff" in fit.stderr
    (run,) = [p for p in runs.iterdir() if not p.name.startswith(".")]
    assert "__sanf-nocaff-l2__normal0-a__" in run.name
    old = invoke("run", "--cache", str(small_cache), "--methods", "knn", "--normal", "a", "--runs-dir",
                 str(tmp_path / "sweep"))
    assert_ok(old)
    assert "note: 'run' is deprecated; use 'sweep'" in old.stderr
    both = invoke("fit", "--cache", str(small_cache), "--features", "l2", "--transform", "raw")
    assert_input_error(both, "--features is the old spelling of --transform; give only --transform")
    assert old.stderr.count("is deprecated") == 1  # said once, though click looks the command up twice


def test_a_value_is_not_taken_for_an_option(small_cache, tmp_path):
    """A class named like an old spelling is a value: no note, and no "given twice" for --normal's value."""
    result = invoke("fit", "--cache", str(small_cache), "--normal", "run", "--method", "knn", "--runs-dir",
                    str(tmp_path / "runs"))
    assert "deprecated" not in result.output
    assert_input_error(result, "--normal must be 'all', an index 0..2 or one of a, b, c; got 'run'")


@pytest.mark.parametrize("args, message", [
    (("fit", "--method", "knn", "--steps", "5"), "--steps sets the flows (sanf, sanf-nocaff); --method knn trains no "
                                                  "flow (got --steps 5)"),
    (("fit", "--method", "gaussian", "--early-stop", "--val-fraction", "0.5"), "--early-stop sets the flows"),
    (("fit", "--method", "sanf", "--k", "3"), "--k is the knn baseline's; --method sanf has no neighbours (got --k 3)"),
    (("sweep", "--methods", "knn,gaussian", "--early-stop", "--val-fraction", "0.5"), "--early-stop sets the flows"),
    (("sweep", "--methods", "sanf", "--k", "3"), "--k is the knn baseline's; --methods sanf has no knn"),
    (("sweep", "--methods", "knn,gaussian", "--epochs", "2"), "--epochs sets the flows (sanf, sanf-nocaff); --methods "
                                                              "knn,gaussian has none"),
    (("sweep", "--methods", "knn", "--seeds", "0,1"), "--seeds sets the flows (sanf, sanf-nocaff); --methods knn has "
                                                      "none (the baselines are fitted once, seed 0; got --seeds 0,1)"),
    (("sweep", "--methods", "knn", "--backbone", "resnet18"), "--backbone sets the extraction; with --cache nothing "
                                                              "is extracted"),
    (("sweep", "--methods", "knn", "--dataset", "digits"), "sweep needs either --dataset (what to extract) or --cache "
                                                           "(an existing cache); got both: give only one"),
])
def test_options_a_method_does_not_use_are_refused(small_cache, tmp_path, args, message):
    result = invoke(*args, "--cache", str(small_cache), "--runs-dir", str(tmp_path / "runs"))
    assert_input_error(result, message)
    assert not (tmp_path / "runs").exists()


def test_sweep_takes_an_existing_cache_and_needs_one_source(small_cache, tmp_path):
    runs = tmp_path / "runs"
    result = invoke("sweep", "--cache", str(small_cache), "--methods", "knn,gaussian", "--normal", "a", "--runs-dir",
                    str(runs))
    assert_ok(result)
    assert (runs / f"{small_cache.stem}__summary.csv").is_file() and "extract" not in result.output.lower()
    neither = invoke("sweep", "--methods", "knn", "--runs-dir", str(runs))
    assert_input_error(neither, "sweep needs either --dataset (what to extract) or --cache (an existing cache)")


def test_a_run_folder_being_written_is_locked(small_cache, tmp_path):
    from flow.store.run_folder import RunLock, run_name

    runs = tmp_path / "runs"
    with RunLock(runs / run_name(small_cache.stem, "knn", 0, "a", 0)):
        result = invoke("fit", "--cache", str(small_cache), "--normal", "a", "--method", "knn", "--runs-dir",
                        str(runs))
    assert_input_error(result, "__knn__normal0-a__seed0 is being fitted by pid ", "wait for it to finish")
    assert_ok(invoke("fit", "--cache", str(small_cache), "--normal", "a", "--method", "knn", "--runs-dir", str(runs)))
    assert not list(runs.glob(".*.lock"))  # released and removed


def test_a_run_of_other_settings_is_replaced_only_with_overwrite(small_cache, tmp_path):
    runs = tmp_path / "runs"
    args = ("fit", "--cache", str(small_cache), "--normal", "a", "--runs-dir", str(runs), "--hidden", "8",
            "--device", "cpu")
    assert_ok(invoke(*args, "--epochs", "2"))
    (run,) = [p for p in runs.iterdir() if not p.name.startswith(".")]
    before = (run / "model.safetensors").read_bytes()
    refused = invoke(*args, "--epochs", "5")
    assert_input_error(refused, f"the run folder {run} holds a run fitted with other settings (--epochs 2, now "
                                "5); pass --overwrite to replace it, or choose another --runs-dir")
    assert (run / "model.safetensors").read_bytes() == before  # the fitted model is still there
    assert_ok(invoke(*args, "--epochs", "2"))  # the same settings: fitted again, as always
    assert_ok(invoke(*args, "--epochs", "5", "--overwrite"))
    assert '"epochs": 5' in (run / "run.json").read_text()


def test_a_run_of_other_settings_for_one_class_stops_fit_and_sweep_before_their_first_fit(small_cache, tmp_path):
    runs = tmp_path / "runs"
    assert_ok(invoke("fit", "--cache", str(small_cache), "--normal", "b", "--method", "knn", "--k", "3",
                     "--runs-dir", str(runs)))
    before = sorted(p.name for p in runs.iterdir())
    refused = invoke("fit", "--cache", str(small_cache), "--normal", "all", "--method", "knn", "--runs-dir", str(runs))
    assert_input_error(refused, "__knn__normal1-b__seed0 holds a run fitted with other settings (--k 3, now 2)")
    assert sorted(p.name for p in runs.iterdir()) == before  # class a, before b, was not fitted
    refused = invoke("sweep", "--cache", str(small_cache), "--methods", "sanf,knn", "--normal", "all", "--epochs",
                     "1", "--hidden", "8", "--device", "cpu", "--runs-dir", str(runs))
    assert_input_error(refused, "__knn__normal1-b__seed0 holds a run fitted with other settings (--k 3, now 2)")
    assert sorted(p.name for p in runs.iterdir()) == before  # no flow fitted first


def test_fit_names_the_old_default_cache_folder(small_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cache").mkdir()
    small_cache.rename(tmp_path / "cache" / small_cache.name)
    result = invoke("fit", "--normal", "a", "--method", "knn")
    assert_input_error(result, "no cache (*.h5) in --cache-dir caches; run 'extract' first or pass --cache (cache/ "
                               "holds caches: the default folder before it became caches/; pass --cache-dir cache")


def test_a_run_predicts_paths_pil_images_and_arrays_alike(tmp_path):
    """The Python API's predict: the same image as a file, a PIL image and an array gives the same scores and
    decisions; an unreadable input keeps its place with its reason."""
    from PIL import Image

    from flow.api import FitConfig, fit, load

    tree = make_image_tree(tmp_path / "data", per_split={"train": 10, "test": 3})
    assert_ok(invoke(*extract_args(tree, tmp_path / "caches", backbone=SMALL)))
    (cache,) = (tmp_path / "caches").glob("*.h5")
    (run,) = fit(cache, FitConfig(normal="blue", method="knn", val_fraction=0.4), tmp_path / "runs",
                 log=lambda _: None)
    path = sorted((tree / "test" / "red").iterdir())[0]
    image = Image.open(path).convert("RGB")
    model = load(run.path)
    result = model.predict([str(path), image, np.asarray(image), str(tmp_path / "missing.png")], alpha=0.5,
                           device="cpu")
    assert result.names[:2] == [str(path), "<image 1>"] and result.errors[:3] == ["", "", ""]
    np.testing.assert_array_equal(result.score[0], result.score[1:3])
    assert result.anomalous[0] == result.anomalous[1] == result.anomalous[2]
    assert "no such file" in result.errors[3] and np.isnan(result.score[3]) and not result.anomalous[3]
    # one image alone (a path, a PIL image, an array) is one row; a stack of arrays is one row each
    for alone in (str(path), image, np.asarray(image)):
        assert len(one := model.predict(alone, alpha=0.5, device="cpu")) == 1
        np.testing.assert_array_equal(one.score, result.score[:1])
    assert len(model.predict(np.stack([np.asarray(image)] * 3), alpha=0.5, device="cpu")) == 3
    # an RGBA array is one image (not a stack of 4-pixel-wide ones), scored as its RGBA file and its RGB pixels
    rgba = np.dstack([np.asarray(image), np.full(np.asarray(image).shape[:2], 255, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    as_rgba = model.predict(rgba, alpha=0.5, device="cpu")
    assert len(as_rgba) == 1 and as_rgba.errors == [""]
    np.testing.assert_array_equal(as_rgba.score, model.predict(str(tmp_path / "rgba.png"), device="cpu").score)
    np.testing.assert_array_equal(as_rgba.score, result.score[:1])
    # a 16-bit PIL image is read as its 16-bit file is (its top 8 bits), a 32-bit one refused as its file is
    sixteen = Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257 + 100)
    sixteen.save(tmp_path / "sixteen.png")
    pair = model.predict([sixteen, str(tmp_path / "sixteen.png")], device="cpu")
    assert pair.errors == ["", ""] and pair.score[0] == pair.score[1]
    float32 = model.predict(Image.fromarray(np.zeros((8, 8), dtype=np.float32)), device="cpu")
    assert "'F' (32-bit) images have no defined 8-bit range" in float32.errors[0]
    with pytest.raises(ValueError, match="images must be a path, a PIL image, an array or a list of them; got int"):
        model.predict(3)
    with pytest.raises(ValueError, match="config must be a flow.api.FitConfig .*; got dict"):
        fit(cache, {"method": "knn"}, tmp_path / "runs")
