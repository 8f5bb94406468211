"""Export a fitted run as one ONNX graph, from images to scores and decisions: ``pipeline.py export``.

The graph (``torch.onnx.export``, TorchScript-based exporter, opset :data:`OPSET`, dynamic batch axis):

- input ``images``: float32 (B, 3, H, W), values in [0, 1], already resized and centre-cropped to the run's
  input size as its preprocessing records (the model's metadata says how: ``sanf_ad.preprocessing``);
- inside: the normalisation (mean/std), the backbone and patch pooling, the round trip through the cache's
  storage dtype (float16 by default, as the features the run was fitted on), then the run's
  :class:`~flow.detectors.scorer.Scorer` traced as it is (feature transform, detector, calibration: the module
  ``score`` and ``predict`` run; its fitted tensors become graph constants). This file holds no detector arithmetic;
- outputs: every score of the method (float64, (B,)), and for a calibrated run ``p_value`` (the conformal
  p-value of the primary score, the held-out scores being a constant) and ``anomalous`` (bool, p_value <= the
  alpha given at export, recorded as ``sanf_ad.alpha``).

The backbone runs in float32 whatever precision the cache was extracted with (a bf16/fp16 cache's features
then differ by that precision's rounding). Right after export the graph is run with onnxruntime on a few real
images against the PyTorch path of ``predict`` and the largest relative difference of each output is reported.
"""

from __future__ import annotations

import inspect
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from extract.backbone import TokenEncoder, file_sha256
from extract.encode import CacheEncoder, preprocessing_only, rebuild_encoder
from flow.deploy.runtime import METADATA_PREFIX, ExportError, onnx_session, run_features, transform_sha256
from flow.detectors.calibration import DEFAULT_ALPHA, check_alpha
from flow.detectors.scorer import Scorer
from flow.store.run_folder import (
    RunError,
    check_not_a_run_file,
    load_scorer,
    primary_score,
    read_calibration,
    read_run_record,
    score_names,
    umask_mode,
)

#: ONNX opset of the exported graphs (LayerNormalization is a single op from 17 on).
OPSET = 17
#: Largest difference between onnxruntime and PyTorch accepted by the check after export, relative to
#: max(|score|, the score's mean magnitude over the held-out rows, or over the check images for a run without them).
CHECK_TOLERANCE = 1e-3


