"""Feature transforms (flow.detectors.transforms, fit/sweep --transform): the same map on class and patch tokens,
statistics from the normal class's fitted train rows only, stored with the run and applied where it scores."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from cache import FeatureCache
from flow.detectors.gaussian import GaussianDetector
from flow.detectors.knn import KNNDetector
from flow.detectors.transforms import (
    FEATURE_CHOICES,
    FEATURE_TRANSFORMS,
    FeatureTransform,
    check_features,
    resolve_features,
)
from flow.experiments.config import FitConfig
from flow.experiments.fitting import fit_cache, split_holdout
from flow.experiments.scoring import score_runs
from flow.store.run_folder import TRANSFORM_FILE, RunError, load_feature_transform, load_scorer, read_run_record

from conftest import gaussian_splits, write_cache


def _tokens(n=30, d=8, p=4, seed=0):
    rng = np.random.default_rng(seed)
    cls = rng.gamma(0.5, 1.0, (n, d)).astype(np.float32) - 0.2  # skewed, some negative, like post-ReLU features
    return cls, rng.standard_normal((n, p, d)).astype(np.float32)


@pytest.mark.parametrize("name", FEATURE_TRANSFORMS)
def test_transform_is_the_same_map_on_class_and_patch_tokens(name):
    cls, _ = _tokens()
    transform = FeatureTransform(name).fit(cls)
    patches = np.stack([cls, 2 * cls, cls[::-1]], axis=1)  # (N, 3, D): tokens made of class tokens
    out_cls, out_patches = transform(cls), transform(patches)
    assert out_patches.shape == patches.shape and out_patches.dtype == np.float32
    np.testing.assert_array_equal(out_patches[:, 0], out_cls)
    np.testing.assert_array_equal(out_patches[:, 2], out_cls[::-1])
    # numpy and torch give the same values (torch is what score and the ONNX graph use)
    np.testing.assert_allclose(transform(torch.from_numpy(patches)).numpy(), out_patches, rtol=1e-6, atol=1e-6)


def test_transform_definitions():
    cls, _ = _tokens(n=200, d=8)
    d = cls.shape[1]
    np.testing.assert_array_equal(FeatureTransform("raw").fit(cls)(cls), cls)
    l2 = FeatureTransform("l2")(cls)
    np.testing.assert_allclose(np.linalg.norm(l2, axis=1), np.sqrt(d), rtol=1e-5)
    np.testing.assert_allclose(l2, cls / np.linalg.norm(cls, axis=1, keepdims=True) * np.sqrt(d), rtol=1e-5)
    root = np.sign(cls) * np.sqrt(np.abs(cls))
    np.testing.assert_allclose(FeatureTransform("ssqrt-l2")(cls),
                               root / np.linalg.norm(root, axis=1, keepdims=True) * np.sqrt(d), rtol=1e-5, atol=1e-6)
    z = FeatureTransform("standardize").fit(cls)(cls)
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=0), 1, rtol=1e-4)
    from sklearn.covariance import LedoitWolf

    whiten = FeatureTransform("pca-whiten").fit(cls)
    w = whiten(cls).astype(np.float64)
    np.testing.assert_allclose(w.mean(axis=0), 0, atol=1e-5)
    # W^T Sigma_LW W = I: it whitens the Ledoit-Wolf covariance exactly; the sample covariance of the result is
    # diagonal (the same eigenvectors) with variances decreasing (the sample eigenvalues shrunk towards their mean)
    shrunk = LedoitWolf().fit(cls.astype(np.float64)).covariance_
    np.testing.assert_allclose(whiten.state()["matrix"].T.astype(np.float64) @ shrunk @ whiten.state()["matrix"],
                               np.eye(d), atol=1e-5)
    cov = np.cov(w, rowvar=False, bias=True)
    assert np.abs(cov - np.diag(np.diag(cov))).max() < 1e-5
    assert np.all(np.diff(np.diag(cov)) < 0)


def test_unknown_transform_and_unfitted_use_are_refused():
    with pytest.raises(ValueError, match="--transform must be one of raw, l2, ssqrt-l2, standardize, pca-whiten; "
                                         "got 'whiten'"):
        check_features("whiten")
    with pytest.raises(RuntimeError, match="not fitted"):
        FeatureTransform("standardize")(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="at least 2 finite train vectors"):
        FeatureTransform("pca-whiten").fit(np.zeros((1, 3)))


def test_a_constant_channel_keeps_the_typical_scale():
    """A channel constant on the normal train rows (a dead ReLU channel) is centred but not blown up: a small test
    value in it stays small (scaled by the mean channel's deviation), not 1e6 times larger."""
    cls, _ = _tokens()
    cls[:, 3] = 0.0
    typical = cls.std(axis=0).mean()
    probe = np.zeros((1, cls.shape[1]), np.float32)
    probe[0, 3] = 0.01
    standardize = FeatureTransform("standardize").fit(cls)
    assert standardize(probe)[0, 3] == pytest.approx(0.01 / typical, rel=1e-4)
    whiten = FeatureTransform("pca-whiten").fit(cls)
    assert np.isfinite(whiten(cls)).all() and np.abs(whiten(probe) - whiten(probe * 0)).max() < 1.0


@pytest.mark.parametrize("name", ["standardize", "pca-whiten"])
def test_constant_train_features_are_refused_clearly(name):
    with pytest.raises(ValueError, match=f"--transform {name}: the normal train class tokens are all the same"):
        FeatureTransform(name).fit(np.ones((5, 4), np.float32))


def test_non_finite_statistics_are_refused():
    cls, _ = _tokens()
    state = FeatureTransform("standardize").fit(cls).state()
    state["scale"][0] = np.nan
    with pytest.raises(ValueError, match="fitted scale holds NaN or infinite values"):
        FeatureTransform.from_state("standardize", state)


@pytest.mark.parametrize("name", ["standardize", "pca-whiten"])
def test_state_round_trip(name):
    cls, patches = _tokens()
    transform = FeatureTransform(name).fit(cls)
    again = FeatureTransform.from_state(name, transform.state())
    np.testing.assert_array_equal(again(patches), transform(patches))
    with pytest.raises(ValueError, match="lacks its fitted"):
        FeatureTransform.from_state(name, {})


# ----------------------------------------------------------------------------------------------------------------
# with runs: fitted on normal train rows only, stored, applied at score
# ----------------------------------------------------------------------------------------------------------------


def _shifted(splits: dict, split: str, by: float) -> dict:
    out = dict(splits)
    cls, patches, labels = splits[split]
    out[split] = (cls + by, patches + by, labels)
    return out


@pytest.mark.parametrize("method", ["gaussian", "sanf"])
@pytest.mark.parametrize("name", ["standardize", "pca-whiten"])
def test_statistics_come_from_the_fitted_normal_train_rows_only(tmp_path, method, name):
    """A test split (and other classes' train rows) with a shifted mean leave the fitted statistics as they are;
    they are those of the normal class's train rows minus the held-out ones."""
    splits = gaussian_splits()
    moved = _shifted(splits, "test", 50.0)
    cls, patches, labels = moved["train"]
    moved["train"] = (np.where(labels[:, None] == 0, cls, cls - 30.0), patches, labels)  # classes b, c moved
    states = []
    for i, variant in enumerate((splits, moved)):
        cache = write_cache(tmp_path / f"c{i}.h5", variant, ["a", "b", "c"])
        (outcome,) = fit_cache(cache, FitConfig(normal="a", method=method, transform=name, val_fraction=0.25,
                                                **_short(method)),
                               runs_dir=tmp_path / f"runs{i}", log=lambda s: None, progress=False)
        assert outcome.record["feature_transform"] == name and (outcome.path / TRANSFORM_FILE).is_file()
        states.append(load_feature_transform(outcome.path, outcome.record).state())
    for key in states[0]:
        np.testing.assert_array_equal(states[0][key], states[1][key])
    train_a = splits["train"][0][splits["train"][2] == 0]
    fit_idx, _ = split_holdout(len(train_a), 0.25, 0)
    expected = FeatureTransform(name).fit(train_a[fit_idx.numpy()]).state()
    for key in expected:
        np.testing.assert_allclose(states[0][key], expected[key], rtol=1e-6, atol=1e-6)


def _short(method: str) -> dict:
    """A short, narrow flow (the baselines take no flow options)."""
    return {"hidden": 8, "epochs": 1, "batch_size": 16} if method.startswith("sanf") else {}


def _read_scores(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {key: np.array([float(r[key]) for r in rows]) for key in rows[0] if key not in ("sample_id",)}


@pytest.mark.parametrize("method", ["knn", "gaussian", "sanf"])
@pytest.mark.parametrize("name", ["ssqrt-l2", "pca-whiten"])
def test_score_applies_the_runs_transform(tmp_path, gaussian_cache, method, name):
    (outcome,) = fit_cache(gaussian_cache, FitConfig(normal="b", method=method, transform=name, **_short(method)),
                           runs_dir=tmp_path / "runs", log=lambda s: None, progress=False)
    assert f"-{name}__" in outcome.path.name  # the transform labels the run: runs of other transforms coexist
    score_runs(tmp_path / "runs", log=lambda s: None)
    scored = _read_scores(outcome.path / "scores.csv")
    with FeatureCache(gaussian_cache) as fc:
        train, test = fc.split("train"), fc.split("test")
        train_cls, train_patches = train.read(train.rows_of_class(1))
        test_cls, test_patches = test.read(slice(None))
    transform = FeatureTransform(name).fit(train_cls)
    if method == "knn":
        expected = KNNDetector(2).fit(transform(train_cls)).scores(transform(test_cls))
    elif method == "gaussian":
        expected = GaussianDetector().fit(transform(train_cls)).scores(transform(test_cls))
    else:
        scorer = load_scorer(outcome.path)
        expected = scorer.detector.scores(transform(test_cls), transform(test_patches))
        raw = scorer.detector.scores(test_cls, test_patches)
        assert not np.allclose(raw["nll"], expected["nll"])  # the transform made a difference
    for key, values in expected.items():
        np.testing.assert_allclose(scored[key], values, rtol=1e-5, atol=1e-6, err_msg=key)


def test_a_damaged_transform_file_is_a_run_error(tmp_path, gaussian_cache):
    (outcome,) = fit_cache(gaussian_cache, FitConfig(normal="a", method="gaussian", transform="standardize"),
                           runs_dir=tmp_path / "runs", log=lambda s: None)
    (outcome.path / TRANSFORM_FILE).write_bytes(b"garbage")
    with pytest.raises(RunError, match=f"cannot read {TRANSFORM_FILE}"):
        load_feature_transform(outcome.path, read_run_record(outcome.path))
    (outcome.path / TRANSFORM_FILE).unlink()
    with pytest.raises(RunError, match="lacks its fitted shift, scale"):
        load_scorer(outcome.path)


def test_every_transform_is_offered_by_the_cli():
    import pipeline
    from flow.detectors import transforms as features

    assert pipeline.FEATURES_CHOICES == list(FEATURE_CHOICES) == ["auto", *FEATURE_TRANSFORMS]
    assert pipeline.DEFAULT_FEATURES == features.DEFAULT_FEATURES == "auto"


@pytest.mark.parametrize("attrs, expected", [
    ({"semantic_vector": "spatial_mean", "layer": "final"}, "ssqrt-l2"),  # a CNN's final pooled features
    ({"semantic_vector": "spatial_mean"}, "ssqrt-l2"),  # a cache written before --layer: final
    ({"semantic_vector": "spatial_mean", "layer": "pre-activation"}, "raw"),
    ({"semantic_vector": "spatial_mean", "layer": "block-4"}, "raw"),
    ({"semantic_vector": "class_token", "layer": "final"}, "raw"),  # ViT class tokens: the paper's setting
])
def test_auto_is_ssqrt_l2_on_cnn_final_features_and_raw_otherwise(attrs, expected):
    assert resolve_features("auto", attrs) == expected
    assert resolve_features("standardize", attrs) == "standardize"  # an explicit choice is kept
    with pytest.raises(ValueError, match="--transform must be one of auto, raw, .*; got 'sqrt'"):
        resolve_features("sqrt", attrs)
    with pytest.raises(ValueError, match="got 'auto'"):
        FeatureTransform("auto")  # a run stores what auto resolved to, never auto itself


@pytest.mark.parametrize("semantic_vector, expected", [("spatial_mean", "ssqrt-l2"), ("class_token", "raw")])
def test_fit_records_what_auto_resolved_to(tmp_path, semantic_vector, expected):
    cache = write_cache(tmp_path / "c.h5", gaussian_splits(), ["a", "b", "c"], semantic_vector=semantic_vector)
    logs = []
    (outcome,) = fit_cache(cache, FitConfig(normal="a", method="gaussian"), runs_dir=tmp_path / "runs", log=logs.append)
    assert outcome.record["feature_transform"] == expected
    assert logs[0].startswith(f"--transform auto: {expected} (")  # said even when it is raw
    assert (f"gaussian-{expected}__" in outcome.path.name) == (expected != "raw")
    with FeatureCache(cache) as fc:
        cls = fc.split("train").read(fc.split("train").rows_of_class(0))[0]
        test_cls = fc.split("test").read(np.arange(60))[0]
    direct = GaussianDetector().fit(FeatureTransform(expected)(cls))
    np.testing.assert_allclose(load_scorer(outcome.path).scores(test_cls, None)["mahalanobis"],
                               direct.scores(FeatureTransform(expected)(test_cls))["mahalanobis"], rtol=1e-6)
    # asking for the resolved transform by name keeps that run (the same setting), not a second one
    (again,) = fit_cache(cache, FitConfig(normal="a", method="gaussian", transform=expected),
                         runs_dir=tmp_path / "runs", keep_existing=True, log=logs.append)
    assert again.path == outcome.path and any(line.startswith("kept") for line in logs)


def test_resume_refits_a_run_whose_statistics_are_missing(tmp_path, gaussian_cache):
    logs = []
    (first,) = fit_cache(gaussian_cache, FitConfig(normal="a", method="knn", transform="standardize"),
                         runs_dir=tmp_path / "runs", log=logs.append)
    (again,) = fit_cache(gaussian_cache, FitConfig(normal="a", method="knn", transform="standardize"),
                         runs_dir=tmp_path / "runs", log=logs.append, keep_existing=True)
    assert any(line.startswith("kept ") for line in logs)
    (first.path / TRANSFORM_FILE).unlink()
    logs.clear()
    fit_cache(gaussian_cache, FitConfig(normal="a", method="knn", transform="standardize"), runs_dir=tmp_path / "runs",
              log=logs.append, keep_existing=True)
    assert not any(line.startswith("kept ") for line in logs) and (first.path / TRANSFORM_FILE).is_file()


def test_too_few_rows_for_the_statistics_are_refused_before_any_fit(tmp_path):
    splits = gaussian_splits()
    cls, patches, labels = splits["train"]
    keep = (labels != 1) | (np.arange(len(labels)) == np.flatnonzero(labels == 1)[0])  # class b: one row
    splits["train"] = (cls[keep], patches[keep], labels[keep])
    cache = write_cache(tmp_path / "c.h5", splits, ["a", "b", "c"])
    with pytest.raises(ValueError, match="--transform standardize needs at least 2 train rows .* 'b' has 1"):
        fit_cache(cache, FitConfig(normal="all", method="gaussian", transform="standardize"),
                  runs_dir=tmp_path / "runs", log=lambda s: None)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # class a was not fitted
