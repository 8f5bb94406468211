"""Dataset protocols (docs/method.md section 8): per-class train/test counts, the normal/anomalous counts of a
normal class, disjoint sample ids, and label names, on tiny files in each dataset's own on-disk format.

torchvision checks the MD5 of the real release files; these tests write tiny files in the same format, so they
switch that check off (and only that) with monkeypatch.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract import datasets as ds
from extract.datasets import DatasetError, build_dataset, protocols


def assert_protocol(source, class_names, train_counts, test_counts, normal: int):
    """Counts per class and split, the test split's normal/anomalous counts for ``normal``, disjoint unique ids."""
    assert source.class_names == list(class_names)
    for split, expected in (("train", train_counts), ("test", test_counts)):
        part = source.splits[split]
        assert len(part.sample_ids) == len(part.labels) == len(part.dataset)
        assert np.bincount(part.labels, minlength=len(class_names)).tolist() == list(expected)
        assert len(set(part.sample_ids)) == len(part.sample_ids)
    test = source.splits["test"].labels
    assert int((test == normal).sum()) == test_counts[normal]
    assert int((test != normal).sum()) == sum(test_counts) - test_counts[normal]
    assert not set(source.splits["train"].sample_ids) & set(source.splits["test"].sample_ids)


def loaded_labels(part) -> list[int]:
    """Labels as the DataLoader will see them (``__getitem__``), which extraction checks against ``labels``."""
    return [int(part.dataset[i][1]) for i in range(len(part.dataset))]


def no_transform(image):
    return 0


# ----------------------------------------------------------------------------------------------------------------
# CIFAR-100: 20 superclasses
# ----------------------------------------------------------------------------------------------------------------


def test_cifar100_superclass_table():
    table = ds.CIFAR100_SUPERCLASSES
    assert len(table) == 20 and all(len(fines) == 5 for fines in table.values())
    assert len(ds.CIFAR100_FINE_CLASSES) == 100 == len(set(ds.CIFAR100_FINE_CLASSES))
    assert list(ds.CIFAR100_FINE_CLASSES) == sorted(ds.CIFAR100_FINE_CLASSES)  # label order of the release
    assert list(table) == sorted(table)  # coarse_label_names of the release are in alphabetical order
    assert np.bincount(ds.CIFAR100_FINE_TO_COARSE).tolist() == [5] * 20
    coarse = dict(zip(ds.CIFAR100_FINE_CLASSES, (ds.CIFAR100_COARSE_CLASSES[c] for c in ds.CIFAR100_FINE_TO_COARSE),
                      strict=True))
    for fine, superclass in [("beaver", "aquatic_mammals"), ("whale", "aquatic_mammals"), ("aquarium_fish", "fish"),
                             ("keyboard", "household_electrical_devices"), ("maple_tree", "trees"),
                             ("lawn_mower", "vehicles_2"), ("pickup_truck", "vehicles_1"), ("baby", "people"),
                             ("worm", "non-insect_invertebrates"), ("sweet_pepper", "fruit_and_vegetables")]:
        assert coarse[fine] == superclass
    assert ds.CIFAR100_FINE_CLASSES.index("apple") == 0 and ds.CIFAR100_FINE_CLASSES.index("worm") == 99
    # the standard protocol: 500 train / 100 test images per fine class, so 2,500 / 500 per superclass
    assert ds.CIFAR100_COUNTS == {"train": 2500, "test": 500}