class ScoringGraph(nn.Module):
    """Images in [0, 1] -> the run's scores (and p-value and decision when calibrated): the normalisation, the
    backbone, the cache's storage rounding, then the run's :class:`~flow.detectors.scorer.Scorer` itself (feature
    transform, detector, calibration), the very module ``score`` and ``predict`` run.

    Args:
        encoder: the backbone rebuilt from the run's provenance.
        scorer: the run's scorer (:func:`flow.store.run_folder.load_scorer`, calibrated at the export's alpha).
        features: the run's provenance (mean, std, storage dtype).
    """

    def __init__(self, encoder: TokenEncoder, scorer: Scorer, features: dict) -> None:
        super().__init__()
        encoder.pool_as_matmul = True  # the same pooling in a form ONNX can export for any grid
        self.encoder = encoder
        self.scorer = scorer
        self.storage = torch.float16 if features["dtype"] == "float16" else torch.float32
        self.register_buffer("mean", torch.tensor(features["mean"], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(features["std"], dtype=torch.float32).view(1, 3, 1, 1))

    @property
    def output_names(self) -> list[str]:
        return self.scorer.output_names

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cls, patches = self.encoder((images - self.mean) / self.std)
        cls = cls.to(self.storage).float()  # the cache's storage rounding
        patches = patches.to(self.storage).float()
        out = self.scorer(cls, patches)
        return tuple(out[name] for name in self.output_names)


def sample_images() -> list:
    """Two real photographs bundled with scikit-learn (``sklearn.datasets.load_sample_images``: china.jpg,
    flower.jpg), the default inputs of the check after export."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(image) for image in load_sample_images().images]


def _load_images(paths: list[str] | None) -> list:
    from extract.datasets import load_image

    if not paths:
        return sample_images()
    from extract.encode import list_images

    files = list_images(list(paths)).files
    if not files:
        raise ValueError(f"--check-images {', '.join(paths)}: no image files")
    return [load_image(f) for f in files[:8]]


def _reference(encoder: CacheEncoder, scorer: Scorer, images01: torch.Tensor) -> dict[str, np.ndarray]:
    """The PyTorch path of ``predict`` on [0, 1] images: normalise, encode, the run's own transform and detector."""
    mean = torch.tensor(encoder.features["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(encoder.features["std"]).view(1, 3, 1, 1)
    return scorer.scores(*encoder.encode((images01 - mean) / std))


def export_onnx(run: str | os.PathLike, out: str | os.PathLike, alpha: float = DEFAULT_ALPHA, opset: int = OPSET,
                check_images: list[str] | None = None, weights: str | None = None,
                log: Callable[[str], None] = print) -> dict[str, float]:
    """Write a run as an ONNX graph (see the module docstring) and check it against PyTorch with onnxruntime.

    The file is written under a temporary name and renamed to ``out`` only when the check passes.

    Args:
        run: a run folder (any method).
        out: the ``.onnx`` file to write.
        alpha: the decision's significance level (calibrated runs).
        opset: ONNX opset version.
        check_images: image files or folders for the check (up to 8 files); default: :func:`sample_images`.
        weights: the backbone's weights file, when it moved since extraction (sha256 checked).
        log: where to print status lines.

    Returns:
        The largest relative difference per score between onnxruntime and PyTorch on the check images.

    Raises:
        RunError, BackboneError: the run or its backbone cannot be loaded.
        ExportError: torch.onnx.export failed, or onnxruntime disagrees beyond :data:`CHECK_TOLERANCE`.
    """
    import onnx

    alpha = check_alpha(alpha)
    run, out = Path(run), Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name (MODEL.onnx)")
    check_not_a_run_file(out)
    for path in check_images or ():  # the graph would replace a check image, or join the images checked
        if Path(path).is_dir() and Path(path).resolve() in out.resolve().parents:
            raise ValueError(f"--out {out} is inside --check-images {path}; choose a path outside it")
        if Path(path).is_file() and out.is_file() and os.path.samefile(path, out):
            raise ValueError(f"--out {out} is the --check-images file {path}; choose another name")
    record = read_run_record(run)
    features = run_features(run, record)
    calibration = read_calibration(run, record)
    primary = primary_score(record)
    device = torch.device("cpu")
    encoder = rebuild_encoder(features, device, weights=weights, log=log)
    scorer = load_scorer(run, device, calibrated=True, alpha=alpha)
    if features["precision"] != "fp32":
        log(f"note: the features were extracted with a {features['precision']} forward; the graph computes the "
            "backbone in float32")
    graph = ScoringGraph(encoder.encoder, scorer, features).eval()
    names = graph.output_names
    prep = preprocessing_only(features)
    transform = prep.transform(normalise=False)
    images = torch.stack([transform(image) for image in _load_images(check_images)])
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)  # once the run, its backbone and the check images are read
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    options = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(graph, (images[:1],), str(tmp), input_names=["images"], output_names=names,
                              dynamic_axes={name: {0: "batch"} for name in ["images", *names]},
                              opset_version=opset, do_constant_folding=True, **options)
        model = onnx.load(str(tmp))
        h, w = prep.size
        meta = {"run": run.name, "method": record["method"], "scores": ",".join(score_names(record)),
                "primary_score": primary, "calibrated": str(calibration is not None), "alpha": repr(alpha),
                "cache_fingerprint": record["cache_fingerprint"], "run_created": record.get("created", ""),
                "model_sha256": file_sha256(run / "model.safetensors"),
                "feature_transform": scorer.transform.name, "feature_transform_sha256": transform_sha256(run),
                "backbone": features["backbone"], "weights": features["weights_source"],
                "preprocessing": (f"float32 NCHW in [0, 1] (RGB, 8-bit values / 255) after {prep.describe()}, "
                                  f"as timm's eval transform (interpolation {features['interpolation']}, crop_pct "
                                  f"{features['crop_pct']}); the normalisation (mean {features['mean']}, std "
                                  f"{features['std']}) is in the graph"),
                "opset": str(opset)}
        for key, value in meta.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = METADATA_PREFIX + key, value
        onnx.save(model, str(tmp))
        session = onnx_session(tmp)
        got = dict(zip(names, session.run(names, {"images": images.numpy()}), strict=True))
        # the graph computes the backbone in float32: compare it with PyTorch in float32 too
        reference = CacheEncoder(encoder.encoder, {**features, "precision": "fp32"}, device, encoder.weights_note)
        expected = _reference(reference, scorer, images)
        diffs, scaled, absolute = {}, {}, {}
        for name in score_names(record):
            delta = np.abs(got[name] - expected[name])
            # the score's own scale: a relative difference means nothing where a score (a log-density) nears 0
            scale = float(np.mean(np.abs(calibration[name] if calibration is not None else expected[name])))
            diffs[name] = float(np.max(delta / np.maximum(np.abs(expected[name]), 1e-12)))
            scaled[name] = float(np.max(delta / np.maximum(np.abs(expected[name]), max(scale, 1e-12))))
            absolute[name] = float(np.max(delta))
        log("onnxruntime vs PyTorch on " + (f"{len(images)} check images" if check_images else
                                            f"{len(images)} real photographs (scikit-learn's sample images)")
            + ": largest relative difference " + ", ".join(f"{k} {v:.2e} (absolute {absolute[k]:.3g})"
                                                           for k, v in diffs.items()))
        bad = {k: v for k, v in scaled.items() if not v <= CHECK_TOLERANCE}
        if bad:
            raise ExportError(f"onnxruntime and PyTorch disagree on {', '.join(bad)} (difference "
                              f"{max(bad.values()):.2e} of max(|score|, the score's mean magnitude) > "
                              f"{CHECK_TOLERANCE}); nothing written")
        os.chmod(tmp, umask_mode(0o666))  # mkstemp made it 0600; a model is shared like any other output
        os.replace(tmp, out)
    except (ExportError, RunError):
        raise
    except Exception as err:  # torch.onnx.export and onnx raise many types for graphs they cannot write
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise ExportError(f"exporting {features['backbone']} / {record['method']} to ONNX failed: {first}") from err
    finally:
        tmp.unlink(missing_ok=True)
    return diffs


__all__ = ["CHECK_TOLERANCE", "ExportError", "OPSET", "ScoringGraph",
           "export_onnx", "sample_images"]
