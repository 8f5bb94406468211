"""Sample sources of the extract stage: what a dataset builder returns, and the torch Datasets that serve images.

A :class:`DatasetSource` holds class names and per split (``train``, ``test``) a :class:`SplitSource`: a torch
``Dataset`` yielding ``(image_tensor, label)`` with the sample ids and labels known up front, so that protocol
counts can be checked before any image is decoded. The Datasets here serve images from arrays
(:class:`ArrayImages`), from lists of files (:class:`FileImages`) or from class folders
(:class:`VisibleImageFolder`, read by ``_folder_split``); :func:`check_source` checks a built source's labels.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from .images import DatasetError, _few, _visible_image, load_dataset_image


@dataclass
class SplitSource:
    """One split: a Dataset of ``(image_tensor, label)`` with its sample ids and labels (N,); ``fine_labels``
    (N,) only for datasets with a second label level (CIFAR-100's fine classes)."""

    dataset: Dataset
    sample_ids: list[str]
    labels: np.ndarray
    fine_labels: np.ndarray | None = None


@dataclass
class DatasetSource:
    """A dataset ready for extraction.

    Attributes:
        name: dataset name as given to ``--dataset``.
        class_names: names of the label indices.
        splits: ``{"train": SplitSource, "test": SplitSource}``.
        description: where the images came from (recorded in the cache as ``data_source``).
        fine_class_names: names of ``SplitSource.fine_labels`` (CIFAR-100), else None.
        normal_classes: the classes that can be the normal class (good/defect layouts: ``good``); None: all.
        skipped_files: files of the dataset left out because they are not readable images (Cats vs Dogs).
    """

    name: str
    class_names: list[str]
    splits: dict[str, SplitSource]
    description: str
    fine_class_names: list[str] | None = None
    skipped_files: list[str] | None = None
    normal_classes: list[str] | None = None

    def take_train_subset(self, per_class: int, seed: int) -> None:
        """Keep ``per_class`` train images of each class, drawn without replacement by
        ``numpy.random.default_rng(seed)`` (one permutation per class, in class order) and kept in their original
        order; classes without train images stay so, the test split is untouched.

        Raises:
            DatasetError: ``per_class`` is below 1, or a class has fewer train images than ``per_class``.
        """
        if per_class < 1:
            raise DatasetError(f"--train-per-class must be at least 1; got {per_class}")
        part = self.splits["train"]
        labels = np.asarray(part.labels)
        rng = np.random.default_rng(seed)
        chosen = []
        for c, name in enumerate(self.class_names):
            rows = np.flatnonzero(labels == c)
            if not len(rows):  # a class with no train images (the defect types of a good/defect layout)
                continue
            if len(rows) < per_class:
                raise DatasetError(f"--train-per-class {per_class}: class {name!r} of {self.name} has "
                                   f"{len(rows)} train images")
            chosen.append(rows[rng.permutation(len(rows))[:per_class]])
        rows = np.sort(np.concatenate(chosen))
        self.splits["train"] = SplitSource(
            SampledImages(part.dataset, rows), [part.sample_ids[i] for i in rows], labels[rows],
            None if part.fine_labels is None else np.asarray(part.fine_labels)[rows])
        self.description += f"; train: {per_class} images per class (seed {seed})"

    def set_transform(self, transform: Callable) -> None:
        """Use ``transform`` (PIL image -> tensor) in every split's Dataset."""
        for part in self.splits.values():
            part.dataset.transform = transform


class SampledImages(Dataset):
    """The rows ``indices`` of another Dataset (its transform is the base's)."""

    def __init__(self, base: Dataset, indices: np.ndarray) -> None:
        self.base = base
        self.indices = [int(i) for i in indices]

    @property
    def transform(self) -> Callable:
        return self.base.transform

    @transform.setter
    def transform(self, value: Callable) -> None:
        self.base.transform = value

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.base[self.indices[index]]


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


class VisibleImageFolder(ImageFolder):
    """torchvision ``ImageFolder`` that ignores hidden class folders (``.ipynb_checkpoints``) and hidden files, or,
    with ``fixed_classes``, indexes exactly those class folders in that order (indices 0, 1, ...)."""

    def __init__(self, root: str, fixed_classes: list[str] | None = None, **kwargs) -> None:
        self.fixed_classes = fixed_classes
        super().__init__(root, loader=load_dataset_image, is_valid_file=functools.partial(_visible_image, root=root),
                         **kwargs)

    def find_classes(self, directory):  # torchvision's hook for choosing the classes
        names = self.fixed_classes if self.fixed_classes is not None else sorted(
            e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not names:
            raise FileNotFoundError(f"no class folder in {directory}")
        return list(names), {c: i for i, c in enumerate(names)}


def _folder_split(root: Path, split: str, transform: Callable, option: str = "--data-root",
                  classes: list[str] | None = None, empty_hint: str = "") -> tuple[list[str], SplitSource]:
    """Index ``root/split/<class>/<image>`` (every class folder, or the ``classes`` folders in that order).

    Raises:
        DatasetError: the folder cannot be indexed, image files lie in it outside any class folder, or a class
            folder holds no images (the message adds ``empty_hint``).
    """
    folder = root / split
    names = "<class>" if classes is None else classes[0] if len(classes) == 1 else "{" + ",".join(classes) + "}"
    expected = f"{folder}/{names}/<image>"
    try:
        stray = sorted(e.name for e in os.scandir(folder) if e.is_file() and _visible_image(e.path))
        dataset = VisibleImageFolder(str(folder), classes, transform=transform, allow_empty=True)
    except (FileNotFoundError, OSError) as err:
        raise DatasetError(f"{option} {root}: cannot index {folder}: {err}") from None
    if stray:  # ImageFolder would leave them out without a word
        raise DatasetError(f"{option} {root}: {split}/ holds {len(stray)} image files outside any class folder "
                           f"({_few(stray)}); images must lie in {expected}: move them into class folders")
    counts = np.bincount(np.asarray(dataset.targets, dtype=np.int64), minlength=len(dataset.classes))
    empty = [c for c, n in zip(dataset.classes, counts, strict=True) if n == 0]
    if empty:
        raise DatasetError(f"{option} {root}: the class folder{'s' if len(empty) > 1 else ''} "
                           f"{', '.join(f'{split}/{c}/' for c in empty)} hold{'' if len(empty) > 1 else 's'} no "
                           f"images; every class needs images in {expected}{empty_hint}")
    ids = [Path(p).relative_to(root).as_posix() for p, _ in dataset.samples]
    for name in ids:  # a name in another encoding than UTF-8 cannot be stored as a sample id (nor in the CSVs)
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise DatasetError(f"{option} {root}: the file name {shown!r} is not valid UTF-8; rename it") from None
    labels = np.asarray(dataset.targets, dtype=np.int64)
    return list(dataset.classes), SplitSource(dataset, ids, labels)


class LabelMap:
    """``target -> table[target]``: a picklable target transform (CIFAR-100 fine class -> superclass)."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = np.asarray(table, dtype=np.int64)

    def __call__(self, target: int) -> int:
        return int(self.table[target])


class FileImages(Dataset):
    """Image files with labels, read with :func:`load_image` and transformed."""

    def __init__(self, paths: list[str], labels: np.ndarray, transform: Callable) -> None:
        self.paths = paths
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_dataset_image(self.paths[index])), int(self.labels[index])


def unchecked_files(dataset: Dataset) -> list[str]:
    """The image files of a split's Dataset, by row, that no builder decoded yet: those of a folder tree taken as
    it is; [] for images held in arrays, and for Cats vs Dogs, whose builder decoded every file to skip the
    unreadable ones."""
    if isinstance(dataset, SampledImages):
        files = unchecked_files(dataset.base)
        return [files[i] for i in dataset.indices] if files else []
    return [path for path, _ in dataset.samples] if isinstance(dataset, VisibleImageFolder) else []


def check_source(source: DatasetSource) -> None:
    """Refuse a dataset whose labels cannot be stored: per split as many labels and sample ids as images, labels
    (and fine labels) in range; checked before any image is encoded.

    Raises:
        DatasetError: names the split, the first bad sample and the allowed range.
    """
    for split, part in source.splits.items():
        n = len(part.dataset)
        labels = np.asarray(part.labels)
        if labels.ndim != 1 or len(labels) != n or len(part.sample_ids) != n:
            raise DatasetError(f"--dataset {source.name}: the {split} split has {n} images but {labels.size} labels "
                               f"and {len(part.sample_ids)} sample ids")
        for values, names, what in ((labels, source.class_names, "label"),
                                    (part.fine_labels, source.fine_class_names, "fine label")):
            if values is None or not len(values):
                continue
            bad = np.flatnonzero((values < 0) | (values >= len(names)))
            if bad.size:
                i = int(bad[0])
                raise DatasetError(f"--dataset {source.name}: {split} image {part.sample_ids[i]!r} has {what} "
                                   f"{int(values[i])}, outside 0..{len(names) - 1} ({bad.size} such images)")
    if source.normal_classes is not None and not set(source.normal_classes) <= set(source.class_names):
        raise DatasetError(f"--dataset {source.name}: normal classes {source.normal_classes} are not all classes")