def _write_cifar100(root: Path, per_fine: dict, flip: bool = False) -> Path:
    """The python release: cifar-100-python/{train,test,meta}, pickled dicts as the dataset ships them."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in per_fine.items():
        fine = np.repeat(np.arange(100), n)
        coarse = ds.CIFAR100_FINE_TO_COARSE[fine].copy()
        if flip and split == "test":
            coarse[7] = (coarse[7] + 1) % 20
        entry = {"data": rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8), "fine_labels": fine.tolist(),
                 "coarse_labels": coarse.tolist(), "filenames": [f"{i}.png" for i in range(len(fine))]}
        (folder / split).write_bytes(pickle.dumps(entry))
    meta = {"fine_label_names": list(ds.CIFAR100_FINE_CLASSES), "coarse_label_names": list(ds.CIFAR100_COARSE_CLASSES)}
    (folder / "meta").write_bytes(pickle.dumps(meta))
    return root


@pytest.fixture
def no_md5(monkeypatch):
    """Tiny files cannot carry the release's MD5s: accept any file that exists."""
    import os

    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.stl10 as stl10
    import torchvision.datasets.svhn as svhn

    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    monkeypatch.setattr(stl10.STL10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(svhn.SVHN, "_check_integrity", lambda self: True)


def test_cifar100_python_release(tmp_path, no_md5):
    root = _write_cifar100(tmp_path / "c100", {"train": 3, "test": 2})
    source = build_dataset("cifar100", root, False, no_transform)
    assert_protocol(source, ds.CIFAR100_COARSE_CLASSES, [15] * 20, [10] * 20, normal=4)
    assert source.fine_class_names == list(ds.CIFAR100_FINE_CLASSES)
    test = source.splits["test"]
    assert test.fine_labels.tolist() == np.repeat(np.arange(100), 2).tolist()
    assert test.labels.tolist() == ds.CIFAR100_FINE_TO_COARSE[test.fine_labels].tolist()
    assert loaded_labels(test) == test.labels.tolist()  # the loader yields superclasses, not fine classes
    assert "coarse" in source.description


def test_cifar100_coarse_label_disagreeing_with_the_table_is_refused(tmp_path, no_md5):
    root = _write_cifar100(tmp_path / "c100", {"train": 1, "test": 1}, flip=True)
    with pytest.raises(DatasetError, match="test image 7 has fine class"):
        build_dataset("cifar100", root, False, no_transform)


def test_cifar100_image_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(protocols, "CIFAR100_COUNTS", {"train": 10, "test": 5})  # 2 / 1 per fine class; read there
    png = io.BytesIO()
    Image.new("RGB", (4, 4), (9, 9, 9)).save(png, format="PNG")
    for split, n in (("train", 2), ("test", 1)):
        for fine in ds.CIFAR100_FINE_CLASSES:
            folder = tmp_path / "c100" / split / fine
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"{i}.png").write_bytes(png.getvalue())
    source = build_dataset("cifar100", tmp_path / "c100", False, no_transform)
    assert_protocol(source, ds.CIFAR100_COARSE_CLASSES, [10] * 20, [5] * 20, normal=17)
    test = source.splits["test"]
    assert test.sample_ids[0] == "test/apple/0.png" and test.fine_labels[0] == 0
    assert source.class_names[test.labels[0]] == "fruit_and_vegetables"
    assert loaded_labels(test) == test.labels.tolist()
    (tmp_path / "c100" / "test" / "apple" / "1.png").write_bytes(png.getvalue())
    with pytest.raises(DatasetError, match="must hold 1 images per class; found {'apple': 2}"):
        build_dataset("cifar100", tmp_path / "c100", False, no_transform)


def test_cifar100_image_folders_must_be_fine_classes(tmp_path):
    for split in ("train", "test"):
        for name in ("fish", "people"):
            folder = tmp_path / "c100" / split / name
            folder.mkdir(parents=True)
            Image.new("RGB", (4, 4)).save(folder / "0.png")
    with pytest.raises(DatasetError, match="100 CIFAR-100 fine class names"):
        build_dataset("cifar100", tmp_path / "c100", False, no_transform)


# ----------------------------------------------------------------------------------------------------------------
# STL-10, SVHN, MNIST
# ----------------------------------------------------------------------------------------------------------------


