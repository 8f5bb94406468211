"""predict and export end to end on generated images: calibrated runs of every method, odd image files, the
backbone rebuilt from the run's provenance (and refused when it cannot be), the ONNX round trip, and score's
realised false-alarm rate.

Nothing is downloaded: the backbones are timm's tiny randomly initialised test models at 32 px.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cli import SMALL, assert_input_error, assert_ok, extract_args, invoke, read_csv

from flow.detectors.calibration import conformal_p_values
from flow.detectors.transforms import FEATURE_TRANSFORMS
from flow.store.run_folder import read_calibration, read_run_record, score_names

from conftest import make_image_tree

METHODS = ("sanf", "knn", "gaussian")


def fit_args(cache_dir: Path, runs_dir: Path, method: str, *extra: str) -> list[str]:
    flow = ("--epochs", "2", "--hidden", "16") if method.startswith("sanf") else ()  # the baselines train nothing
    return ["fit", "--cache-dir", str(cache_dir), "--runs-dir", str(runs_dir), "--normal", "blue", "--method", method,
            *flow, "--device", "cpu", *extra]


def run_of(runs_dir: Path, method: str) -> Path:
    """The one run of ``method`` (named ``..__<method>[-<transform>]__..``: a CNN's runs carry auto's ssqrt-l2)."""
    labels = {method} | {f"{method}-{t}" for t in FEATURE_TRANSFORMS}
    (found,) = [p for p in runs_dir.iterdir() if p.is_dir() and p.name.split("__")[-3] in labels]
    return found


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A cache of a 12-train / 4-test image tree (test_vit, random init), and one calibrated run per method
    (--val-fraction 0.25: 3 held-out normal rows), scored."""
    work = tmp_path_factory.mktemp("predict")
    tree = make_image_tree(work / "data", per_split={"train": 12, "test": 4})
    cache_dir, runs_dir = work / "cache", work / "runs"
    assert_ok(invoke(*extract_args(tree, cache_dir, backbone=SMALL)))
    for method in METHODS:
        assert_ok(invoke(*fit_args(cache_dir, runs_dir, method, "--val-fraction", "0.25")))
    score = invoke("score", "--runs-dir", str(runs_dir), "--device", "cpu", "--alpha", "0.5")
    assert_ok(score)
    return {"work": work, "tree": tree, "cache_dir": cache_dir, "runs_dir": runs_dir, "score": score}


@pytest.fixture(scope="module")
def odd_tree(tmp_path_factory) -> Path:
    """Nested folders with an RGB, a grayscale, an RGBA, a palette and a 16-bit image, an unreadable .png, a text
    file and hidden files."""
    root = tmp_path_factory.mktemp("odd") / "new"
    rng = np.random.default_rng(3)
    (root / "a" / "b").mkdir(parents=True)
    (root / ".hidden").mkdir()
    Image.fromarray(rng.integers(0, 255, (20, 16, 3), dtype=np.uint8)).save(root / "a" / "b" / "rgb.png")
    Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(root / "a" / "gray.png")
    Image.fromarray(rng.integers(0, 255, (12, 12, 4), dtype=np.uint8)).save(root / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).convert("P").save(root / "palette.png")
    Image.fromarray(rng.integers(0, 65535, (12, 12), dtype=np.uint16)).save(root / "sixteen.png")
    assert Image.open(root / "sixteen.png").mode.startswith("I;16")
    (root / "broken.png").write_bytes(b"not a png at all")
    (root / "notes.txt").write_text("not an image")
    (root / ".secret.png").write_bytes(b"hidden")
    shutil.copy(root / "a" / "gray.png", root / ".hidden" / "x.png")
    return root


ODD_IMAGES = ["a/b/rgb.png", "a/gray.png", "broken.png", "palette.png", "rgba.png", "sixteen.png"]


