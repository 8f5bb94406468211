"""Dataset protocols of the extract stage: one builder per ``--dataset`` (which files, which classes, which
images are train and which test), and :func:`build_dataset`, which checks the options and calls one.

Each builder returns a :class:`~extract.datasets.sources.DatasetSource` (see :mod:`extract.datasets.sources`);
image reading and the readability checks are in :mod:`extract.datasets.images`.
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from .images import DataAbsentError, DatasetError, _few, _readable, check_unique_files
from .sources import ArrayImages, DatasetSource, FileImages, LabelMap, SplitSource, _folder_split, check_source

DATASETS = ("cifar10", "cifar100", "stl10", "mnist", "svhn", "fashion-mnist", "cats-vs-dogs", "mvtec", "digits",
            "folder")
#: the datasets torchvision downloads when they are not under ``--data-root`` (and downloading is allowed)
DOWNLOADED = ("cifar10", "cifar100", "stl10", "mnist", "svhn", "fashion-mnist")
#: ``--layout`` of ``--dataset folder``: class folders (one class normal, the rest anomalous) or MVTec-style
#: ``good``/defect folders (``good`` normal, every defect type anomalous).
FOLDER_LAYOUTS = ("classes", "good-defect")

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_COUNTS = {"train": 5000, "test": 1000}
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                       "t10k-labels-idx1-ubyte")
#: Images per class of each split in the standard releases (checked for the image-folder forms).
CIFAR100_COUNTS = {"train": 2500, "test": 500}  # per superclass; 500 / 100 per fine class
#: Cats vs Dogs protocol (docs/method.md section 8): per class, the first 10,000 readable images (by file number)
#: are train, the next 2,500 test.
CATS_VS_DOGS_TRAIN = 10000
CATS_VS_DOGS_TEST = 2500
CATS_VS_DOGS_CLASSES = ("cat", "dog")
#: Fixed stratified split of scikit-learn's digits: half of each class for test, seed 0.
DIGITS_TEST_FRACTION = 0.5
DIGITS_SPLIT_SEED = 0


def build_folder(root: Path, transform: Callable, name: str = "folder") -> DatasetSource:
    """A generic tree ``root/{train,test}/<class>/<image>``; classes sorted by name (torchvision ImageFolder).

    Raises:
        DatasetError: a split folder is missing or holds no class folder, a class folder holds no images (for
            ``folder``, the message points to ``--layout good-defect``), image files lie outside the class folders,
            or train and test classes differ.
    """
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DatasetError(f"--data-root {root}: expected folders {root}/train/<class>/ and "
                               f"{root}/test/<class>/; {root / split} is missing")
    # --layout classes takes every class folder as a class of both splits; a tree of normal train images only
    # (MVTec-style) is what --layout good-defect reads
    hint = (f"; for normal images only in train/ ({root}/train/good/, {root}/test/good/, {root}/test/<defect type>/) "
            "pass --layout good-defect" if name == "folder" else "")
    train_classes, train = _folder_split(root, "train", transform, empty_hint=hint)
    test_classes, test = _folder_split(root, "test", transform, empty_hint=hint)
    if train_classes != test_classes:
        hint = ("; for MVTec-style good/defect folders pass --layout good-defect"
                if train_classes == ["good"] and "good" in test_classes else "")
        raise DatasetError(f"--data-root {root}: train classes {train_classes} differ from test classes "
                           f"{test_classes}{hint}")
    check_unique_files(root, [p for part in (train, test) for p, _ in part.dataset.samples])
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


def _torchvision_split(dataset, split: str, labels=None) -> SplitSource:
    labels = np.asarray(dataset.targets if labels is None else labels, dtype=np.int64)
    return SplitSource(dataset, [f"{split}/{i:05d}" for i in range(len(labels))], labels)


def _check_counts(where: str, name: str, split: str, labels: np.ndarray, class_names, expected: int) -> None:
    """Refuse a split whose images per class (from ``labels``) are not all ``expected``; names the wrong classes."""
    counts = np.bincount(labels, minlength=len(class_names))
    if not (counts == expected).all():
        wrong = {c: int(n) for c, n in zip(class_names, counts, strict=True) if n != expected}
        raise DatasetError(f"{where}: {name} {split} must hold {expected} images per class; found {wrong}")


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
            _check_counts(f"--data-root {data_root}", "CIFAR-10", split, source.splits[split].labels, CIFAR10_CLASSES,
                          expected)
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


def _release_files(dataset_class, root: Path, kwargs: dict) -> list[Path]:
    """The files of a torchvision dataset class that it checks (CIFAR, STL-10: ``base_folder`` + file lists; SVHN:
    the split's .mat)."""
    if hasattr(dataset_class, "base_folder") and hasattr(dataset_class, "train_list"):
        files = dataset_class.train_list + dataset_class.test_list
        return [Path(root) / dataset_class.base_folder / n for n, _ in files]
    if hasattr(dataset_class, "split_list") and "split" in kwargs:
        return [Path(root) / dataset_class.split_list[kwargs["split"]][1]]
    return []


def _torchvision_dataset(dataset_class, name: str, root: Path, download: bool, transform: Callable, expected: str,
                         **kwargs):
    try:
        return dataset_class(str(root), download=download, transform=transform, **kwargs)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted..."; scipy: v7.3 .mat files
        first = str(err).strip().splitlines()[0].rstrip(":") if str(err).strip() else type(err).__name__
        files = _release_files(dataset_class, root, kwargs)
        if files and all(f.is_file() for f in files):
            raise DatasetError(f"--dataset {name}: the files under --data-root {root} are present but torchvision "
                               f"refused them ({first}); they are damaged, incomplete or of another release "
                               "(torchvision checks their MD5)") from None
        if download:
            raise DataAbsentError(f"--dataset {name}: data not found under --data-root {root} (expected {expected}) "
                               f"and downloading it failed ({first}; no network?); download it elsewhere and "
                               "pass --data-root") from None
        raise DataAbsentError(f"--dataset {name}: data not found under --data-root {root} (expected {expected}); "
                           "downloading is disabled (--no-download)") from None
    except OSError as err:  # URLError and socket errors are OSErrors: no network
        raise DataAbsentError(f"--dataset {name}: data not found under --data-root {root} (expected {expected}) "
                           f"and the download failed ({err}); download it elsewhere or pass --data-root") from None


def _check_arrays(name: str, root: Path, split: str, data: np.ndarray, labels, image_shape: tuple) -> None:
    """Refuse a torchvision array dataset whose images are not (N, *image_shape) or whose labels are not (N,)."""
    labels = np.asarray(labels)
    if data.ndim != 1 + len(image_shape) or tuple(data.shape[1:]) != image_shape or labels.shape != data.shape[:1]:
        raise DatasetError(f"--dataset {name}: the {split} files under --data-root {root} hold images of shape "
                           f"{tuple(data.shape)} and labels of shape {labels.shape}; expected (N, "
                           f"{', '.join(map(str, image_shape))}) and (N,)")


def _stage_idx_files(data_root: Path, staging: Path, folder: str, title: str) -> bool:
    """Lay the four idx files (plain or .gz) found in ``data_root`` out as torchvision expects.

    Returns True when all four were found (then ``staging/<folder>/raw`` holds them decompressed).
    """
    raw = staging / folder / "raw"
    raw.mkdir(parents=True)
    for base in FASHION_MNIST_FILES:
        for candidate in (data_root / base, data_root / folder / "raw" / base):
            if candidate.is_file():
                shutil.copyfile(candidate, raw / base)
                break
            gz = candidate.with_name(candidate.name + ".gz")
            if gz.is_file():
                try:
                    with gzip.open(gz, "rb") as src, open(raw / base, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                except (EOFError, OSError) as err:  # truncated or damaged (gzip.BadGzipFile is an OSError)
                    raise DatasetError(f"--data-root {data_root}: damaged {title} file {gz} ({err})") from None
                break
        else:
            return False
    return True


def _build_idx(name: str, title: str, dataset_class, class_names: list[str], data_root: Path | None, download: bool,
               transform: Callable) -> DatasetSource:
    root = data_root or Path("data")
    folder = dataset_class.__name__  # torchvision's raw folder: <root>/<class name>/raw
    expected = "the four idx files " + ", ".join(f + "[.gz]" for f in FASHION_MNIST_FILES)
    with tempfile.TemporaryDirectory(prefix=f"sanf-{name}-") as staging:
        staged = False
        if data_root is not None:
            staged = _stage_idx_files(data_root, Path(staging), folder, title)
        splits = {}
        for split in ("train", "test"):
            if staged:
                try:
                    dataset = dataset_class(staging, train=(split == "train"), transform=transform, download=False)
                except (RuntimeError, ValueError, AssertionError, EOFError, IndexError) as err:
                    raise DatasetError(f"--data-root {data_root}: the {title} idx files are damaged "
                                       f"({type(err).__name__}: {str(err).strip()[:200] or 'bad header or size'})"
                                       ) from None
            else:
                dataset = _torchvision_dataset(dataset_class, name, root, download, transform,
                                               train=(split == "train"), expected=expected)
            if len(dataset.data) != len(dataset.targets):
                raise DatasetError(f"--data-root {root}: {title} {split} has {len(dataset.data)} images but "
                                   f"{len(dataset.targets)} labels")
            splits[split] = _torchvision_split(dataset, split)
        origin = (f"idx files in {data_root.resolve()}" if staged
                  else f"torchvision download root {Path(root).resolve()}")
    return DatasetSource(name, class_names, splits, f"torchvision.datasets.{folder} from {origin}")


def build_fashion_mnist(data_root: Path | None, download: bool, transform: Callable) -> DatasetSource:
    """Fashion-MNIST via torchvision's FashionMNIST (60,000 train / 10,000 test, 28x28 grayscale).

    With ``data_root`` holding the four standard idx files (plain or ``.gz``, directly or under
    ``FashionMNIST/raw/``), they are decompressed to a temporary folder and read by torchvision;
    otherwise torchvision reads or downloads under ``data_root`` (default ``./data``).

    Raises:
        DatasetError: files missing with downloading disabled, a failed download, or unreadable files.
    """
    from torchvision.datasets import FashionMNIST

    return _build_idx("fashion-mnist", "Fashion-MNIST", FashionMNIST, list(FashionMNIST.classes), data_root,
                      download, transform)


def build_mnist(data_root: Path | None, download: bool, transform: Callable) -> DatasetSource:
    """MNIST via torchvision's MNIST (60,000 train / 10,000 test, 28x28 grayscale); classes ``0`` .. ``9``.

    The idx files are found as for :func:`build_fashion_mnist` (directly in ``data_root`` or under
    ``MNIST/raw/``, plain or ``.gz``).

    Raises:
        DatasetError: files missing with downloading disabled, a failed download, or unreadable files.
    """
    from torchvision.datasets import MNIST

    return _build_idx("mnist", "MNIST", MNIST, list(DIGIT_CLASSES), data_root, download, transform)


#: CIFAR-100's 20 superclasses (coarse labels, in the index order of the dataset's ``coarse_label_names``) and
#: their 5 fine classes each, as published with the dataset (https://www.cs.toronto.edu/~kriz/cifar.html),
#: spelled as in its ``fine_label_names``. Used for image-folder copies, which lose the coarse label, and to
#: cross-check the labels of the python release.
CIFAR100_SUPERCLASSES = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
CIFAR100_COARSE_CLASSES = tuple(CIFAR100_SUPERCLASSES)
#: The 100 fine classes in label order (alphabetical, as in the dataset's ``fine_label_names``).
CIFAR100_FINE_CLASSES = tuple(sorted(f for fines in CIFAR100_SUPERCLASSES.values() for f in fines))
#: Superclass index of each fine class index, shape (100,).
CIFAR100_FINE_TO_COARSE = np.array([next(c for c, fines in enumerate(CIFAR100_SUPERCLASSES.values()) if f in fines)
                                    for f in CIFAR100_FINE_CLASSES], dtype=np.int64)
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
DIGIT_CLASSES = tuple(str(i) for i in range(10))


def build_cifar100(data_root: Path | None, download: bool, transform: Callable) -> DatasetSource:
    """CIFAR-100 with the 20 superclasses as classes (docs/method.md section 8); the fine class is kept as
    ``fine_labels``.

    Sources, like :func:`build_cifar10`: an image-folder tree ``data_root/{train,test}/<fine class>/``
    whose folders are the 100 fine class names (500 / 100 images each; superclass from
    ``CIFAR100_SUPERCLASSES``), or torchvision's CIFAR100 (``cifar-100-python`` under ``data_root``,
    default ``./data``), whose own ``coarse_labels`` give the superclass and are checked against the table.

    Raises:
        DatasetError: wrong class folders or counts, a coarse label that disagrees with the table, missing
            data with downloading disabled, or a failed download.
    """
    fine_to_coarse = LabelMap(CIFAR100_FINE_TO_COARSE)
    if data_root is not None and (data_root / "train").is_dir():
        source = build_folder(data_root, transform, name="cifar100")
        if tuple(source.class_names) != CIFAR100_FINE_CLASSES:
            missing = sorted(set(CIFAR100_FINE_CLASSES) - set(source.class_names))
            unexpected = sorted(set(source.class_names) - set(CIFAR100_FINE_CLASSES))
            raise DatasetError(f"--data-root {data_root}: class folders must be the 100 CIFAR-100 fine class names "
                               f"({', '.join(CIFAR100_FINE_CLASSES[:3])}, ...); missing {_few(missing)}, unexpected "
                               f"{_few(unexpected)}")
        for split, part in source.splits.items():
            _check_counts(f"--data-root {data_root}", "CIFAR-100", split, part.labels, CIFAR100_FINE_CLASSES,
                          CIFAR100_COUNTS[split] // 5)
            part.fine_labels = part.labels
            part.labels = CIFAR100_FINE_TO_COARSE[part.fine_labels]
            part.dataset.target_transform = fine_to_coarse
        source.class_names = list(CIFAR100_COARSE_CLASSES)
        source.fine_class_names = list(CIFAR100_FINE_CLASSES)
        source.description = f"CIFAR-100 image folders {data_root.resolve()} (superclasses from the fine class folders)"
        return source
    import pickle

    from torchvision.datasets import CIFAR100

    root = data_root or Path("data")
    splits = {}
    for split in ("train", "test"):
        dataset = _torchvision_dataset(CIFAR100, "cifar100", root, download, transform, train=(split == "train"),
                                       expected=f"{root}/cifar-100-python/ or {root}/train/<fine class>/")
        if tuple(dataset.classes) != CIFAR100_FINE_CLASSES:
            raise DatasetError(f"--data-root {root}: CIFAR-100 fine_label_names differ from the published list")
        _check_arrays("cifar100", root, split, dataset.data, dataset.targets, (32, 32, 3))
        pickled = (Path(root) / CIFAR100.base_folder
                   / (dataset.train_list if split == "train" else dataset.test_list)[0][0])
        with open(pickled, "rb") as handle:  # torchvision keeps only the fine labels; the release has both
            entry = pickle.load(handle, encoding="latin1")
        if "coarse_labels" not in entry:
            raise DatasetError(f"--data-root {root}: {pickled} has no 'coarse_labels' (not the CIFAR-100 python "
                               "release)")
        coarse = np.asarray(entry["coarse_labels"], dtype=np.int64)
        fine = np.asarray(dataset.targets, dtype=np.int64)
        if coarse.shape != fine.shape or (fine.size and (fine.min() < 0 or fine.max() >= 100)):
            raise DatasetError(f"--data-root {root}: {pickled} holds {fine.size} fine labels (expected in 0..99) and "
                               f"{coarse.size} coarse labels; expected as many of each")
        disagree = np.flatnonzero(coarse != CIFAR100_FINE_TO_COARSE[fine])
        if disagree.size:
            i = int(disagree[0])
            raise DatasetError(f"--data-root {root}: CIFAR-100 {split} image {i} has fine class "
                               f"{CIFAR100_FINE_CLASSES[fine[i]]} but superclass {coarse[i]}, not "
                               f"{CIFAR100_FINE_TO_COARSE[fine[i]]} ({disagree.size} such images)")
        dataset.target_transform = fine_to_coarse
        splits[split] = _torchvision_split(dataset, split, labels=coarse)
        splits[split].fine_labels = fine
    return DatasetSource("cifar100", list(CIFAR100_COARSE_CLASSES), splits,
                         f"torchvision.datasets.CIFAR100 {Path(root).resolve()} (coarse labels = superclasses)",
                         fine_class_names=list(CIFAR100_FINE_CLASSES))


def build_stl10(data_root: Path | None, download: bool, transform: Callable) -> DatasetSource:
    """STL-10 via torchvision's STL10: its ``train`` (500 per class) and ``test`` (800 per class) splits, 96x96 px.

    The 100,000 unlabeled images are not used (torchvision still checks that ``unlabeled_X.bin`` is present
    and intact, as it is in the release archive).

    Raises:
        DatasetError: ``stl10_binary/`` missing with downloading disabled, or a failed download.
    """
    from torchvision.datasets import STL10

    root = data_root or Path("data")
    splits = {}
    for split in ("train", "test"):
        dataset = _torchvision_dataset(STL10, "stl10", root, download, transform, split=split,
                                       expected=f"{root}/stl10_binary/ with train_X.bin, train_y.bin, test_X.bin, "
                                                "test_y.bin, unlabeled_X.bin")
        _check_arrays("stl10", root, split, dataset.data, dataset.labels, (3, 96, 96))
        if getattr(dataset, "classes", None) and tuple(dataset.classes) != STL10_CLASSES:
            raise DatasetError(f"--data-root {root}: stl10_binary/class_names.txt lists {dataset.classes}, "
                               f"expected {list(STL10_CLASSES)}")
        splits[split] = _torchvision_split(dataset, split, labels=dataset.labels)
    return DatasetSource("stl10", list(STL10_CLASSES), splits, f"torchvision.datasets.STL10 {Path(root).resolve()}")


def build_svhn(data_root: Path | None, download: bool, transform: Callable) -> DatasetSource:
    """SVHN via torchvision's SVHN: its ``train`` and ``test`` splits (``extra`` unused); digit 0 is class 0
    (torchvision maps the release's label 10 to 0).

    Raises:
        DatasetError: ``train_32x32.mat`` / ``test_32x32.mat`` missing with downloading disabled, or a failed
            download.
    """
    from torchvision.datasets import SVHN

    root = data_root or Path("data")
    splits = {}
    for split in ("train", "test"):
        dataset = _torchvision_dataset(SVHN, "svhn", root, download, transform, split=split,
                                       expected=f"{root}/train_32x32.mat and {root}/test_32x32.mat")
        _check_arrays("svhn", root, split, dataset.data, np.atleast_1d(dataset.labels), (3, 32, 32))
        dataset.labels = np.atleast_1d(dataset.labels)  # torchvision squeezes a 1-image split to 0-d
        splits[split] = _torchvision_split(dataset, split, labels=dataset.labels)
    return DatasetSource("svhn", list(DIGIT_CLASSES), splits, f"torchvision.datasets.SVHN {Path(root).resolve()}")


def _file_number(name: str) -> tuple:
    stem = Path(name).stem
    return (0, int(stem), name) if stem.isascii() and stem.isdigit() else (1, 0, name)


def _class_folders(base: Path) -> dict[str, Path] | None:
    """``{cat: base/Cat, dog: base/Dog}`` (folder names in any case), or None when either is missing."""
    found = {p.name.lower(): p for p in base.iterdir() if p.is_dir()} if base.is_dir() else {}
    return {c: found[c] for c in CATS_VS_DOGS_CLASSES} if all(c in found for c in CATS_VS_DOGS_CLASSES) else None


def build_cats_vs_dogs(data_root: Path | None, transform: Callable, train_per_class: int = CATS_VS_DOGS_TRAIN,
                       test_per_class: int = CATS_VS_DOGS_TEST) -> DatasetSource:
    """Cats vs Dogs (Microsoft PetImages), protocol of docs/method.md section 8: per class 10,000 train, 2,500 test.

    Layouts: ``data_root/{Cat,Dog}/`` (or ``data_root/PetImages/{Cat,Dog}/``), the Microsoft release; every
    entry of a class folder except hidden ones is tried, ordered by file number (``123.jpg``; other names after,
    by name); entries that are not readable images (corrupt files, ``Thumbs.db``, dangling links) are skipped and
    listed, and the first ``train_per_class`` readable ones are train, the next ``test_per_class`` test. Or an
    image-folder tree ``data_root/{train,test}/{cat,dog}/`` (any case) taken as it is, unreadable images skipped.
    Classes are ``cat`` (0) and ``dog`` (1).

    Raises:
        DatasetError: the layout is not found, a class has no more than ``train_per_class`` readable images, or an
            image is reached twice (a link).
    """
    if data_root is None:
        raise DataAbsentError("--dataset cats-vs-dogs needs --data-root DIR holding DIR/Cat/ and DIR/Dog/ (Microsoft "
                           "PetImages) or DIR/{train,test}/{cat,dog}/; it cannot be downloaded")
    folders = _class_folders(data_root / "PetImages") or _class_folders(data_root)
    skipped: list[str] = []
    splits: dict[str, SplitSource] = {}
    if folders is not None:
        per_split: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
        notes = []
        for label, name in enumerate(CATS_VS_DOGS_CLASSES):
            files = sorted((p for p in folders[name].iterdir() if not p.name.startswith(".") and not p.is_dir()),
                           key=lambda p: _file_number(p.name))
            ok = _readable([str(p) for p in files])
            good = [p for p, k in zip(files, ok, strict=True) if k]
            skipped += [p.relative_to(data_root).as_posix() for p, k in zip(files, ok, strict=True) if not k]
            if len(good) <= train_per_class:
                raise DatasetError(f"--data-root {data_root}: {folders[name]} holds {len(good)} readable images "
                                   f"({len(files) - len(good)} unreadable skipped); the Cats vs Dogs protocol takes "
                                   f"the first {train_per_class} for train and up to {test_per_class} after them for "
                                   f"test, so it needs more than {train_per_class}; for another split use "
                                   f"{data_root}/{{train,test}}/{{cat,dog}}/")
            chosen = {"train": good[:train_per_class], "test": good[train_per_class:train_per_class + test_per_class]}
            for split, paths in chosen.items():
                per_split[split][0].extend(paths)
                per_split[split][1].extend([label] * len(paths))
            notes.append(f"{name}: {len(chosen['train'])} train / {len(chosen['test'])} test of {len(files)} files")
        for split, (paths, labels) in per_split.items():
            labels = np.asarray(labels, dtype=np.int64)
            splits[split] = SplitSource(FileImages([str(p) for p in paths], labels, transform),
                                        [p.relative_to(data_root).as_posix() for p in paths], labels)
        description = (f"Microsoft PetImages {folders['cat'].parent.resolve()}: {'; '.join(notes)} (first readable "
                       f"files by number; {len(skipped)} unreadable skipped)")
        check_unique_files(data_root, [str(p) for part in per_split.values() for p in part[0]])
    elif (data_root / "train").is_dir():
        source = build_folder(data_root, transform, name="cats-vs-dogs")  # refuses an image reached twice
        lower = [c.lower() for c in source.class_names]
        if sorted(lower) != list(CATS_VS_DOGS_CLASSES):
            raise DatasetError(f"--data-root {data_root}: class folders must be cat and dog (any case); found "
                               f"{source.class_names}")
        to_label = np.array([CATS_VS_DOGS_CLASSES.index(c) for c in lower], dtype=np.int64)  # 'Dog' sorts before 'cat'
        for split, part in source.splits.items():
            paths = [path for path, _ in part.dataset.samples]
            ok = np.asarray(_readable(paths), dtype=bool)
            skipped += [i for i, k in zip(part.sample_ids, ok, strict=True) if not k]
            keep = np.flatnonzero(ok)
            labels = to_label[part.labels[keep]]
            splits[split] = SplitSource(FileImages([paths[i] for i in keep], labels, transform),
                                        [part.sample_ids[i] for i in keep], labels)
        description = f"Cats vs Dogs image folders {data_root.resolve()} ({len(skipped)} unreadable skipped)"
    else:
        raise DatasetError(f"--data-root {data_root}: expected {data_root}/Cat/ and {data_root}/Dog/ (Microsoft "
                           f"PetImages, or under {data_root}/PetImages/) or {data_root}/train/<cat|dog>/ and "
                           f"{data_root}/test/<cat|dog>/")
    return DatasetSource("cats-vs-dogs", list(CATS_VS_DOGS_CLASSES), splits, description, skipped_files=skipped)


def build_good_defect(root: Path, transform: Callable, name: str, option: str = "--data-root") -> DatasetSource:
    """An MVTec-style tree: ``root/train/good/``, ``root/test/good/`` and ``root/test/<defect type>/`` (anything
    else, such as ``ground_truth/``, and hidden folders and files are ignored).

    Classes are ``good`` (0, the normal class, the only one that can be normal) followed by the defect types
    sorted by name, so each test image keeps its defect type and AUROC can be reported per defect type. The
    train split holds only ``good``.

    Raises:
        DatasetError: ``train/good`` or ``test/good`` missing, other folders under ``train/``, no defect type, a
            folder without images, image files outside those folders, or an image reached twice (a link).
    """
    for needed in (root / "train" / "good", root / "test" / "good"):
        if not needed.is_dir():
            raise DatasetError(f"{option} {root}: expected {root}/train/good/, {root}/test/good/ and "
                               f"{root}/test/<defect type>/; {needed} is missing")

    def folders(path: Path) -> list[str]:
        return sorted(p.name for p in path.iterdir() if p.is_dir() and p.name != "good" and not p.name.startswith("."))

    extra = folders(root / "train")
    if extra:
        raise DatasetError(f"{option} {root}: train/ must hold only good/ (normal images); found {extra}")
    defects = folders(root / "test")
    if not defects:
        raise DatasetError(f"{option} {root}: test/ holds no defect type folder beside good/")
    classes = ["good", *defects]
    splits = {split: _folder_split(root, split, transform, option, ["good"] if split == "train" else classes)[1]
              for split in ("train", "test")}
    check_unique_files(root, [p for part in splits.values() for p, _ in part.dataset.samples], option)
    return DatasetSource(name, classes, splits, f"good/defect folders {root.resolve()}", normal_classes=["good"])


def mvtec_categories(data_root: Path) -> list[str]:
    """The MVTec AD categories under ``data_root``: visible sub-folders holding ``train/good``, sorted by name."""
    return sorted(p.name for p in data_root.iterdir() if not p.name.startswith(".") and (p / "train" / "good").is_dir())


def build_mvtec(data_root: Path | None, category: str | None, transform: Callable) -> DatasetSource:
    """One MVTec AD category, ``data_root/<category>/`` in the release's layout (see :func:`build_good_defect`);
    its dataset name is ``mvtec-<category>``, so each category gets its own cache.

    Raises:
        DatasetError: no ``--data-root`` or ``--category``, or the category is not there.
    """
    if data_root is None:
        raise DataAbsentError("--dataset mvtec needs --data-root DIR holding DIR/<category>/train/good/ ... (the MVTec "
                           "AD release, unpacked); it cannot be downloaded")
    present = mvtec_categories(data_root)
    if not present and (data_root / "train" / "good").is_dir():
        raise DatasetError(f"--data-root {data_root} is one category (it holds train/good/); pass its parent folder "
                           f"and --category {data_root.name}")
    if category is None:
        raise DatasetError(f"--dataset mvtec needs --category: one of {', '.join(present) or '(none found)'}, or "
                           "'all' (one cache per category)")
    if category not in present:
        raise DatasetError(f"--category must be one of {', '.join(present) or '(none found under --data-root)'} or "
                           f"'all'; got {category!r}")
    return build_good_defect(data_root / category, transform, f"mvtec-{category}")


def build_dataset(name: str, data_root: str | Path | None, download: bool, transform: Callable,
                  category: str | None = None, layout: str = "classes") -> DatasetSource:
    """Build one of ``DATASETS`` (protocols: docs/method.md section 8 and docs/datasets.md).

    Args:
        name: one of ``DATASETS``.
        data_root: folder with the data (required for ``folder``, ``cats-vs-dogs`` and ``mvtec``).
        download: allow torchvision to download missing data.
        transform: PIL image -> (3, H, W) float tensor.
        category: the MVTec AD category (``mvtec`` only; one category per cache).
        layout: for ``folder``: ``classes`` (class folders) or ``good-defect`` (MVTec-style).

    Raises:
        DatasetError: unknown name, or the data cannot be found, checked or fetched.
    """
    if name not in DATASETS:
        raise DatasetError(f"--dataset must be one of {', '.join(DATASETS)}; got {name!r}")
    if layout not in FOLDER_LAYOUTS:
        raise DatasetError(f"--layout must be one of {', '.join(FOLDER_LAYOUTS)}; got {layout!r}")
    if layout != "classes" and name != "folder":
        raise DatasetError(f"--layout applies to --dataset folder only; got --layout {layout} with --dataset {name}")
    if category is not None and name != "mvtec":
        raise DatasetError(f"--category applies to --dataset mvtec only; got --category {category} with "
                           f"--dataset {name}")
    root = Path(data_root) if data_root is not None else None
    if root is not None and root.exists() and not root.is_dir():
        raise DatasetError(f"--data-root {root} is not a directory")
    local_only = name in ("folder", "cats-vs-dogs", "mvtec")
    if root is not None and not root.exists() and (local_only or not download):
        raise DataAbsentError(f"--data-root {root} does not exist")
    if name == "folder" and root is None:
        raise DataAbsentError("--dataset folder needs --data-root DIR holding DIR/train/<class>/ and DIR/test/<class>/ "
                           "(or, with --layout good-defect, DIR/train/good/, DIR/test/good/, DIR/test/<defect>/)")
    builders = {
        "digits": lambda: build_digits(transform),
        "cifar10": lambda: build_cifar10(root, download, transform),
        "cifar100": lambda: build_cifar100(root, download, transform),
        "stl10": lambda: build_stl10(root, download, transform),
        "svhn": lambda: build_svhn(root, download, transform),
        "mnist": lambda: build_mnist(root, download, transform),
        "fashion-mnist": lambda: build_fashion_mnist(root, download, transform),
        "cats-vs-dogs": lambda: build_cats_vs_dogs(root, transform),
        "mvtec": lambda: build_mvtec(root, category, transform),
        "folder": lambda: (build_good_defect(root, transform, "folder") if layout == "good-defect"
                           else build_folder(root, transform)),
    }
    if name not in DOWNLOADED:
        source = builders[name]()
    else:
        source = _read_release(name, root, builders[name])
    check_source(source)
    return source


def _read_release(name: str, root: Path | None, build: Callable[[], DatasetSource]) -> DatasetSource:
    """``build()`` for a torchvision dataset, turning the errors of a file that does not have the release's layout
    (a missing key, a wrong shape) into one :class:`DatasetError` naming the dataset and data root."""
    try:
        return build()
    except _RELEASE_FORMAT_ERRORS as err:  # a release file that parses but is not laid out as the release's
        text = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise DatasetError(f"--dataset {name}: cannot read the files under --data-root {root or 'data'} "
                           f"({type(err).__name__}{': ' + text if text else ''}); they are damaged or not in the "
                           "format of the dataset's release") from None


def _format_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [KeyError, IndexError, TypeError, ValueError, EOFError, AttributeError]
    try:
        from scipy.io.matlab import MatReadError  # SVHN's .mat files

        errors.append(MatReadError)
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn
        pass
    import pickle

    errors.append(pickle.UnpicklingError)
    return tuple(errors)


_RELEASE_FORMAT_ERRORS = _format_errors()