def _write_stl10(root: Path, per_class: dict) -> Path:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        labels = np.tile(np.arange(1, 11), n).astype(np.uint8)  # the release numbers classes 1..10
        (folder / f"{split}_y.bin").write_bytes(labels.tobytes())
        (folder / f"{split}_X.bin").write_bytes(rng.integers(0, 256, (len(labels), 3, 96, 96), np.uint8).tobytes())
    (folder / "unlabeled_X.bin").write_bytes(b"")
    (folder / "class_names.txt").write_text("\n".join(ds.STL10_CLASSES) + "\n")
    return root


def test_stl10_train_and_test_splits(tmp_path, no_md5):
    root = _write_stl10(tmp_path / "stl", {"train": 2, "test": 3})
    source = build_dataset("stl10", root, False, no_transform)
    assert_protocol(source, ds.STL10_CLASSES, [2] * 10, [3] * 10, normal=7)
    assert source.splits["train"].labels[:3].tolist() == [0, 1, 2]  # file label 1 is airplane
    assert loaded_labels(source.splits["test"]) == source.splits["test"].labels.tolist()
    # the protocol of the real release (docs/method.md section 8): 500 train / 800 test per class
    assert ds.STL10_CLASSES == ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")


def test_stl10_offline_error_names_the_files(tmp_path):
    with pytest.raises(DatasetError, match="stl10_binary/ with train_X.bin.*--no-download"):
        build_dataset("stl10", tmp_path, False, no_transform)


def test_svhn_train_and_test_splits_label_10_is_digit_0(tmp_path, no_md5):
    from scipy.io import savemat

    root = tmp_path / "svhn"
    root.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        labels = np.tile(np.arange(1, 11), n)  # the release's digits: 1..9 and 10 for 0
        savemat(root / f"{split}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, len(labels)), np.uint8),
                                              "y": labels.reshape(-1, 1)})
    source = build_dataset("svhn", root, False, no_transform)
    assert_protocol(source, [str(i) for i in range(10)], [3] * 10, [2] * 10, normal=0)
    assert source.splits["train"].labels[:10].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    assert loaded_labels(source.splits["test"]) == source.splits["test"].labels.tolist()


def test_svhn_offline_error_names_the_files(tmp_path):
    with pytest.raises(DatasetError, match="train_32x32.mat and .*test_32x32.mat"):
        build_dataset("svhn", tmp_path, False, no_transform)


def test_mnist_from_idx_files(tmp_path):
    root = tmp_path / "mnist"
    root.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 4), ("t10k", 2)):
        labels = np.tile(np.arange(10), n).astype(np.uint8)
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">iiii", 2051, len(labels), 28, 28) + images.tobytes()))
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">ii", 2049, len(labels)) + labels.tobytes()))
    source = build_dataset("mnist", root, False, no_transform)
    assert_protocol(source, [str(i) for i in range(10)], [4] * 10, [2] * 10, normal=3)
    assert "torchvision.datasets.MNIST" in source.description
    assert loaded_labels(source.splits["test"]) == source.splits["test"].labels.tolist()