def test_fit_with_val_fraction_stores_the_held_out_scores(calibrated):
    for method in METHODS:
        run = run_of(calibrated["runs_dir"], method)
        record = read_run_record(run)
        assert record["calibration"]["num_rows"] == 3 and record["num_train"] == 9
        assert record["primary_score"] == {"sanf": "nll", "knn": "cosine", "gaussian": "mahalanobis"}[method]
        assert record["features"]["backbone"] == SMALL and record["features"]["weights_source"] == "random-init"
        _, rows = read_csv(run / "calibration.csv")
        assert len(rows) == 3 and all(r["sample_id"].startswith("train/blue/") for r in rows)
        cal = read_calibration(run, record)
        assert all(len(v) == 3 and np.isfinite(v).all() for v in cal.values())


def test_predict_on_images_of_the_cache_gives_their_cached_scores(calibrated):
    """The backbone and preprocessing rebuilt from the provenance reproduce the cached features: predict on the
    test images gives the scores `score` computed from the cache."""
    for method in METHODS:
        run = run_of(calibrated["runs_dir"], method)
        out = calibrated["work"] / f"test_{method}.csv"
        assert_ok(invoke("predict", str(run), str(calibrated["tree"] / "test"), "--out", str(out),
                         "--num-workers", "0", "--device", "cpu"))
        _, predicted = read_csv(out)
        _, scored = read_csv(run / "scores.csv")
        by_id = {r["sample_id"]: r for r in scored}
        assert len(predicted) == len(scored) == 8
        for row in predicted:
            ref = by_id[Path(row["path"]).relative_to(calibrated["tree"]).as_posix()]
            for name in [*score_names(read_run_record(run)), "p_value"]:
                assert float(row[name]) == pytest.approx(float(ref[name]), rel=1e-5, abs=1e-6), (method, name)


def test_predict_odd_files_one_row_each(calibrated, odd_tree):
    run = run_of(calibrated["runs_dir"], "sanf")
    out = calibrated["work"] / "odd.csv"
    explicit = odd_tree / "notes.txt"  # a file named explicitly gets a row even when it is not an image
    result = invoke("predict", str(run), str(odd_tree), str(explicit), "--out", str(out),
                    "--num-workers", "0", "--device", "cpu", "--alpha", "0.5")
    assert_ok(result)
    columns, rows = read_csv(out)
    assert columns == ["path", "score", "nll", "z2", "p_value", "anomalous", "error"]
    paths = [Path(r["path"]) for r in rows]
    assert paths == [odd_tree / p for p in ODD_IMAGES] + [explicit]
    by_name = {p.name: r for p, r in zip(paths, rows, strict=True)}
    for name in ("rgb.png", "gray.png", "rgba.png", "palette.png", "sixteen.png"):
        row = by_name[name]
        assert row["error"] == "" and np.isfinite(float(row["nll"])) and row["score"] == row["nll"], name
        assert 0 < float(row["p_value"]) <= 1 and row["anomalous"] == str(int(float(row["p_value"]) <= 0.5))
    for name, fragment in (("broken.png", "cannot read image"), ("notes.txt", "cannot read image")):
        row = by_name[name]
        assert fragment in row["error"] and row["score"] == row["nll"] == row["p_value"] == row["anomalous"] == ""
    summary = result.stdout.strip().splitlines()[-1]
    assert "scored 5 of 7 images, 2 could not be read" in summary
    assert "1 file in the folders given is not an image and was skipped" in summary and str(out) in summary
    flagged = sum(r["anomalous"] == "1" for r in rows)
    assert f"{flagged} flagged anomalous at alpha 0.5" in summary


