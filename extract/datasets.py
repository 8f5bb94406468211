"""Image sources of the extract stage: one sample index per split, served through torchvision datasets.

Each builder returns a :class:`DatasetSource`: class names, and per split (``train``, ``test``) a
torch ``Dataset`` yielding ``(image_tensor, label)`` together with the sample ids and labels known up
front, so that protocol counts can be checked before any image is decoded.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

DATASETS = ("cifar10", "fashion-mnist", "digits", "folder")

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_COUNTS = {"train": 5000, "test": 1000}
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                       "t10k-labels-idx1-ubyte")
#: Fixed stratified split of scikit-learn's digits: half of each class for test, seed 0.
DIGITS_TEST_FRACTION = 0.5
DIGITS_SPLIT_SEED = 0


class DatasetError(Exception):
    """A dataset's data root is missing, malformed, or cannot be downloaded."""


class ImageReadError(Exception):
    """An image file could not be decoded; the message names the file."""


@dataclass
class SplitSource:
    """One split: a Dataset of ``(image_tensor, label)`` with its sample ids and labels (N,)."""

    dataset: Dataset
    sample_ids: list[str]
    labels: np.ndarray


@dataclass
class DatasetSource:
    """A dataset ready for extraction.

    Attributes:
        name: dataset name as given to ``--dataset``.
        class_names: names of the label indices.
        splits: ``{"train": SplitSource, "test": SplitSource}``.
        description: where the images came from (recorded in the cache as ``data_source``).
    """

    name: str
    class_names: list[str]
    splits: dict[str, SplitSource]
    description: str

    def set_transform(self, transform: Callable) -> None:
        """Use ``transform`` (PIL image -> tensor) in every split's Dataset."""
        for part in self.splits.values():
            part.dataset.transform = transform


class ToRGB:
    """Convert a PIL image to 3-channel RGB (grayscale is repeated); picklable for DataLoader workers."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == "RGB" else image.convert("RGB")


class ArrayImages(Dataset):
    """Images held in a uint8 array (N, H, W) or (N, H, W, 3), served as transformed PIL images."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def load_image(path: str) -> Image.Image:
    """Open an image file fully (decode now, so a truncated file fails here).

    Raises:
        ImageReadError: the file cannot be read or decoded; the message names it.
    """
    try:
        with open(path, "rb") as handle:
            image = Image.open(handle)
            image.load()
    except Exception as err:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError)
        reason = str(err).replace(repr(handle), "").strip() if "handle" in locals() else str(err)
        raise ImageReadError(f"cannot read image {path}: {reason or type(err).__name__}") from None
    if image.mode.startswith("I;16"):  # 16-bit grayscale: keep the top 8 bits (PIL's convert would clip)
        return Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
    if image.mode in ("I", "F"):
        raise ImageReadError(f"cannot read image {path}: {image.mode!r} (32-bit) images have no defined 8-bit range")
    return image if image.mode in ("RGB", "L") else image.convert("RGB")


def _image_folder_split(root: Path, split: str, transform: Callable) -> tuple[list[str], SplitSource]:
    from torchvision.datasets import ImageFolder

    folder = root / split
    try:
        dataset = ImageFolder(str(folder), transform=transform, loader=load_image)
    except (FileNotFoundError, OSError) as err:
        raise DatasetError(f"--data-root {root}: cannot index {folder}: {err}") from None
    seen: dict[str, str] = {}
    for path, _ in dataset.samples:  # ImageFolder follows directory links: a loop would repeat images
        real = os.path.realpath(path)
        if real in seen:
            raise DatasetError(f"--data-root {root}: the image {real} is reached twice ({seen[real]} and {path}); "
                               "remove the duplicate or the directory link")
        seen[real] = path
    ids = [Path(p).relative_to(root).as_posix() for p, _ in dataset.samples]
    labels = np.asarray(dataset.targets, dtype=np.int64)
    return list(dataset.classes), SplitSource(dataset, ids, labels)


def build_folder(root: Path, transform: Callable, name: str = "folder") -> DatasetSource:
    """A generic tree ``root/{train,test}/<class>/<image>``; classes sorted by name (torchvision ImageFolder).

    Raises:
        DatasetError: a split folder is missing, holds no images, or train and test classes differ.
    """
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DatasetError(f"--data-root {root}: expected folders {root}/train/<class>/ and "
                               f"{root}/test/<class>/; {root / split} is missing")
    train_classes, train = _image_folder_split(root, "train", transform)
    test_classes, test = _image_folder_split(root, "test", transform)
    if train_classes != test_classes:
        raise DatasetError(f"--data-root {root}: train classes {train_classes} differ from test classes "
                           f"{test_classes}")
    return DatasetSource(name, train_classes, {"train": train, "test": test}, f"image folder {root.resolve()}")


