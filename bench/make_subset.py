"""Build the image-folder trees of the feature study (docs/results.md, "Which features"): the standard test split
whole, and a random, seeded subset of each class's train images (the one-class protocol only ever fits on the
normal class's train rows, so fewer train images per class cut extraction time without touching the test set).

    python bench/make_subset.py cifar10 data/cifar10 data/c10_sub --train-per-class 1000
    python bench/make_subset.py fashion-mnist ../shared/data/fashion-mnist data/fm_sub --train-per-class 1000

``cifar10``: SOURCE is the unpacked ``cifar10-jpeg.tar.gz`` (``cifar10/{train,test}/<class>/NNNN.jpg``); files are
copied. ``fashion-mnist``: SOURCE holds the four gzipped idx files; images are written as 8-bit grayscale PNGs named
``<index in the split>.png``. The result is ``DEST/{train,test}/<class>/`` for ``extract --dataset folder``.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
from pathlib import Path

import numpy as np

FASHION_CLASSES = ["0-T-shirt-top", "1-Trouser", "2-Pullover", "3-Dress", "4-Coat", "5-Sandal", "6-Shirt",
                   "7-Sneaker", "8-Bag", "9-Ankle-boot"]  # index prefixes keep the folder order = the label order


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _choose(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if per_class > len(rows):
            sys.exit(f"--train-per-class {per_class}: class {c} has only {len(rows)} train images")
        chosen.append(np.sort(rng.choice(rows, per_class, replace=False)))
    return np.concatenate(chosen)


def cifar10(source: Path, dest: Path, per_class: int, seed: int) -> None:
    for split in ("train", "test"):
        files = sorted(p for p in (source / split).glob("*/*") if p.is_file())
        if not files:
            sys.exit(f"{source / split}: no images (expected <class>/<image> folders)")
        labels = np.array([p.parent.name for p in files])
        keep = _choose(labels, per_class, seed) if split == "train" else np.arange(len(files))
        for i in keep:
            out = dest / split / files[i].parent.name / files[i].name
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(files[i], out)
        print(f"{split}: {len(keep)} images -> {dest / split}")


def fashion_mnist(source: Path, dest: Path, per_class: int, seed: int) -> None:
    from PIL import Image

    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _idx(source / f"{prefix}-images-idx3-ubyte.gz")
        labels = _idx(source / f"{prefix}-labels-idx1-ubyte.gz")
        keep = _choose(labels, per_class, seed) if split == "train" else np.arange(len(labels))
        for i in keep:
            out = dest / split / FASHION_CLASSES[labels[i]] / f"{i:05d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(out)
        print(f"{split}: {len(keep)} images -> {dest / split}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=["cifar10", "fashion-mnist"])
    parser.add_argument("source", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.dest.exists():
        sys.exit(f"{args.dest} exists; remove it or choose another DEST")
    (cifar10 if args.dataset == "cifar10" else fashion_mnist)(args.source, args.dest, args.train_per_class,
                                                               args.seed)


if __name__ == "__main__":
    main()