@pytest.mark.parametrize("value, fragment", [
    (1e5, "exceed the range of float16, the dtype the run's cache stored them in (fit on a cache extracted with "
          "--dtype float32)"),
    (float("inf"), "the backbone gave non-finite features for"),
], ids=["beyond-float16", "backbone-inf"])
def test_predict_names_why_features_are_not_finite(calibrated, tmp_path, monkeypatch, value, fragment):
    """A finite feature beyond the float16 cache's range and a backbone output that is itself infinite get
    different error rows (predict named the backbone for both)."""
    from extract.backbone import TokenEncoder

    forward = TokenEncoder.forward

    def large(self, images):
        cls, patches = forward(self, images)
        cls = cls.clone()
        cls[0, 3] = value  # the first image of each batch
        return cls, patches

    monkeypatch.setattr(TokenEncoder, "forward", large)
    out = tmp_path / "p.csv"
    image = calibrated["tree"] / "test" / "blue" / "000.png"
    assert_ok(invoke("predict", str(run_of(calibrated["runs_dir"], "knn")), str(image), "--out", str(out),
                     "--num-workers", "0", "--device", "cpu"))
    _, rows = read_csv(out)
    assert fragment in rows[0]["error"] and str(image) in rows[0]["error"] and rows[0]["score"] == ""


def test_p_values_follow_the_held_out_scores(calibrated, odd_tree):
    run = run_of(calibrated["runs_dir"], "knn")
    out = calibrated["work"] / "knn_odd.csv"
    assert_ok(invoke("predict", str(run), str(odd_tree), "--out", str(out), "--num-workers", "0", "--device", "cpu"))
    _, rows = read_csv(out)
    cal = read_calibration(run, read_run_record(run))["cosine"]
    for row in rows:
        if not row["error"]:
            s = float(row["cosine"])
            assert float(row["p_value"]) == (1 + np.sum(cal >= s)) / (len(cal) + 1)
            assert row["anomalous"] == str(int(float(row["p_value"]) <= 0.05))


def test_predictions_csv_writes_floats_with_9_significant_digits(calibrated, odd_tree):
    """Scores and p-values are written at a fixed precision (flow.store.run_folder.csv_value), not as repr's 17
    digits."""
    out = calibrated["work"] / "digits.csv"
    assert_ok(invoke("predict", str(run_of(calibrated["runs_dir"], "gaussian")), str(odd_tree / "a"), "--out",
                     str(out), "--num-workers", "0", "--device", "cpu"))
    _, rows = read_csv(out)
    assert len(rows) == 2
    for row in rows:
        for column in ("score", "mahalanobis", "p_value"):
            assert f"{float(row[column]):.9g}" == row[column], (column, row[column])


def test_uncalibrated_run_predicts_scores_only(calibrated, tmp_path, odd_tree):
    runs = tmp_path / "runs"
    assert_ok(invoke(*fit_args(calibrated["cache_dir"], runs, "gaussian")))
    result = invoke("predict", str(run_of(runs, "gaussian")), str(odd_tree / "a"), "--num-workers", "0",
                    "--device", "cpu")
    assert_ok(result)
    _, rows = read_csv(run_of(runs, "gaussian") / "predictions.csv")
    assert len(rows) == 2 and all(r["score"] and r["p_value"] == "" and r["anomalous"] == "" for r in rows)
    assert "fit it with --val-fraction" in result.stdout.strip().splitlines()[-1]


def test_score_reports_the_realised_false_alarm_rate(calibrated):
    assert "(nll): false-alarm rate" in calibrated["score"].output
    assert "95 % beta-binomial band up to" in calibrated["score"].output
    columns, rows = read_csv(calibrated["runs_dir"] / "auroc.csv")
    for c in ("alpha", "n_calibration", "false_alarm_rate", "detection_rate"):
        assert c in columns
    for row in rows:
        run = calibrated["runs_dir"] / row["run"]
        _, scored = read_csv(run / "scores.csv")
        cal = read_calibration(run, read_run_record(run))[row["score"]]
        p = conformal_p_values(cal, np.array([float(r[row["score"]]) for r in scored]))
        normal = np.array([r["is_anomaly"] == "0" for r in scored])
        assert float(row["alpha"]) == 0.5 and int(row["n_calibration"]) == 3
        assert float(row["false_alarm_rate"]) == pytest.approx(np.mean(p[normal] <= 0.5))
        assert float(row["detection_rate"]) == pytest.approx(np.mean(p[~normal] <= 0.5))
        if row["score"] == read_run_record(run)["primary_score"]:
            np.testing.assert_allclose([float(r["p_value"]) for r in scored], p)
            assert [int(r["anomalous"]) for r in scored] == (p <= 0.5).astype(int).tolist()


