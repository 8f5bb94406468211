"""Shared fixtures: generated caches and image trees, and the real data in ../shared/data when present."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` (real CIFAR-10, Fashion-MNIST, photos); skips the test when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


def cache_attrs(class_names, feature_dim, patch_grid, **overrides) -> dict:
    """Root attributes of a generated cache (every required key)."""
    attrs = {
        "dataset": "generated", "data_source": "tests", "class_names": list(class_names),
        "backbone": "none", "weights_source": "none", "weights_sha256": "", "semantic_vector": "class_token",
        "num_prefix_tokens": 1, "timm_version": "0", "torch_version": "0", "input_size": [3, 8, 8],
        "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
        "token_grid": list(patch_grid), "patch_grid": list(patch_grid), "feature_dim": feature_dim,
        "num_patches": patch_grid[0] * patch_grid[1], "precision": "fp32", "dtype": "float32",
    }
    attrs.update(overrides)
    return attrs


def write_cache(path: Path, splits: dict, class_names, patch_grid=(2, 2), dtype="float32", **attr_overrides) -> Path:
    """Write a cache from ``{split: (cls (N,D), patches (N,P,D), labels (N,))}``."""
    from cache import CacheWriter

    any_cls = next(iter(splits.values()))[0]
    d = any_cls.shape[1]
    with CacheWriter(path, overwrite=True) as writer:
        for split, (cls, patches, labels) in splits.items():
            writer.create_split(split, len(cls), d, patches.shape[1], dtype)
            if len(cls):
                writer.write(split, 0, cls.astype(dtype), patches.astype(dtype), labels,
                             [f"{split}/{i}" for i in range(len(cls))])
        return writer.finish(cache_attrs(class_names, d, patch_grid, dtype=dtype, **attr_overrides))


def gaussian_splits(n_train=40, n_test=20, dim=6, grid=(2, 2), num_classes=3, shift=6.0, seed=0) -> dict:
    """Class k as the Gaussian N(shift * e_k, I) in the class token (e_k the k-th unit vector, so every two
    classes lie shift * sqrt(2) apart); patch tokens are noisy copies of the class token."""
    rng = np.random.default_rng(seed)
    p = grid[0] * grid[1]
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.repeat(np.arange(num_classes), n)
        cls = rng.standard_normal((len(labels), dim)) + shift * np.eye(dim)[labels]
        patches = cls[:, None, :] + 0.1 * rng.standard_normal((len(labels), p, dim))
        out[split] = (cls.astype(np.float32), patches.astype(np.float32), labels.astype(np.int64))
    return out


@pytest.fixture
def gaussian_cache(tmp_path) -> Path:
    """A small complete cache: 3 classes, D = 6, 2 x 2 patch grid, 40 train / 20 test rows per class."""
    return write_cache(tmp_path / "cache" / "gauss.h5", gaussian_splits(), ["a", "b", "c"])


def make_image_tree(root: Path, classes=("blue", "red"), per_split=None, size=12, seed=0) -> Path:
    """Write ``root/{train,test}/<class>/<i>.png`` with class-coloured noise images."""
    from PIL import Image

    per_split = per_split or {"train": 4, "test": 3}
    rng = np.random.default_rng(seed)
    for split, n in per_split.items():
        for k, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.zeros((size, size, 3), dtype=np.float64)
                base[..., k % 3] = 200
                img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture
def image_tree(tmp_path) -> Path:
    """A tiny two-class image-folder dataset (4 train / 3 test per class, 12 x 12 px)."""
    return make_image_tree(tmp_path / "images")


@contextlib.contextmanager
def process_holding(code: str, *args: str):
    """A Python process running ``code`` (with ``args`` in ``sys.argv[1:]``) from the project root, yielded once it
    printed ``ready``; killed (SIGKILL) and reaped on leaving the block."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stdout.close()


#: ``process_holding`` code: a process that opens (or resumes) the extraction of the cache ``argv[1]`` with the plan
#: ``argv[2]`` (JSON, see :class:`cache.ChunkStore`) and keeps working on it, holding its lock.
RUNNING_EXTRACTION = ("import json, sys, time; from cache import ChunkStore; "
                      "store = ChunkStore(sys.argv[1], json.loads(sys.argv[2]), log=lambda _: None); "
                      "print('ready', flush=True); time.sleep(60)")
