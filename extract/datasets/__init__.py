"""Image sources of the extract stage: one sample index per split, served through torchvision datasets.

Each builder returns a :class:`DatasetSource`: class names, and per split (``train``, ``test``) a
torch ``Dataset`` yielding ``(image_tensor, label)`` together with the sample ids and labels known up
front, so that protocol counts can be checked before any image is decoded.

Modules, each importing only the ones above it:

- :mod:`~extract.datasets.images`: the errors (:class:`DatasetError`, :class:`ImageReadError`), reading one image
  (:func:`load_image`), and the checks that a dataset's image files are readable and reached once.
- :mod:`~extract.datasets.sources`: :class:`DatasetSource` / :class:`SplitSource` and the torch Datasets that
  serve images from arrays, file lists and class folders; :func:`check_source`.
- :mod:`~extract.datasets.protocols`: one builder per ``--dataset`` with its constants (classes, counts, splits),
  :data:`DATASETS` and :func:`build_dataset`.

This package re-exports their public names. A test that replaces one of them must patch the module that uses it
(``extract.datasets.protocols.CIFAR100_COUNTS``, not ``extract.datasets.CIFAR100_COUNTS``).
"""

from .images import (
    RESUME_ADVICE,
    DataAbsentError,
    DatasetError,
    ImageReadError,
    check_readable,
    check_unique_files,
    load_dataset_image,
    load_image,
)
from .protocols import (
    CATS_VS_DOGS_CLASSES,
    CATS_VS_DOGS_TEST,
    CATS_VS_DOGS_TRAIN,
    CIFAR10_CLASSES,
    CIFAR10_COUNTS,
    CIFAR100_COARSE_CLASSES,
    CIFAR100_COUNTS,
    CIFAR100_FINE_CLASSES,
    CIFAR100_FINE_TO_COARSE,
    CIFAR100_SUPERCLASSES,
    DATASETS,
    DIGIT_CLASSES,
    DIGITS_SPLIT_SEED,
    DIGITS_TEST_FRACTION,
    DOWNLOADED,
    FASHION_MNIST_FILES,
    FOLDER_LAYOUTS,
    STL10_CLASSES,
    build_cats_vs_dogs,
    build_cifar10,
    build_cifar100,
    build_dataset,
    build_digits,
    build_fashion_mnist,
    build_folder,
    build_good_defect,
    build_mnist,
    build_mvtec,
    build_stl10,
    build_svhn,
    mvtec_categories,
)
from .sources import (
    ArrayImages,
    DatasetSource,
    FileImages,
    LabelMap,
    SplitSource,
    ToRGB,
    VisibleImageFolder,
    check_source,
    unchecked_files,
)

__all__ = [
    # images
    "DataAbsentError", "DatasetError", "ImageReadError", "RESUME_ADVICE", "load_image", "load_dataset_image",
    "check_readable", "check_unique_files",
    # sources
    "SplitSource", "DatasetSource", "ToRGB", "ArrayImages", "FileImages", "LabelMap", "VisibleImageFolder",
    "unchecked_files", "check_source",
    # protocols
    "DATASETS", "DOWNLOADED", "FOLDER_LAYOUTS", "CIFAR10_CLASSES", "CIFAR10_COUNTS", "CIFAR100_COUNTS",
    "CIFAR100_SUPERCLASSES",
    "CIFAR100_COARSE_CLASSES", "CIFAR100_FINE_CLASSES", "CIFAR100_FINE_TO_COARSE", "STL10_CLASSES", "DIGIT_CLASSES",
    "FASHION_MNIST_FILES", "CATS_VS_DOGS_TRAIN", "CATS_VS_DOGS_TEST", "CATS_VS_DOGS_CLASSES", "DIGITS_TEST_FRACTION",
    "DIGITS_SPLIT_SEED", "build_dataset", "build_folder", "build_good_defect", "build_digits", "build_cifar10",
    "build_cifar100", "build_mnist", "build_fashion_mnist", "build_svhn", "build_stl10", "build_cats_vs_dogs",
    "build_mvtec", "mvtec_categories",
]