# ----------------------------------------------------------------------------------------------------------------
# the backbone is rebuilt as recorded, or refused
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def file_weights_run(tmp_path_factory):
    """A cache extracted with --weights FILE (test_vit's seeded random weights saved to a file) and a knn run."""
    from safetensors.torch import save_file

    from extract.backbone import create_backbone

    work = tmp_path_factory.mktemp("weights")
    model, _ = create_backbone(SMALL, random_init=True, img_size=32)
    weights = work / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    tree = make_image_tree(work / "data", per_split={"train": 4, "test": 2})
    args = [a for a in extract_args(tree, work / "cache", backbone=SMALL) if a != "--random-init"]
    assert_ok(invoke(*args, "--weights", str(weights)))
    assert_ok(invoke(*fit_args(work / "cache", work / "runs", "knn")))
    return {"work": work, "weights": weights, "tree": tree, "run": run_of(work / "runs", "knn")}


def test_changed_weights_file_is_refused(file_weights_run, tmp_path):
    original = file_weights_run["weights"].read_bytes()
    try:
        data = bytearray(original)
        data[-1] ^= 1
        file_weights_run["weights"].write_bytes(bytes(data))
        result = invoke("predict", str(file_weights_run["run"]), str(file_weights_run["tree"] / "test"),
                        "--num-workers", "0", "--device", "cpu", "--out", str(tmp_path / "p.csv"))
        assert_input_error(result, "changed since extraction", "sha256")
        assert not (tmp_path / "p.csv").exists()
    finally:
        file_weights_run["weights"].write_bytes(original)


def test_missing_weights_file_is_refused_and_a_moved_copy_accepted(file_weights_run, tmp_path):
    moved = tmp_path / "moved.safetensors"
    shutil.move(file_weights_run["weights"], moved)
    try:
        args = ["predict", str(file_weights_run["run"]), str(file_weights_run["tree"] / "test"), "--num-workers", "0",
                "--device", "cpu", "--out", str(tmp_path / "p.csv")]
        assert_input_error(invoke(*args), "weights file", "is missing", "--weights FILE")
        other = tmp_path / "other.safetensors"
        other.write_bytes(moved.read_bytes()[:-1] + b" ")
        assert_input_error(invoke(*args, "--weights", str(other)), "sha256", "differs")
        assert_ok(invoke(*args, "--weights", str(moved)))
        _, rows = read_csv(tmp_path / "p.csv")
        assert len(rows) == 4 and all(r["error"] == "" for r in rows)
    finally:
        shutil.move(moved, file_weights_run["weights"])


def _edit_features(run: Path, tmp_path: Path, **changes) -> Path:
    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    record = json.loads((copy / "run.json").read_text())
    record["features"].update(changes)
    (copy / "run.json").write_text(json.dumps(record))
    return copy


def test_hub_weights_that_cannot_be_had_are_refused(calibrated, tmp_path, monkeypatch):
    import extract.backbone

    monkeypatch.setattr(extract.backbone, "hub_reachable", lambda timeout_s=3.0: False)
    run = _edit_features(run_of(calibrated["runs_dir"], "knn"), tmp_path, weights_source="timm pretrained timm/x")
    result = invoke("predict", str(run), str(calibrated["tree"] / "test"), "--num-workers", "0", "--device", "cpu")
    assert_input_error(result, "timm's pretrained weights", "cannot be had here")


