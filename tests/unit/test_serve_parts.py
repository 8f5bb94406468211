"""The service's parts without a server: the decision threshold the page draws, the settings' checks, and how an
upload that is not a readable image is named."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from flow.deploy.serve import ServeConfig, UploadError, calibration_summary, decode_upload
from flow.detectors.calibration import conformal_p_values


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2, 0.5, 0.9])
def test_the_threshold_flags_exactly_the_scores_whose_p_value_is_at_most_alpha(alpha):
    rng = np.random.default_rng(1)
    calibration = np.round(rng.normal(size=19), 1)  # ties included
    summary = calibration_summary(calibration, alpha)
    scores = np.concatenate([calibration, rng.normal(size=200), [calibration.max() + 1]])
    flagged = conformal_p_values(calibration, scores) <= alpha
    assert np.array_equal(flagged, scores > summary["threshold"])
    assert summary["n"] == 19 and sum(summary["counts"]) == 19 and len(summary["edges"]) == 31


def test_no_threshold_when_no_p_value_can_reach_alpha():
    assert calibration_summary(np.arange(5.0), 0.05)["threshold"] is None  # the smallest p-value is 1/6
    assert calibration_summary(None, 0.05) is None


@pytest.mark.parametrize("kwargs, message", [
    ({"alpha": 1.5}, "alpha"), ({"max_batch": 0}, "--max-batch must be an integer in 1..4096; got 0"),
    ({"max_upload_mb": 0}, "--max-upload-mb must be a finite number > 0; got 0"),
    ({"max_upload_mb": float("nan")}, "--max-upload-mb"), ({"token": " "}, "--token must not be empty"),
    ({"token": "s3cret "}, "--token must be printable ASCII without spaces at either end"),
    ({"token": "pässwort"}, "--token must be printable ASCII")])
def test_bad_settings_are_refused_naming_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ServeConfig(**kwargs)


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


def test_an_upload_too_large_once_resized_is_refused_before_it_is_decoded():
    thin = _png(np.zeros((1, 200_000), dtype=np.uint8))  # 200,000 pixels: a 224 x 44,800,000 image once resized
    with pytest.raises(UploadError) as caught:
        decode_upload("thin.png", thin, max_pixels=40_000_000, resize_side=224)
    assert caught.value.status == 413 and "200000 x 1 pixels: resized to 224 px on its shorter side it would have " \
        "10,035,200,000 pixels" in caught.value.reason
    assert decode_upload("thin.png", thin, max_pixels=40_000_000).size == (200_000, 1)  # no resize: accepted
    assert decode_upload("w.png", _png(np.zeros((200, 800), dtype=np.uint8)), resize_side=224).size == (800, 200)


def test_uploads_are_read_as_predict_reads_files_and_bad_ones_named():
    sixteen = _png(np.full((4, 4), 0xABCD, dtype=np.uint16))
    assert np.asarray(decode_upload("s.png", sixteen)).max() == 0xAB  # 16-bit: the top 8 bits, as load_image
    rgba = decode_upload("a.png", _png(np.zeros((4, 4, 4), dtype=np.uint8)))
    assert rgba.mode == "RGB"
    good = _png(np.zeros((32, 32, 3), dtype=np.uint8))
    f32 = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), dtype=np.float32)).save(f32, "TIFF")
    for data, reason in ((b"hello", "not an image"), (good[:len(good) // 2], "truncated"), (b"", "truncated"),
                         (f32.getvalue(), "cannot be read ('F' (32-bit) images")):
        with pytest.raises(UploadError) as caught:
            decode_upload("x.png", data)
        assert caught.value.status == 422 and caught.value.file == "x.png" and reason in caught.value.reason
        assert "object at 0x" not in caught.value.reason