def build_digits(transform: Callable) -> DatasetSource:
    """scikit-learn's bundled 8x8 digits (1,797 images, no download), split 50/50 per class.

    Pixel values 0..16 are scaled to 0..255 (uint8). The split is
    ``sklearn.model_selection.train_test_split(test_size=0.5, stratify=labels, random_state=0)``,
    each split kept in original index order; sample ids are ``digits/<original index>``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION,
                                           stratify=labels, random_state=DIGITS_SPLIT_SEED)
    splits = {}
    for split, idx in (("train", np.sort(train_idx)), ("test", np.sort(test_idx))):
        splits[split] = SplitSource(ArrayImages(images[idx], labels[idx], transform),
                                    [f"digits/{i:04d}" for i in idx], labels[idx])
    return DatasetSource("digits", [str(i) for i in range(10)], splits,
                         "sklearn.datasets.load_digits (bundled with scikit-learn)")


def _torchvision_split(dataset, split: str) -> SplitSource:
    labels = np.asarray(dataset.targets, dtype=np.int64)
    return SplitSource(dataset, [f"{split}/{i:05d}" for i in range(len(labels))], labels)


def build_cifar10(data_root: Path | None, download: bool, transform: Callable) -> DatasetSource:
    """CIFAR-10: torchvision's CIFAR10, or an image-folder tree of the ten canonical class folders.

    With ``data_root`` holding ``train/<class>/`` folders, the tree is used after checking the class
    names and the counts (5,000 train / 1,000 test per class). Otherwise torchvision's CIFAR10 reads
    (or, when ``download``, fetches) ``cifar-10-batches-py`` under ``data_root`` (default ``./data``).

    Raises:
        DatasetError: wrong class folders or counts, missing data with downloading disabled, or a
            failed download.
    """
    if data_root is not None and (data_root / "train").is_dir():
        source = build_folder(data_root, transform, name="cifar10")
        if tuple(source.class_names) != CIFAR10_CLASSES:
            raise DatasetError(f"--data-root {data_root}: class folders must be the CIFAR-10 names "
                               f"{list(CIFAR10_CLASSES)}; found {source.class_names}")
        for split, expected in CIFAR10_COUNTS.items():
            counts = np.bincount(source.splits[split].labels, minlength=10)
            if not (counts == expected).all():
                raise DatasetError(f"--data-root {data_root}: CIFAR-10 {split} must hold {expected} images per "
                                   f"class; found {dict(zip(CIFAR10_CLASSES, counts.tolist()))}")
        source.description = f"CIFAR-10 image folders {data_root.resolve()}"
        return source
    from torchvision.datasets import CIFAR10

    root = data_root or Path("data")
    splits = {}
    for split in ("train", "test"):
        dataset = _torchvision_dataset(CIFAR10, "cifar10", root, download, transform, train=(split == "train"),
                                       expected=f"{root}/cifar-10-batches-py/ or {root}/train/<class>/")
        splits[split] = _torchvision_split(dataset, split)
    return DatasetSource("cifar10", list(CIFAR10_CLASSES), splits,
                         f"torchvision.datasets.CIFAR10 {Path(root).resolve()}")


def _torchvision_dataset(cls, name: str, root: Path, download: bool, transform: Callable, expected: str,
                         **kwargs):
    try:
        return cls(str(root), download=download, transform=transform, **kwargs)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted..."
        if download:
            first = str(err).strip().splitlines()[0].rstrip(":") if str(err).strip() else type(err).__name__
            raise DatasetError(f"--dataset {name}: data not found under --data-root {root} (expected {expected}) "
                               f"and downloading it failed ({first}; no network?); download it elsewhere and "
                               "pass --data-root") from None
        raise DatasetError(f"--dataset {name}: data not found under --data-root {root} (expected {expected}); "
                           "downloading is disabled (--no-download)") from None
    except OSError as err:  # URLError and socket errors are OSErrors: no network
        raise DatasetError(f"--dataset {name}: data not found under --data-root {root} (expected {expected}) "
                           f"and the download failed ({err}); download it elsewhere or pass --data-root") from None


def _stage_fashion_mnist(data_root: Path, staging: Path) -> bool:
    """Lay the four idx files (plain or .gz) found in ``data_root`` out as torchvision expects.

    Returns True when all four were found (then ``staging/FashionMNIST/raw`` holds them decompressed).
    """
    raw = staging / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for base in FASHION_MNIST_FILES:
        for candidate in (data_root / base, data_root / "FashionMNIST" / "raw" / base):
            if candidate.is_file():
                shutil.copyfile(candidate, raw / base)
                break
            gz = candidate.with_name(candidate.name + ".gz")
            if gz.is_file():
                try:
                    with gzip.open(gz, "rb") as src, open(raw / base, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                except (EOFError, OSError) as err:  # truncated or damaged (gzip.BadGzipFile is an OSError)
                    raise DatasetError(f"--data-root {data_root}: damaged Fashion-MNIST file {gz} ({err})") from None
                break
        else:
            return False
    return True


def build_fashion_mnist(data_root: Path | None, download: bool, transform: Callable) -> DatasetSource:
    """Fashion-MNIST via torchvision's FashionMNIST (60,000 train / 10,000 test, 28x28 grayscale).

    With ``data_root`` holding the four standard idx files (plain or ``.gz``, directly or under
    ``FashionMNIST/raw/``), they are decompressed to a temporary folder and read by torchvision;
    otherwise torchvision reads or downloads under ``data_root`` (default ``./data``).

    Raises:
        DatasetError: files missing with downloading disabled, a failed download, or unreadable files.
    """
    from torchvision.datasets import FashionMNIST

    root = data_root or Path("data")
    expected = "the four idx files " + ", ".join(f + "[.gz]" for f in FASHION_MNIST_FILES)
    with tempfile.TemporaryDirectory(prefix="sanf-fmnist-") as staging:
        staged = False
        if data_root is not None:
            staged = _stage_fashion_mnist(data_root, Path(staging))
        splits = {}
        for split in ("train", "test"):
            if staged:
                try:
                    dataset = FashionMNIST(staging, train=(split == "train"), transform=transform, download=False)
                except (RuntimeError, ValueError, AssertionError, EOFError, IndexError) as err:
                    raise DatasetError(f"--data-root {data_root}: the Fashion-MNIST idx files are damaged "
                                       f"({type(err).__name__}: {str(err).strip()[:200] or 'bad header or size'})"
                                       ) from None
            else:
                dataset = _torchvision_dataset(FashionMNIST, "fashion-mnist", root, download, transform,
                                               train=(split == "train"), expected=expected)
            if len(dataset.data) != len(dataset.targets):
                raise DatasetError(f"--data-root {root}: Fashion-MNIST {split} has {len(dataset.data)} images but "
                                   f"{len(dataset.targets)} labels")
            splits[split] = _torchvision_split(dataset, split)
        origin = (f"idx files in {data_root.resolve()}" if staged
                  else f"torchvision download root {Path(root).resolve()}")
    return DatasetSource("fashion-mnist", list(FashionMNIST.classes), splits,
                         f"torchvision.datasets.FashionMNIST from {origin}")


def build_dataset(name: str, data_root: str | Path | None, download: bool, transform: Callable) -> DatasetSource:
    """Build one of ``DATASETS``.

    Args:
        name: ``cifar10``, ``fashion-mnist``, ``digits`` or ``folder``.
        data_root: folder with the data (required for ``folder``).
        download: allow torchvision to download missing data.
        transform: PIL image -> (3, H, W) float tensor.

    Raises:
        DatasetError: unknown name, or the data cannot be found, checked or fetched.
    """
    root = Path(data_root) if data_root is not None else None
    if root is not None and root.exists() and not root.is_dir():
        raise DatasetError(f"--data-root {root} is not a directory")
    if root is not None and not root.exists() and (name == "folder" or not download):
        raise DatasetError(f"--data-root {root} does not exist")
    if name == "digits":
        return build_digits(transform)
    if name == "cifar10":
        return build_cifar10(root, download, transform)
    if name == "fashion-mnist":
        return build_fashion_mnist(root, download, transform)
    if name == "folder":
        if root is None:
            raise DatasetError("--dataset folder needs --data-root DIR holding DIR/train/<class>/ and DIR/test/<class>/")
        return build_folder(root, transform)
    raise DatasetError(f"--dataset must be one of {', '.join(DATASETS)}; got {name!r}")