@pytest.mark.parametrize("changes, fragment", [
    ({"backbone": "no_such_model_x"}, "is not a timm model name"),
    ({"feature_dim": 999}, "feature_dim 64 instead of 999"),
    ({"weights_source": "carrier pigeon"}, "cannot rebuild"),
])
def test_a_backbone_that_cannot_be_rebuilt_is_refused(calibrated, tmp_path, changes, fragment):
    run = _edit_features(run_of(calibrated["runs_dir"], "gaussian"), tmp_path, **changes)
    result = invoke("predict", str(run), str(calibrated["tree"] / "test"), "--num-workers", "0", "--device", "cpu")
    assert_input_error(result, fragment)


@pytest.mark.parametrize("args, fragment", [
    (["--alpha", "0"], "--alpha"),
    (["--alpha", "1.5"], "--alpha"),
])
def test_bad_alpha_is_refused(calibrated, args, fragment):
    result = invoke("predict", str(run_of(calibrated["runs_dir"], "knn")), str(calibrated["tree"]), *args)
    assert result.exit_code == 2 and fragment in result.output


def test_a_path_that_does_not_exist_is_refused(calibrated, tmp_path):
    run = run_of(calibrated["runs_dir"], "knn")
    result = invoke("predict", str(run), str(calibrated["tree"] / "test"), str(tmp_path / "typo"), "--out",
                    str(tmp_path / "p.csv"))
    assert result.exit_code == 2 and "does not exist" in result.output
    from flow.deploy.predict import predict

    with pytest.raises(ValueError, match="does not exist"):
        predict(run, [str(tmp_path / "typo")], out=tmp_path / "p.csv", log=lambda s: None)
    assert not (tmp_path / "p.csv").exists()


def test_run_files_are_readable_by_others_under_the_umask(calibrated):
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    for file in run_of(calibrated["runs_dir"], "sanf").iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file.name


def test_an_exported_model_is_readable_by_others_under_the_umask(calibrated, tmp_path):
    """export writes through a temporary file (made 0600 by mkstemp): the model gets the umask's mode, as every
    other output does."""
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    out = tmp_path / "m.onnx"
    assert_ok(invoke("export", str(run_of(calibrated["runs_dir"], "gaussian")), "--out", str(out)))
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask


def test_a_folder_without_images_is_refused(calibrated, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    result = invoke("predict", str(run_of(calibrated["runs_dir"], "knn")), str(tmp_path / "empty"), "--device", "cpu")
    assert_input_error(result, "no image files", "1 file that is not an image")


# ----------------------------------------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_onnx_round_trip_matches_pytorch(calibrated, odd_tree, method):
    import onnxruntime as ort

    run = run_of(calibrated["runs_dir"], method)
    model = calibrated["work"] / f"{method}.onnx"
    result = invoke("export", str(run), "--out", str(model), "--alpha", "0.5")
    assert_ok(result)
    assert "largest relative difference" in result.output and model.is_file()
    torch_csv, onnx_csv = calibrated["work"] / f"{method}_t.csv", calibrated["work"] / f"{method}_o.csv"
    common = ["--num-workers", "0", "--alpha", "0.5"]
    assert_ok(invoke("predict", str(run), str(odd_tree), "--out", str(torch_csv), "--device", "cpu", *common))
    assert_ok(invoke("predict", str(run), str(odd_tree), "--out", str(onnx_csv), "--onnx", str(model), *common))
    columns_t, rows_t = read_csv(torch_csv)
    columns_o, rows_o = read_csv(onnx_csv)
    assert columns_t == columns_o and [r["path"] for r in rows_t] == [r["path"] for r in rows_o]
    for a, b in zip(rows_t, rows_o, strict=True):
        assert a["error"] == b["error"]
        if not a["error"]:
            for name in columns_t[1:-3]:
                assert float(b[name]) == pytest.approx(float(a[name]), rel=1e-4, abs=1e-6), name

    # the graph's own p-value and decision: the conformal p-value of its primary score, at the exported alpha
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    record = read_run_record(run)
    outputs = [o.name for o in session.get_outputs()]
    assert outputs == [*{"sanf": ["nll", "z2"], "knn": ["l2", "cosine"], "gaussian": ["mahalanobis"]}[method],
                       "p_value", "anomalous"]
    images = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)  # dynamic batch: 3, exported with 1
    got = dict(zip(outputs, session.run(None, {"images": images}), strict=True))
    cal = read_calibration(run, record)[record["primary_score"]]
    np.testing.assert_allclose(got["p_value"], conformal_p_values(cal, got[record["primary_score"]]))
    np.testing.assert_array_equal(got["anomalous"], got["p_value"] <= 0.5)
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["sanf_ad.run"] == run.name and meta["sanf_ad.alpha"] == "0.5"


