"""The detector contract: one torch module per detector, chained with its feature transform and calibration by
:class:`flow.detectors.scorer.Scorer`, and the ONNX graph is that same module traced."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from flow.detectors.calibration import ConformalCalibration
from flow.detectors.registry import METHODS, PRIMARY_SCORES, detector_class
from flow.detectors.scorer import Scorer
from flow.detectors.transforms import FeatureTransform
from flow.model.sanf import FlowConfig
from flow.model.train import TrainConfig

D, P = 8, 4


def make_detector(method: str):
    if method in ("sanf", "sanf-nocaff"):
        config = FlowConfig(dim=D, num_blocks=2, hidden=16, num_heads=2, use_caff=method == "sanf")
        return detector_class(method)(config, TrainConfig(epochs=2, batch_size=16), seed=0)
    return detector_class(method)()


def rows(n: int, seed: int, anomalous: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal rows around mu = (3, 3, 3, 3, 0, 0, 0, 0), off the origin so that angles tell too (the cosine
    distance ignores norms); anomalous rows moved by 4 along the other half of the channels."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.cat([torch.full((D // 2,), 3.0), torch.full((D // 2,), 4.0 if anomalous else 0.0)])
    return torch.randn(n, D, generator=g) + mu, torch.randn(n, P, D, generator=g) + mu


def fitted_scorer(method: str, transform: str = "raw") -> Scorer:
    cls, patches = rows(64, 0)
    pre = FeatureTransform(transform).fit(cls)
    detector = make_detector(method).fit(pre(cls), pre(patches))
    held_cls, held_patches = rows(30, 1)
    held_out = detector.scores(pre(held_cls), pre(held_patches))[detector.primary_score]
    return Scorer(detector, pre, ConformalCalibration(held_out, alpha=0.2)).eval()


@pytest.mark.parametrize("method", METHODS)
def test_every_detector_returns_its_named_float64_scores_higher_for_anomalies(method):
    scorer = fitted_scorer(method)
    normal, anomalous = rows(40, 2), rows(40, 3, anomalous=True)
    out = {k: np.concatenate([a, b]) for (k, a), b in zip(scorer.scores(*normal).items(),
                                                        scorer.scores(*anomalous).values(), strict=True)}
    assert list(out) == [*scorer.detector.score_names, "p_value", "anomalous"]
    assert scorer.primary_score == PRIMARY_SCORES[method]
    for name in scorer.detector.score_names:
        assert out[name].dtype == np.float64 and out[name].shape == (80,)
        assert out[name][40:].mean() > out[name][:40].mean(), name
    assert out["anomalous"].dtype == bool and out["anomalous"][40:].mean() > out["anomalous"][:40].mean()


@pytest.mark.parametrize("method", METHODS)
def test_a_detector_rebuilt_from_its_state_scores_identically(method):
    detector = fitted_scorer(method).detector
    clone = detector_class(method).from_state(detector.params(), detector.state())
    cls, patches = rows(16, 4)
    for name, values in detector.scores(cls, patches).items():
        np.testing.assert_array_equal(clone.scores(cls, patches)[name], values, err_msg=name)


def test_the_calibration_module_is_the_conformal_p_value():
    module = ConformalCalibration(np.array([1.0, 2.0, 2.0, 3.0]), alpha=0.4)
    p, flagged = module(torch.tensor([0.5, 2.0, 2.5, 9.0, float("nan")], dtype=torch.float64))
    # p(s) = (1 + #{s_i >= s}) / (n + 1)
    np.testing.assert_allclose(p[:4].numpy(), [5 / 5, 4 / 5, 2 / 5, 1 / 5])
    assert torch.isnan(p[4]) and not bool(flagged[4])
    assert flagged[:4].tolist() == [False, False, True, True]


@pytest.mark.parametrize("transform", ["raw", "pca-whiten"])
@pytest.mark.parametrize("method", METHODS)
def test_the_onnx_graph_of_a_scorer_gives_the_modules_outputs(method, transform, tmp_path):
    """What export does behind the backbone, on its own: the Scorer traced to ONNX gives, through onnxruntime, the
    module's own scores (float rounding) and the same p-values and decisions on the same rows."""
    ort = pytest.importorskip("onnxruntime")
    scorer = fitted_scorer(method, transform)

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scorer = scorer

        def forward(self, cls, patches):
            out = self.scorer(cls, patches)
            return tuple(out[name] for name in scorer.output_names)

    (cls, patches), (odd_cls, odd_patches) = rows(10, 5), rows(10, 6, anomalous=True)
    cls, patches = torch.cat([cls, odd_cls]), torch.cat([patches, odd_patches])
    path = tmp_path / "scorer.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Graph().eval(), (cls[:2], patches[:2]), str(path), input_names=["cls", "patches"],
                          output_names=scorer.output_names, opset_version=17, dynamo=False,
                          dynamic_axes={name: {0: "batch"} for name in ["cls", "patches", *scorer.output_names]})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"cls": cls.numpy(), "patches": patches.numpy()}
    got = dict(zip(scorer.output_names, session.run(scorer.output_names,
                                                    {i.name: feeds[i.name] for i in session.get_inputs()}),
                   strict=True))
    expected = scorer.scores(cls, patches)
    for name in scorer.detector.score_names:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(got["anomalous"], expected["anomalous"])
    np.testing.assert_allclose(got["p_value"], expected["p_value"])