def test_mnist_missing_files_offline(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.*--no-download"):
        build_dataset("mnist", tmp_path / "m", False, no_transform)


# ----------------------------------------------------------------------------------------------------------------
# Cats vs Dogs
# ----------------------------------------------------------------------------------------------------------------


def _jpeg(colour) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(out, format="JPEG")
    return out.getvalue()


@pytest.fixture(scope="module")
def petimages(tmp_path_factory) -> Path:
    """The Microsoft PetImages layout at full size (12,501 cat / 12,500 dog files), with the kinds of bad files the
    release holds: an empty JPEG (Cat/666.jpg), a truncated one (Dog/11702.jpg) and Thumbs.db."""
    root = tmp_path_factory.mktemp("pets") / "kagglecatsanddogs"
    cat, dog = _jpeg((200, 50, 50)), _jpeg((50, 50, 200))
    for name, data, n in (("Cat", cat, 12501), ("Dog", dog, 12500)):
        folder = root / "PetImages" / name
        folder.mkdir(parents=True)
        for i in range(n):
            (folder / f"{i}.jpg").write_bytes(data)
        (folder / "Thumbs.db").write_bytes(b"\x00" * 64)
    (root / "PetImages" / "Cat" / "666.jpg").write_bytes(b"")
    (root / "PetImages" / "Dog" / "11702.jpg").write_bytes(dog[: len(dog) // 2])
    return root


def test_cats_vs_dogs_protocol_on_the_petimages_layout(petimages):
    source = build_dataset("cats-vs-dogs", petimages, False, no_transform)
    # cats: 12,500 readable -> 10,000 / 2,500; dogs: 12,499 readable -> 10,000 / 2,499 (the protocol's test
    # images come after the train images, so a bad file costs a test image)
    assert_protocol(source, ["cat", "dog"], [10000, 10000], [2500, 2499], normal=0)
    assert sorted(source.skipped_files) == ["PetImages/Cat/666.jpg", "PetImages/Cat/Thumbs.db",
                                            "PetImages/Dog/11702.jpg", "PetImages/Dog/Thumbs.db"]
    train, test = source.splits["train"], source.splits["test"]
    # ordered by file number: 0, 1, 2, ..., 10 (not 0, 1, 10, 100, ...), skipping 666
    assert train.sample_ids[:3] == ["PetImages/Cat/0.jpg", "PetImages/Cat/1.jpg", "PetImages/Cat/2.jpg"]
    assert train.sample_ids[666] == "PetImages/Cat/667.jpg"
    assert train.sample_ids[9999] == "PetImages/Cat/10000.jpg" and test.sample_ids[0] == "PetImages/Cat/10001.jpg"
    assert test.sample_ids[-1] == "PetImages/Dog/12499.jpg" and "PetImages/Dog/11702.jpg" not in test.sample_ids
    assert "4 unreadable skipped" in source.description
    assert loaded_labels(test)[:1] + loaded_labels(test)[-1:] == [0, 1]


def test_cats_vs_dogs_too_few_readable_images(tmp_path):
    for name in ("Cat", "Dog"):
        (tmp_path / name).mkdir()
        for i in range(3):
            (tmp_path / name / f"{i}.jpg").write_bytes(_jpeg((0, 0, 0)))
    (tmp_path / "Cat" / "bad.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"Cat holds 3 readable images \(1 unreadable skipped\); the Cats vs Dogs "
                                           r"protocol takes the first 10000 for train and up to 2500 after them for "
                                           r"test, so it needs more than 10000; for another split use "
                                           r".*/\{train,test\}"):
        build_dataset("cats-vs-dogs", tmp_path, False, no_transform)
    source = ds.build_cats_vs_dogs(tmp_path, no_transform, train_per_class=2, test_per_class=5)
    assert_protocol(source, ["cat", "dog"], [2, 2], [1, 1], normal=1)


def test_cats_vs_dogs_image_folders_skip_unreadable_files(tmp_path):
    for split in ("train", "test"):
        for name in ("Cat", "Dog"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                (folder / f"{i}.jpg").write_bytes(_jpeg((0, 0, 0)))
    (tmp_path / "test" / "Dog" / "2.jpg").write_bytes(b"not an image")
    source = build_dataset("cats-vs-dogs", tmp_path, False, no_transform)
    assert_protocol(source, ["cat", "dog"], [3, 3], [3, 2], normal=0)
    assert source.skipped_files == ["test/Dog/2.jpg"]


def test_cats_vs_dogs_needs_a_data_root_and_the_layout(tmp_path):
    with pytest.raises(DatasetError, match="needs --data-root DIR holding DIR/Cat/"):
        build_dataset("cats-vs-dogs", None, True, no_transform)
    with pytest.raises(DatasetError, match="expected .*/Cat/ and .*/Dog/"):
        build_dataset("cats-vs-dogs", tmp_path, True, no_transform)


# ----------------------------------------------------------------------------------------------------------------
# MVTec AD and good/defect folders
# ----------------------------------------------------------------------------------------------------------------


def make_mvtec(root: Path, categories=None, size: int = 16) -> Path:
    """An MVTec AD-style tree: <category>/train/good, test/good, test/<defect>, ground_truth/<defect> (masks)."""
    categories = categories or {"bottle": {"good": (6, 3), "broken_large": 2, "contamination": 3},
                                "screw": {"good": (5, 2), "scratch_head": 2}}
    rng = np.random.default_rng(0)
    for category, spec in categories.items():
        n_train, n_good = spec["good"]
        for split, folder, n in [("train", "good", n_train), ("test", "good", n_good),
                                 *[("test", d, n) for d, n in spec.items() if d != "good"]]:
            path = root / category / split / folder
            path.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 60 if folder == "good" else 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(path / f"{i:03d}.png")
            if split == "test" and folder != "good":
                masks = root / category / "ground_truth" / folder
                masks.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    Image.new("L", (size, size), 255).save(masks / f"{i:03d}_mask.png")
    return root


def test_mvtec_category_protocol(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    assert ds.mvtec_categories(root) == ["bottle", "screw"]
    source = build_dataset("mvtec", root, False, no_transform, category="bottle")
    assert source.name == "mvtec-bottle"
    assert_protocol(source, ["good", "broken_large", "contamination"], [6, 0, 0], [3, 2, 3], normal=0)
    test = source.splits["test"]
    label_of = dict(zip(test.sample_ids, test.labels.tolist(), strict=True))
    assert label_of["test/good/000.png"] == 0 and label_of["test/broken_large/001.png"] == 1
    assert label_of["test/contamination/002.png"] == 2 and len(label_of) == 8
    assert not any("ground_truth" in s for s in test.sample_ids)
    assert loaded_labels(test) == test.labels.tolist()


def test_mvtec_errors(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    with pytest.raises(DatasetError, match="--category must be one of bottle, screw or 'all'; got 'cable'"):
        build_dataset("mvtec", root, False, no_transform, category="cable")
    with pytest.raises(DatasetError, match="--dataset mvtec needs --category: one of bottle, screw, or 'all'"):
        build_dataset("mvtec", root, False, no_transform)
    with pytest.raises(DatasetError, match="is one category .*pass its parent folder and --category bottle"):
        build_dataset("mvtec", root / "bottle", False, no_transform, category="bottle")
    with pytest.raises(DatasetError, match="pass --layout good-defect"):
        build_dataset("folder", root / "bottle", False, no_transform)
    with pytest.raises(DatasetError, match="needs --data-root"):
        build_dataset("mvtec", None, False, no_transform, category="bottle")
    with pytest.raises(DatasetError, match="--category applies to --dataset mvtec only"):
        build_dataset("cifar10", root, False, no_transform, category="bottle")
    (root / "bottle" / "train" / "broken_large").mkdir()
    with pytest.raises(DatasetError, match=r"train/ must hold only good/ .*\['broken_large'\]"):
        build_dataset("mvtec", root, False, no_transform, category="bottle")


def test_folder_good_defect_layout(tmp_path):
    root = make_mvtec(tmp_path / "mine", {"widget": {"good": (4, 2), "dent": 1, "crack": 2}}) / "widget"
    source = build_dataset("folder", root, False, no_transform, layout="good-defect")
    assert_protocol(source, ["good", "crack", "dent"], [4, 0, 0], [2, 2, 1], normal=0)
    with pytest.raises(DatasetError, match="--layout must be one of classes, good-defect; got 'mvtec'"):
        build_dataset("folder", root, False, no_transform, layout="mvtec")
    with pytest.raises(DatasetError, match="test/good/.* is missing"):
        build_dataset("folder", tmp_path, False, no_transform, layout="good-defect")


def test_every_dataset_is_offered_by_the_cli():
    import pipeline

    assert pipeline.DATASET_CHOICES == list(ds.DATASETS)


# ----------------------------------------------------------------------------------------------------------------
# bad input found by a breaking session: each a one-line DatasetError before anything is encoded
# ----------------------------------------------------------------------------------------------------------------


def test_labels_outside_the_classes_are_refused_before_encoding(tmp_path):
    root = tmp_path / "mnist"
    root.mkdir()
    for prefix, labels in (("train", [0, 1, 10, 3]), ("t10k", [0, 1])):
        labels = np.array(labels, np.uint8)
        (root / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">iiii", 2051, len(labels), 28, 28)
                                                          + bytes(len(labels) * 784))
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, len(labels)) + labels.tobytes())
    with pytest.raises(DatasetError, match=r"train image 'train/00002' has label 10, outside 0..9 \(1 such images\)"):
        build_dataset("mnist", root, False, no_transform)


def test_stl10_label_file_shorter_than_the_images_is_refused(tmp_path, no_md5):
    root = _write_stl10(tmp_path / "stl", {"train": 1, "test": 1})
    y = root / "stl10_binary" / "test_y.bin"
    y.write_bytes(y.read_bytes()[:-1])
    with pytest.raises(DatasetError, match="stl10: the test files under .* hold images of shape \\(10, 3, 96, 96\\) "
                                           "and labels of shape \\(9,\\)"):
        build_dataset("stl10", root, False, no_transform)


def test_stl10_label_zero_wraps_and_is_refused(tmp_path, no_md5):
    root = _write_stl10(tmp_path / "stl", {"train": 1, "test": 1})
    (root / "stl10_binary" / "train_y.bin").write_bytes(bytes([0] + list(range(2, 11))))
    with pytest.raises(DatasetError, match="has label 255, outside 0..9"):
        build_dataset("stl10", root, False, no_transform)


@pytest.mark.parametrize("content, fragment", [
    ({"X": np.zeros((32, 32, 3, 2), np.uint8)}, "KeyError: 'y'"),
    ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((2, 2))}, "labels of shape (2, 2)"),
    ({"X": np.zeros((2, 3, 32, 32), np.uint8), "y": np.ones((2, 1))}, "hold images of shape (32, 32, 2, 3)"),
    (b"not a mat file", "they are damaged or not in the format of the dataset's release"),
])
def test_malformed_svhn_files_are_one_line_errors(tmp_path, no_md5, content, fragment):
    from scipy.io import savemat

    root = tmp_path / "svhn"
    root.mkdir()
    for split in ("train", "test"):
        if isinstance(content, bytes):
            (root / f"{split}_32x32.mat").write_bytes(content)
        else:
            savemat(root / f"{split}_32x32.mat", content)
    with pytest.raises(DatasetError) as info:
        build_dataset("svhn", root, False, no_transform)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_svhn_with_one_test_image(tmp_path, no_md5):
    from scipy.io import savemat

    root = tmp_path / "svhn"
    root.mkdir()
    for split, n in (("train", 10), ("test", 1)):
        savemat(root / f"{split}_32x32.mat", {"X": np.zeros((32, 32, 3, n), np.uint8),
                                               "y": np.arange(1, n + 1).reshape(-1, 1)})
    assert build_dataset("svhn", root, False, no_transform).splits["test"].labels.tolist() == [1]


def test_release_files_present_but_refused_by_torchvision(tmp_path):
    from scipy.io import savemat

    root = tmp_path / "svhn"
    root.mkdir()
    for split in ("train", "test"):  # real format, but not the release's bytes: the MD5 check fails
        savemat(root / f"{split}_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((2, 1))})
    with pytest.raises(DatasetError, match="are present but torchvision refused them .*MD5"):
        build_dataset("svhn", root, False, no_transform)


def test_cifar100_pickle_without_coarse_labels(tmp_path, no_md5):
    root = _write_cifar100(tmp_path / "c100", {"train": 1, "test": 1})
    entry = pickle.loads((root / "cifar-100-python" / "test").read_bytes())
    del entry["coarse_labels"]
    (root / "cifar-100-python" / "test").write_bytes(pickle.dumps(entry))
    with pytest.raises(DatasetError, match="has no 'coarse_labels'"):
        build_dataset("cifar100", root, False, no_transform)


def test_cifar100_folder_error_names_the_misspelled_folder(tmp_path):
    for split in ("train", "test"):
        for fine in ds.CIFAR100_FINE_CLASSES:
            folder = tmp_path / split / ("sweet_peper" if fine == "sweet_pepper" else fine)
            folder.mkdir(parents=True)
            Image.new("RGB", (4, 4)).save(folder / "0.png")
    with pytest.raises(DatasetError, match="missing sweet_pepper, unexpected sweet_peper"):
        build_dataset("cifar100", tmp_path, False, no_transform)


def test_mvtec_links_and_hidden_folders(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    (root / "bottle" / "test" / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (4, 4)).save(root / "bottle" / "test" / ".ipynb_checkpoints" / "x.png")
    Image.new("RGB", (4, 4)).save(root / "bottle" / "test" / "good" / "._000.png")  # a macOS resource fork
    (root / "bottle" / "test" / "good" / ".ipynb_checkpoints").mkdir()  # hidden, inside a class folder
    Image.new("RGB", (4, 4)).save(root / "bottle" / "test" / "good" / ".ipynb_checkpoints" / "000-checkpoint.png")
    (root / ".cache" / "train" / "good").mkdir(parents=True)
    assert ds.mvtec_categories(root) == ["bottle", "screw"]
    source = build_dataset("mvtec", root, False, no_transform, category="bottle")
    assert source.class_names == ["good", "broken_large", "contamination"] and len(source.splits["test"].labels) == 8
    assert source.normal_classes == ["good"]
    (root / "bottle" / "test" / "alias").symlink_to(root / "bottle" / "train" / "good")
    with pytest.raises(DatasetError, match="is reached twice .*train/good/000.png and .*test/alias/000.png"):
        build_dataset("mvtec", root, False, no_transform, category="bottle")
    (root / "bottle" / "test" / "alias").unlink()
    (root / "bottle" / "test" / "contamination" / "loop").symlink_to(root / "bottle" / "test")
    with pytest.raises(DatasetError, match="is reached twice"):
        build_dataset("mvtec", root, False, no_transform, category="bottle")


def test_folder_file_linked_into_both_splits_is_refused(tmp_path):
    from conftest import make_image_tree

    root = make_image_tree(tmp_path / "images")
    (root / "test" / "red" / "linked.png").symlink_to(root / "train" / "red" / "000.png")
    with pytest.raises(DatasetError, match="is reached twice"):
        build_dataset("folder", root, False, no_transform)


def test_cats_vs_dogs_odd_files(tmp_path):
    for name in ("Cat", "Dog"):
        (tmp_path / name).mkdir()
        for i in range(4):
            (tmp_path / name / f"{i}.jpg").write_bytes(_jpeg((0, 0, 0)))
    Image.fromarray(np.zeros((4, 4), np.float32), mode="F").save(tmp_path / "Cat" / "1.tif")  # load_image refuses it
    (tmp_path / "Cat" / "².jpg").write_bytes(_jpeg((0, 0, 0)))  # a digit to str.isdigit, not to int()
    (tmp_path / "Dog" / "9.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "PetImages").mkdir()  # empty: the class folders at the top are used
    source = ds.build_cats_vs_dogs(tmp_path, no_transform, train_per_class=3, test_per_class=2)
    assert sorted(source.skipped_files) == ["Cat/1.tif", "Dog/9.jpg"]
    assert source.splits["train"].sample_ids[:3] == ["Cat/0.jpg", "Cat/1.jpg", "Cat/2.jpg"]
    assert source.splits["test"].sample_ids[:2] == ["Cat/3.jpg", "Cat/².jpg"]
    (tmp_path / "Dog" / "3.jpg").unlink()
    (tmp_path / "Dog" / "3.jpg").symlink_to(tmp_path / "Cat" / "0.jpg")
    with pytest.raises(DatasetError, match="is reached twice"):
        ds.build_cats_vs_dogs(tmp_path, no_transform, train_per_class=3, test_per_class=2)


def test_cats_vs_dogs_folder_names_in_mixed_case(tmp_path):
    for split in ("train", "test"):
        for name, colour in (("cat", (200, 0, 0)), ("Dog", (0, 0, 200))):
            (tmp_path / split / name).mkdir(parents=True)
            (tmp_path / split / name / "0.jpg").write_bytes(_jpeg(colour))
    source = build_dataset("cats-vs-dogs", tmp_path, False, no_transform)
    test = source.splits["test"]
    assert dict(zip(test.sample_ids, test.labels.tolist(), strict=True)) == {"test/cat/0.jpg": 0, "test/Dog/0.jpg": 1}
    assert loaded_labels(test) == [1, 0]  # ImageFolder order: Dog before cat; the loader yields the mapped labels


def test_train_subset_keeps_n_images_per_class_in_their_order_and_the_test_split_whole():
    full = build_dataset("digits", None, False, transform=None)
    source = build_dataset("digits", None, False, transform=None)
    source.take_train_subset(20, seed=0)
    train = source.splits["train"]
    assert np.bincount(train.labels).tolist() == [20] * 10
    assert len(train.dataset) == 200 and train.sample_ids == sorted(train.sample_ids)
    assert set(train.sample_ids) < set(full.splits["train"].sample_ids)
    assert source.splits["test"].sample_ids == full.splits["test"].sample_ids
    row = full.splits["train"].sample_ids.index(train.sample_ids[7])  # the same image behind the same id
    full.set_transform(np.asarray)
    source.set_transform(np.asarray)
    assert np.array_equal(train.dataset[7][0], full.splits["train"].dataset[row][0])
    again = build_dataset("digits", None, False, transform=None)
    again.take_train_subset(20, seed=0)
    assert again.splits["train"].sample_ids == train.sample_ids  # a fixed subset: the seed decides
    other = build_dataset("digits", None, False, transform=None)
    other.take_train_subset(20, seed=1)
    assert other.splits["train"].sample_ids != train.sample_ids
    assert "train: 20 images per class (seed 0)" in source.description


def test_a_train_subset_larger_than_a_class_is_refused_naming_the_class():
    source = build_dataset("digits", None, False, transform=None)
    with pytest.raises(DatasetError, match=r"--train-per-class 100: class '0' of digits has 89 train images"):
        source.take_train_subset(100, seed=0)


def test_a_file_name_that_is_not_utf8_is_refused_naming_it(tmp_path):
    import os

    from conftest import make_image_tree

    root = make_image_tree(tmp_path / "data")
    first = sorted((root / "train" / "blue").iterdir())[0]
    os.link(first, os.path.join(os.fsencode(root / "train" / "blue"), b"caf\xe9.png"))  # a Latin-1 name
    with pytest.raises(DatasetError, match=r"the file name 'train/blue/caf\\\\xe9.png' is not valid UTF-8; rename it"):
        build_dataset("folder", root, False, no_transform)


def test_images_in_a_sub_folder_of_a_class_folder_belong_to_that_class(tmp_path):
    import shutil

    from conftest import make_image_tree

    root = make_image_tree(tmp_path / "data")
    (root / "train" / "red" / "more").mkdir()
    shutil.copy(sorted((root / "train" / "blue").iterdir())[0], root / "train" / "red" / "more" / "x.png")
    train = build_dataset("folder", root, False, no_transform).splits["train"]
    (index,) = [i for i, name in enumerate(train.sample_ids) if name == "train/red/more/x.png"]
    assert train.labels[index] == 1  # red, as docs/datasets.md says