def test_onnx_of_a_cnn_backbone(tmp_path):
    """A CNN (timm's test_efficientnet, random init) with the flow: the graph matches PyTorch."""
    tree = make_image_tree(tmp_path / "data", per_split={"train": 5, "test": 2})
    assert_ok(invoke(*extract_args(tree, tmp_path / "cache", backbone="test_efficientnet")))
    assert_ok(invoke(*fit_args(tmp_path / "cache", tmp_path / "runs", "sanf-nocaff", "--val-fraction", "0.4")))
    run = run_of(tmp_path / "runs", "sanf-nocaff")
    result = invoke("export", str(run), "--out", str(tmp_path / "m.onnx"), "--check-images", str(tree / "test"))
    assert_ok(result)
    assert "on 4 check images" in result.output


def test_onnx_from_another_run_is_refused(calibrated):
    model = calibrated["work"] / "gaussian.onnx"
    if not model.exists():
        assert_ok(invoke("export", str(run_of(calibrated["runs_dir"], "gaussian")), "--out", str(model)))
    result = invoke("predict", str(run_of(calibrated["runs_dir"], "knn")), str(calibrated["tree"] / "test"),
                    "--onnx", str(model), "--num-workers", "0")
    assert_input_error(result, "was exported from another run")


def test_export_leaves_nothing_when_the_run_is_broken(calibrated, tmp_path):
    run = _edit_features(run_of(calibrated["runs_dir"], "knn"), tmp_path, backbone="no_such_model_x")
    result = invoke("export", str(run), "--out", str(tmp_path / "m.onnx"))
    assert_input_error(result, "is not a timm model name")
    assert not list(tmp_path.glob("*.onnx*")) and not list(tmp_path.glob(".m.onnx*"))


def test_onnx_with_a_patch_grid_that_does_not_divide_the_token_grid(tmp_path):
    """48 px with 16 px patches: a 3 x 3 token grid pooled to 2 x 2 (adaptive pooling that ONNX cannot express
    directly; the graph uses the equivalent pooling matrix)."""
    tree = make_image_tree(tmp_path / "data", per_split={"train": 5, "test": 2})
    args = [a if a != "32" else "48" for a in extract_args(tree, tmp_path / "cache", "--patch-grid", "2",
                                                              backbone=SMALL)]
    assert_ok(invoke(*args))
    assert_ok(invoke(*fit_args(tmp_path / "cache", tmp_path / "runs", "sanf", "--val-fraction", "0.4")))
    run = run_of(tmp_path / "runs", "sanf")
    assert read_run_record(run)["features"]["token_grid"] == [3, 3]
    assert_ok(invoke("export", str(run), "--out", str(tmp_path / "m.onnx"), "--check-images", str(tree / "test")))


def test_export_refuses_when_onnxruntime_disagrees(calibrated, tmp_path, monkeypatch):
    import flow.deploy.export as export_module

    real = export_module._reference

    def off_by_a_percent(*args):
        return {k: v * 1.01 for k, v in real(*args).items()}

    monkeypatch.setattr(export_module, "_reference", off_by_a_percent)
    result = invoke("export", str(run_of(calibrated["runs_dir"], "gaussian")), "--out", str(tmp_path / "m.onnx"))
    assert_input_error(result, "onnxruntime and PyTorch disagree on mahalanobis", "nothing written")
    assert list(tmp_path.iterdir()) == []


def test_onnx_of_a_sibling_run_is_refused(calibrated, tmp_path):
    """Two runs of one `fit --normal all` share cache, method and creation second: the weights hash tells them
    apart."""
    runs = tmp_path / "runs"
    assert_ok(invoke(*[a if a != "blue" else "all" for a in fit_args(calibrated["cache_dir"], runs, "knn",
                                                                     "--val-fraction", "0.25")]))
    blue, red = sorted(p for p in runs.iterdir() if p.is_dir())
    assert_ok(invoke("export", str(blue), "--out", str(tmp_path / "blue.onnx")))
    result = invoke("predict", str(red), str(calibrated["tree"] / "test"), "--onnx", str(tmp_path / "blue.onnx"),
                    "--num-workers", "0", "--out", str(tmp_path / "p.csv"))
    assert_input_error(result, "was exported from another run")


def test_out_may_not_be_an_input_or_a_run_file(calibrated, tmp_path):
    run = run_of(calibrated["runs_dir"], "knn")
    image = tmp_path / "a.png"
    shutil.copy(next((calibrated["tree"] / "test" / "blue").iterdir()), image)
    before = image.read_bytes()
    assert_input_error(invoke("predict", str(run), str(image), "--out", str(image)), "is one of the input images")
    assert image.read_bytes() == before
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert_input_error(invoke("predict", str(copy), str(image), "--out", str(copy / "run.json")), "file of the run")
    assert_input_error(invoke("export", str(copy), "--out", str(copy / "model.safetensors")), "file of the run")
    assert_input_error(invoke("predict", str(copy), str(image), "--out", str(copy / "feature_transform.safetensors")),
                       "file of the run")
    assert read_run_record(copy)
    graph = tmp_path / "m.onnx"
    assert_ok(invoke("export", str(run), "--out", str(graph)))
    onnx_bytes = graph.read_bytes()
    assert_input_error(invoke("predict", str(run), str(image), "--onnx", str(graph), "--out", str(graph)),
                       f"--out {graph} is the --onnx graph; choose another name")
    assert graph.read_bytes() == onnx_bytes
    assert_input_error(invoke("export", str(run), "--out", str(image), "--check-images", str(image)),
                       f"--out {image} is the --check-images file {image}")
    assert_input_error(invoke("export", str(run), "--out", str(tmp_path / "m2.onnx"), "--check-images",
                              str(tmp_path)), f"--out {tmp_path / 'm2.onnx'} is inside --check-images {tmp_path}")
    assert image.read_bytes() == before and not (tmp_path / "m2.onnx").exists()
    # options the --onnx path would ignore are refused, not dropped
    assert_input_error(invoke("predict", str(run), str(image), "--onnx", str(graph), "--weights", str(graph),
                              "--out", str(tmp_path / "p.csv")), "with --onnx the backbone is the graph's")
    # a refused call leaves no --out folder behind
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_input_error(invoke("predict", str(run), str(empty), "--out", str(tmp_path / "new" / "dir" / "p.csv")),
                       "no image files under")
    assert_input_error(invoke("export", str(run), "--out", str(tmp_path / "new2" / "m.onnx"), "--check-images",
                              str(empty)), "no image files")
    assert not (tmp_path / "new").exists() and not (tmp_path / "new2").exists()
    from flow.api import predict_files

    one = predict_files(run, str(image), out=tmp_path / "one.csv", device="cpu", num_workers=0, progress=False,
                        log=lambda line: None)  # one path alone is one path, not its characters
    assert len(read_csv(tmp_path / "one.csv")[1]) == 1 and one is not None


def test_a_val_fraction_that_holds_out_no_row_is_refused(calibrated, tmp_path):
    result = invoke(*fit_args(calibrated["cache_dir"], tmp_path / "runs", "gaussian", "--val-fraction", "0.01"))
    assert_input_error(result, "--val-fraction 0.01 holds out 0 of 12 rows")


def test_a_fifo_gets_an_error_row_instead_of_blocking(calibrated, tmp_path):
    import os

    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(next((calibrated["tree"] / "test" / "blue").iterdir()), folder / "a.png")
    os.mkfifo(folder / "pipe.png")
    out = tmp_path / "p.csv"
    assert_ok(invoke("predict", str(run_of(calibrated["runs_dir"], "knn")), str(folder), "--out", str(out),
                     "--num-workers", "0"))
    _, rows = read_csv(out)
    assert [Path(r["path"]).name for r in rows] == ["a.png", "pipe.png"]
    assert rows[0]["error"] == "" and "not a regular file" in rows[1]["error"]


@pytest.mark.parametrize("backbone, layer, features, method", [
    (SMALL, "block-0", "pca-whiten", "sanf"),
    ("test_efficientnet", "pre-activation", "ssqrt-l2", "gaussian"),
    ("test_efficientnet", "block-1", "standardize", "knn"),
])
def test_layer_and_transform_carry_to_predict_and_export(tmp_path, backbone, layer, features, method):
    """A run on a non-default layer with a feature transform: predict rebuilds the layer and applies the transform
    (the cached images get their scores from `score`), and the ONNX graph holds both."""
    tree = make_image_tree(tmp_path / "data", per_split={"train": 8, "test": 3})
    cache_dir, runs_dir = tmp_path / "cache", tmp_path / "runs"
    assert_ok(invoke(*extract_args(tree, cache_dir, "--layer", layer, backbone=backbone)))
    assert_ok(invoke(*fit_args(cache_dir, runs_dir, method, "--val-fraction", "0.25", "--transform", features)))
    assert_ok(invoke("score", "--runs-dir", str(runs_dir), "--device", "cpu", "--alpha", "0.5"))
    (run,) = [p for p in runs_dir.iterdir() if p.is_dir()]
    record = read_run_record(run)
    assert record["feature_transform"] == features and record["features"]["layer"] == layer
    out = tmp_path / "p.csv"
    assert_ok(invoke("predict", str(run), str(tree / "test"), "--out", str(out), "--num-workers", "0",
                     "--device", "cpu", "--alpha", "0.5"))
    _, predicted = read_csv(out)
    by_id = {r["sample_id"]: r for r in read_csv(run / "scores.csv")[1]}
    names = score_names(record)
    for row in predicted:
        ref = by_id[Path(row["path"]).relative_to(tree).as_posix()]
        for name in [*names, "p_value"]:
            assert float(row[name]) == pytest.approx(float(ref[name]), rel=1e-5, abs=1e-6), name
    model = tmp_path / "m.onnx"
    assert_ok(invoke("export", str(run), "--out", str(model), "--check-images", str(tree / "test")))
    onnx_out = tmp_path / "o.csv"
    assert_ok(invoke("predict", str(run), str(tree / "test"), "--out", str(onnx_out), "--onnx", str(model),
                     "--num-workers", "0", "--alpha", "0.5"))
    for a, b in zip(predicted, read_csv(onnx_out)[1], strict=True):
        for name in names:
            assert float(b[name]) == pytest.approx(float(a[name]), rel=1e-4, abs=1e-5), name
    statistics = run / "feature_transform.safetensors"
    if statistics.exists():  # the graph holds the statistics it was exported with: changed ones are refused
        from safetensors.numpy import load_file, save_file

        save_file({k: v * 3 for k, v in load_file(str(statistics)).items()}, str(statistics))
        assert_input_error(invoke("predict", str(run), str(tree / "test"), "--out", str(onnx_out), "--onnx",
                                  str(model), "--num-workers", "0"), "was exported from another run")
