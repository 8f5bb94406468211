"""The feature cache: CacheWriter -> FeatureCache round trip, layout, validation errors, pickling, fingerprint."""

from __future__ import annotations

import pickle
import re

import h5py
import numpy as np
import pytest

import cache
from cache import (
    FORMAT_NAME,
    FORMAT_VERSION,
    TEMP_SUFFIX,
    CacheError,
    CacheWriter,
    FeatureCache,
)
from cache.schema import CHUNK_BYTES, REQUIRED_ROOT_ATTRS, chunk_rows

from conftest import cache_attrs, gaussian_splits, write_cache

KIB = 1024
MIB = 1024 * 1024


def _temp(path):
    return path.with_name(path.name + TEMP_SUFFIX)


def _poke(path, fn):
    """Edit a finished cache file in place with raw h5py (simulating damage or another writer)."""
    with h5py.File(path, "r+") as f:
        fn(f)


# ----------------------------------------------------------------------------------------------------------------
# round trip
# ----------------------------------------------------------------------------------------------------------------


def test_round_trip_arrays_attributes_ids_and_counts(tmp_path):
    splits = gaussian_splits(n_train=7, n_test=5, dim=6, grid=(2, 3), num_classes=3)
    path = write_cache(tmp_path / "c.h5", splits, ["ant", "bee", "cat"], patch_grid=(2, 3))
    assert path == tmp_path / "c.h5"
    assert path.is_file()
    assert not _temp(path).exists()

    with FeatureCache(path) as fc:
        # attributes come back decoded: JSON lists as lists, numpy scalars as Python scalars
        expected = cache_attrs(["ant", "bee", "cat"], 6, (2, 3))
        for key, value in expected.items():
            assert fc.attrs[key] == value, key
            assert type(fc.attrs[key]) is type(value), key
        assert fc.attrs["format"] == FORMAT_NAME
        assert fc.attrs["format_version"] == FORMAT_VERSION
        assert fc.attrs["complete"] is True
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", fc.attrs["created"])
        assert set(fc.attrs) == set(REQUIRED_ROOT_ATTRS) | {"layer"}
        assert fc.attrs["layer"] == "final"  # a cache written without the attribute holds the final features
        assert fc.class_names == ["ant", "bee", "cat"]

        for name, (cls, patches, labels) in splits.items():
            split = fc.split(name)
            assert split.name == name
            assert split.num_rows == len(labels)
            assert split.labels.dtype == np.int64
            np.testing.assert_array_equal(split.labels, labels)
            assert split.sample_ids == [f"{name}/{i}" for i in range(len(labels))]
            got_cls, got_patches = split.read(slice(None))
            assert got_cls.dtype == np.float32 and got_patches.dtype == np.float32
            assert got_cls.shape == (len(labels), 6)
            assert got_patches.shape == (len(labels), 6, 6)
            np.testing.assert_array_equal(got_cls, cls)
            np.testing.assert_array_equal(got_patches, patches)
            np.testing.assert_array_equal(split.rows_of_class(1), np.flatnonzero(labels == 1))

        assert fc.class_counts("train") == {"ant": 7, "bee": 7, "cat": 7}
        assert fc.class_counts("test") == {"ant": 5, "bee": 5, "cat": 5}
        assert fc.split("train") is fc.split("train")
        with pytest.raises(ValueError, match="split must be one of"):
            fc.split("val")


def test_class_counts_include_classes_without_rows(tmp_path):
    cls = np.zeros((5, 4), np.float32)
    patches = np.zeros((5, 1, 4), np.float32)
    splits = {"train": (cls, patches, np.array([0, 0, 2, 2, 2])), "test": (cls, patches, np.array([1, 0, 2, 2, 2]))}
    path = write_cache(tmp_path / "c.h5", splits, ["x", "y", "z", "w"], patch_grid=(1, 1))
    with FeatureCache(path) as fc:
        assert fc.class_counts("train") == {"x": 2, "y": 0, "z": 3, "w": 0}
        assert fc.class_counts("test") == {"x": 1, "y": 1, "z": 3, "w": 0}


def test_unicode_sample_ids_and_extra_attributes_round_trip(tmp_path):
    path = tmp_path / "c.h5"
    cls = np.arange(6, dtype=np.float32).reshape(3, 2)
    patches = np.repeat(cls[:, None, :], 4, axis=1)
    ids = ["train/chat/été.png", "train/猫/1.png", "train/dog/a b.png"]
    with CacheWriter(path) as writer:
        for split in ("train", "test"):
            writer.create_split(split, 3, 2, 4, "float32")
            writer.write(split, 0, cls, patches, np.array([0, 1, 1]), ids)
        writer.finish(cache_attrs(["chat", "猫"], 2, (2, 2), extract_seconds=1.5, images_per_second=2.0))
    with FeatureCache(path) as fc:
        assert fc.split("train").sample_ids == ids
        assert fc.class_names == ["chat", "猫"]
        assert fc.attrs["extract_seconds"] == 1.5
        assert isinstance(fc.attrs["extract_seconds"], float)


def test_rows_written_in_several_blocks(tmp_path):
    splits = gaussian_splits(n_train=10, n_test=4, dim=3, num_classes=2)
    path = tmp_path / "c.h5"
    with CacheWriter(path) as writer:
        for name, (cls, patches, labels) in splits.items():
            writer.create_split(name, len(cls), 3, 4, "float32")
            for start in range(0, len(cls), 3):  # blocks of 3 rows, the last one shorter
                stop = min(start + 3, len(cls))
                writer.write(name, start, cls[start:stop], patches[start:stop], labels[start:stop],
                             [f"{name}/{i}" for i in range(start, stop)])
        writer.finish(cache_attrs(["a", "b"], 3, (2, 2)))
    with FeatureCache(path) as fc:
        for name, (cls, patches, _labels) in splits.items():
            got_cls, got_patches = fc.split(name).read(slice(None))
            np.testing.assert_array_equal(got_cls, cls)
            np.testing.assert_array_equal(got_patches, patches)
            blocks = list(fc.split(name).iter_blocks(4))
            assert [start for start, _, _ in blocks] == list(range(0, len(cls), 4))
            np.testing.assert_array_equal(np.concatenate([b[1] for b in blocks]), cls)
            np.testing.assert_array_equal(np.concatenate([b[2] for b in blocks]), patches)


def test_empty_split_round_trips(tmp_path):
    splits = gaussian_splits(n_train=3, n_test=0, dim=4, num_classes=2)
    path = write_cache(tmp_path / "c.h5", splits, ["a", "b"])
    with FeatureCache(path) as fc:
        assert fc.split("test").num_rows == 0
        cls, patches = fc.split("test").read(np.array([], dtype=np.int64))
        assert cls.shape == (0, 4) and patches.shape == (0, 4, 4)
        assert fc.class_counts("test") == {"a": 0, "b": 0}


# ----------------------------------------------------------------------------------------------------------------
# layout: chunks and dtype
# ----------------------------------------------------------------------------------------------------------------


def _chunk_bytes(dataset) -> int:
    return int(np.prod(dataset.chunks)) * dataset.dtype.itemsize


def test_chunk_rows_targets_chunk_bytes():
    assert CHUNK_BYTES == 512 * KIB
    assert chunk_rows(row_bytes=512, num_rows=10_000) == 1024
    assert chunk_rows(row_bytes=512, num_rows=100) == 100  # never longer than the dataset
    assert chunk_rows(row_bytes=4 * MIB, num_rows=100) == 1  # at least one row
    assert chunk_rows(row_bytes=0, num_rows=0) == 1


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_datasets_are_chunked_along_n_within_the_recommended_band(tmp_path, dtype):
    n, d, grid = 1100, 128, (4, 4)
    rng = np.random.default_rng(1)
    cls = rng.standard_normal((n, d)).astype(dtype)
    patches = rng.standard_normal((n, 16, d)).astype(dtype)
    labels = rng.integers(0, 2, n)
    split = (cls, patches, labels)
    path = write_cache(tmp_path / "big.h5", {"train": split, "test": split}, ["a", "b"], patch_grid=grid, dtype=dtype)
    item = np.dtype(dtype).itemsize
    with h5py.File(path, "r") as f:
        for name in ("train", "test"):
            g = f[name]
            # chunked along N only: every other axis is whole
            assert g["cls"].chunks[1:] == (d,)
            assert g["patches"].chunks[1:] == (16, d)
            assert g["label"].chunks is not None and g["sample_id"].chunks is not None
            # cls: 1100 rows * 128 * item bytes is above 512 KiB for float32 only
            expected_cls_rows = min(n, CHUNK_BYTES // (d * item))
            assert g["cls"].chunks[0] == expected_cls_rows
            # patches: rows of 8 or 4 KiB -> 64 or 128 rows per chunk, far fewer than N
            assert g["patches"].chunks[0] == CHUNK_BYTES // (16 * d * item)
            assert g["patches"].chunks[0] < n
            for key in ("cls", "patches", "label"):
                row_bytes = int(np.prod(g[key].shape[1:])) * g[key].dtype.itemsize
                size = _chunk_bytes(g[key])
                assert size <= MIB, key
                assert size >= min(10 * KIB, n * row_bytes), key
            assert g["cls"].dtype == np.dtype(dtype)
            assert g["patches"].dtype == np.dtype(dtype)
            assert g["label"].dtype == np.int64
    if dtype == "float32":
        with h5py.File(path, "r") as f:
            assert f["train/cls"].chunks[0] == 1024 < n


def test_float16_storage(tmp_path):
    splits = gaussian_splits(n_train=5, n_test=5, dim=6, num_classes=2, seed=3)
    path = write_cache(tmp_path / "h.h5", splits, ["a", "b"], dtype="float16")
    with h5py.File(path, "r") as f:
        assert f["train/cls"].dtype == np.float16
        assert f["train/patches"].dtype == np.float16
    with FeatureCache(path) as fc:
        assert fc.attrs["dtype"] == "float16"
        cls, patches = fc.split("train").read(slice(None))
        assert cls.dtype == np.float32 and patches.dtype == np.float32
        np.testing.assert_array_equal(cls, splits["train"][0].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(patches, splits["train"][1].astype(np.float16).astype(np.float32))
        # float16 really lost precision (the test would pass trivially otherwise)
        assert not np.array_equal(cls, splits["train"][0])


def test_create_split_rejects_unknown_split_and_dtype(tmp_path):
    with CacheWriter(tmp_path / "c.h5") as writer:
        with pytest.raises(ValueError, match=r"split must be one of .*'val'"):
            writer.create_split("val", 3, 2, 1, "float32")
        with pytest.raises(ValueError, match=r"dtype must be one of .*'float64'"):
            writer.create_split("train", 3, 2, 1, "float64")
        writer.abort()
    assert not (tmp_path / "c.h5").exists()
    assert not _temp(tmp_path / "c.h5").exists()


# ----------------------------------------------------------------------------------------------------------------
# interrupted writes
# ----------------------------------------------------------------------------------------------------------------


def test_exception_inside_writer_leaves_no_file(tmp_path):
    path = tmp_path / "sub" / "c.h5"
    with pytest.raises(RuntimeError, match="boom"):
        with CacheWriter(path) as writer:
            writer.create_split("train", 4, 2, 1, "float32")
            writer.write("train", 0, np.ones((2, 2)), np.ones((2, 1, 2)), np.zeros(2), ["a", "b"])
            assert _temp(path).is_file()  # work in progress lives under the temporary name only
            assert not path.exists()
            raise RuntimeError("boom")
    assert not path.exists()
    assert not _temp(path).exists()
    assert list(path.parent.iterdir()) == []


def test_finish_refuses_unwritten_rows_and_missing_attributes(tmp_path):
    path = tmp_path / "c.h5"
    with pytest.raises(CacheError, match=r"split 'train': 2 rows were never written"):
        with CacheWriter(path) as writer:
            writer.create_split("train", 4, 2, 1, "float32")
            writer.write("train", 0, np.ones((2, 2)), np.ones((2, 1, 2)), np.zeros(2), ["a", "b"])
            writer.finish(cache_attrs(["a"], 2, (1, 1)))
    assert not path.exists() and not _temp(path).exists()

    attrs = cache_attrs(["a"], 2, (1, 1))
    del attrs["backbone"]
    with pytest.raises(CacheError, match=r"cache attributes missing: \['backbone'\]"):
        with CacheWriter(path) as writer:
            for split in ("train", "test"):
                writer.create_split(split, 1, 2, 1, "float32")
                writer.write(split, 0, np.ones((1, 2)), np.ones((1, 1, 2)), np.zeros(1), ["a"])
            writer.finish(attrs)
    assert not path.exists() and not _temp(path).exists()


def test_aborted_overwrite_keeps_the_previous_cache(tmp_path):
    path = write_cache(tmp_path / "c.h5", gaussian_splits(n_train=3, n_test=2), ["a", "b", "c"])
    before = FeatureCache(path).fingerprint()
    with pytest.raises(KeyboardInterrupt):
        with CacheWriter(path, overwrite=True) as writer:
            writer.create_split("train", 1, 6, 4, "float32")
            raise KeyboardInterrupt
    assert not _temp(path).exists()
    assert FeatureCache(path).fingerprint() == before


def test_refuses_to_overwrite_without_overwrite(tmp_path):
    path = write_cache(tmp_path / "c.h5", gaussian_splits(n_train=3, n_test=2), ["a", "b", "c"])
    before = path.read_bytes()
    with pytest.raises(CacheError, match=r"exists already; pass --overwrite"):
        CacheWriter(path)
    assert path.read_bytes() == before
    assert not _temp(path).exists()
    # with overwrite=True the old file is replaced
    write_cache(path, gaussian_splits(n_train=2, n_test=2, num_classes=2), ["p", "q"])
    with FeatureCache(path) as fc:
        assert fc.class_names == ["p", "q"]
        assert fc.split("train").num_rows == 4


def test_writer_in_unwritable_place_raises_cache_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(CacheError, match="cannot write cache file"):
        CacheWriter(blocker / "c.h5")


# ----------------------------------------------------------------------------------------------------------------
# refused files
# ----------------------------------------------------------------------------------------------------------------


def test_missing_file_and_unfinished_temporary_file(tmp_path):
    path = tmp_path / "c.h5"
    with pytest.raises(CacheError, match=r"c\.h5 does not exist$"):
        FeatureCache(path)
    writer = CacheWriter(path)  # a writer killed before finish(): only the .writing file remains
    writer.create_split("train", 2, 2, 1, "float32")
    writer._file.flush()
    with pytest.raises(CacheError, match=r"c\.h5 does not exist$"):
        FeatureCache(path)
    writer._file.close()
    # opening the temporary file itself: the complete mark is False
    with pytest.raises(CacheError, match=r"c\.h5\.writing is incomplete \(its extraction did not finish\)"):
        FeatureCache(_temp(path))
    writer.abort()
    assert not _temp(path).exists()


def test_incomplete_mark_is_refused(tmp_path):
    path = write_cache(tmp_path / "c.h5", gaussian_splits(n_train=3, n_test=2), ["a", "b", "c"])
    _poke(path, lambda f: f.attrs.__setitem__("complete", False))
    with pytest.raises(CacheError, match="is incomplete"):
        FeatureCache(path)


def test_non_hdf5_file(tmp_path):
    path = tmp_path / "c.h5"
    path.write_bytes(b"this is plain text, not HDF5\n" * 10)
    with pytest.raises(CacheError, match=r"c\.h5 is not a readable HDF5 file"):
        FeatureCache(path)


def test_empty_file(tmp_path):
    path = tmp_path / "c.h5"
    path.write_bytes(b"")
    with pytest.raises(CacheError, match="is not a readable HDF5 file"):
        FeatureCache(path)


def test_truncated_hdf5_file(tmp_path):
    path = write_cache(tmp_path / "c.h5", gaussian_splits(), ["a", "b", "c"])
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 100):
        damaged = tmp_path / f"cut{cut}.h5"
        damaged.write_bytes(data[:cut])
        with pytest.raises(CacheError, match=r"is not a readable HDF5 file \(truncated"):
            FeatureCache(damaged)


def test_a_filesystem_without_locks_points_to_hdf5_use_file_locking(tmp_path, monkeypatch):
    path = write_cache(tmp_path / "c.h5", gaussian_splits(), ["a", "b", "c"])

    def unlockable(*args, **kwargs):  # what h5py raises where flock is not implemented (some network mounts)
        raise OSError("Unable to synchronously open file (unable to lock file, errno = 38, error message = "
                      "'Function not implemented')")

    monkeypatch.setattr(h5py, "File", unlockable)
    with pytest.raises(CacheError, match=r"c\.h5 cannot be locked for reading on its filesystem \(HDF5 file locking: "
                                         r"Function not implemented\); set HDF5_USE_FILE_LOCKING=FALSE"):
        FeatureCache(path)


def test_other_format_name(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "anndata"
        f.create_dataset("X", data=np.zeros((2, 2)))
    with pytest.raises(CacheError, match=r"other\.h5 is not a sanf-ad-features cache \(format attribute: "
                                         r"'anndata'\)"):
        FeatureCache(path)
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f.create_dataset("X", data=np.zeros(2))
    with pytest.raises(CacheError, match=r"is not a sanf-ad-features cache \(format attribute: None\)"):
        FeatureCache(plain)


@pytest.mark.parametrize("version", [3, 0, "1"])
def test_unknown_format_version(tmp_path, version):
    path = write_cache(tmp_path / "c.h5", gaussian_splits(n_train=3, n_test=2), ["a", "b", "c"])
    _poke(path, lambda f: f.attrs.__setitem__("format_version", version))
    with pytest.raises(CacheError, match=rf"has format version {re.escape(repr(version))}; this build reads "
                                         r"versions \[1, 2\]"):
        FeatureCache(path)


def test_format_1_caches_stay_readable(tmp_path):
    """Format 2 changed what ``cls`` holds only for kinds format 1 never wrote."""
    path = write_cache(tmp_path / "c.h5", gaussian_splits(n_train=3, n_test=2), ["a", "b", "c"])
    with h5py.File(path, "r") as f:
        assert f.attrs["format_version"] == FORMAT_VERSION == 2
    _poke(path, lambda f: f.attrs.__setitem__("format_version", 1))
    with FeatureCache(path) as fc:
        assert fc.attrs["format_version"] == 1 and fc.attrs["semantic_vector"] == "class_token"


@pytest.mark.parametrize("bad_label", [3, -1])
def test_labels_out_of_range(tmp_path, bad_label):
    splits = gaussian_splits(n_train=3, n_test=2)
    cls, patches, labels = splits["test"]
    labels = labels.copy()
    labels[4] = bad_label
    splits["test"] = (cls, patches, labels)
    path = write_cache(tmp_path / "c.h5", splits, ["a", "b", "c"])
    with pytest.raises(CacheError, match=r"/test/label holds values outside 0\.\.2"):
        FeatureCache(path)


@pytest.mark.parametrize("dataset", ["cls", "patches", "label", "sample_id"])
def test_missing_dataset(tmp_path, dataset):
    path = write_cache(tmp_path / "c.h5", gaussian_splits(n_train=3, n_test=2), ["a", "b", "c"])
    _poke(path, lambda f: f["train"].__delitem__(dataset))
    with pytest.raises(CacheError, match=rf"split 'train' lacks datasets \['{dataset}'\]"):
        FeatureCache(path)


def test_missing_split(tmp_path):
    path = write_cache(tmp_path / "c.h5", gaussian_splits(n_train=3, n_test=2), ["a", "b", "c"])
    _poke(path, lambda f: f.__delitem__("test"))
    with pytest.raises(CacheError, match=r"has no split 'test'"):
        FeatureCache(path)


def test_missing_root_attribute(tmp_path):
    path = write_cache(tmp_path / "c.h5", gaussian_splits(n_train=3, n_test=2), ["a", "b", "c"])
    _poke(path, lambda f: f.attrs.__delitem__("weights_source"))
    with pytest.raises(CacheError, match=r"lacks required attributes \['weights_source'\]"):
        FeatureCache(path)


def test_inconsistent_shapes(tmp_path):
    path = write_cache(tmp_path / "c.h5", gaussian_splits(n_train=3, n_test=2), ["a", "b", "c"])
    _poke(path, lambda f: f.attrs.__setitem__("feature_dim", 7))
    with pytest.raises(CacheError, match=r"/train/cls has shape \(9, 6\), expected \(9, 7\)"):
        FeatureCache(path)
    path = write_cache(tmp_path / "d.h5", gaussian_splits(n_train=3, n_test=2), ["a", "b", "c"])

    def shorten_ids(f):
        del f["test/sample_id"]
        f["test"].create_dataset("sample_id", data=np.array([b"x"] * 5, dtype=object),
                                 dtype=h5py.string_dtype("utf-8"))

    _poke(path, shorten_ids)
    with pytest.raises(CacheError, match=r"/test/sample_id has shape \(5,\), expected \(6,\)"):
        FeatureCache(path)


def test_failed_validation_does_not_keep_the_file_open(tmp_path):
    path = write_cache(tmp_path / "c.h5", gaussian_splits(n_train=3, n_test=2), ["a", "b", "c"])
    _poke(path, lambda f: f.attrs.__setitem__("format_version", 99))
    try:
        FeatureCache(path)
    except CacheError as err:  # a caller that keeps the error (logs it, re-raises it later)
        kept = err
    # repair it in the same process
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 1
    assert FeatureCache(path).attrs["format_version"] == 1
    assert kept is not None


def test_cache_error_is_exported():
    assert cache.CacheError is CacheError
    assert issubclass(CacheError, Exception)


# ----------------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------------


def test_pickle_round_trip_reopens_the_file(gaussian_cache):
    fc = FeatureCache(gaussian_cache)
    expected = fc.split("test").read(np.array([0, 5, 59]))
    assert fc._file is not None
    clone = pickle.loads(pickle.dumps(fc))
    assert clone._file is None  # nothing open travels through the pickle
    assert clone.attrs == fc.attrs
    assert clone.class_names == ["a", "b", "c"]
    got = clone.split("test").read(np.array([0, 5, 59]))
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert clone.file.id.valid
    assert clone.fingerprint() == fc.fingerprint()
    # pickling a cache whose file is closed works as well, and the copy reopens it
    fc.close()
    assert fc._file is None
    clone2 = pickle.loads(pickle.dumps(fc))
    np.testing.assert_array_equal(clone2.split("test").labels, np.repeat([0, 1, 2], 20))
    clone.close()
    clone2.close()


def test_closed_cache_reopens_on_use(gaussian_cache):
    fc = FeatureCache(gaussian_cache)
    fc.close()
    assert fc.split("train").num_rows == 120
    assert fc.file.id.valid
    fc.close()


def test_read_rows_returns_exactly_those_rows(gaussian_cache):
    splits = gaussian_splits()
    all_cls, all_patches, _ = splits["train"]
    with FeatureCache(gaussian_cache) as fc:
        train = fc.split("train")
        for rows in ([0, 1, 2, 7, 8, 40, 119], [3], [5, 9, 11, 13], list(range(30, 60)), [0, 119]):
            cls, patches = train.read(np.array(rows))
            assert cls.shape == (len(rows), 6)
            assert patches.shape == (len(rows), 4, 6)
            np.testing.assert_array_equal(cls, all_cls[rows])
            np.testing.assert_array_equal(patches, all_patches[rows])
        # rows of one class, as fit_cache reads them
        rows = train.rows_of_class(2)
        np.testing.assert_array_equal(rows, np.arange(80, 120))
        np.testing.assert_array_equal(train.read(rows)[0], all_cls[80:120])
        # an empty selection
        cls, patches = train.read(np.array([], dtype=np.int64))
        assert cls.shape == (0, 6) and patches.shape == (0, 4, 6)
        # a slice
        np.testing.assert_array_equal(train.read(slice(10, 20))[0], all_cls[10:20])


def test_read_unsorted_and_repeated_rows(gaussian_cache):
    all_cls, all_patches, _ = gaussian_splits()["train"]
    rows = [9, 3, 4, 4, 100, 99]
    with FeatureCache(gaussian_cache) as fc:
        cls, patches = fc.split("train").read(np.array(rows))
    np.testing.assert_array_equal(cls, all_cls[rows])
    np.testing.assert_array_equal(patches, all_patches[rows])


def test_read_out_of_range_rows_raises(gaussian_cache):
    with FeatureCache(gaussian_cache) as fc:
        with pytest.raises((IndexError, ValueError)):
            fc.split("test").read(np.array([0, 60]))


# ----------------------------------------------------------------------------------------------------------------
# fingerprint
# ----------------------------------------------------------------------------------------------------------------


def test_fingerprint_is_stable_on_reopen(gaussian_cache):
    with FeatureCache(gaussian_cache) as fc:
        first = fc.fingerprint()
        assert re.fullmatch(r"[0-9a-f]{64}", first)
        assert fc.fingerprint() == first
    with FeatureCache(gaussian_cache) as again:
        assert again.fingerprint() == first
    clone = pickle.loads(pickle.dumps(FeatureCache(gaussian_cache)))
    assert clone.fingerprint() == first


def test_fingerprint_changes_with_cls_values_labels_and_ids(gaussian_cache):
    with FeatureCache(gaussian_cache) as fc:
        original = fc.fingerprint()

    def bump_cls(f):
        f["test/cls"][7, 2] = f["test/cls"][7, 2] + 1.0

    _poke(gaussian_cache, bump_cls)
    with FeatureCache(gaussian_cache) as fc:
        changed_cls = fc.fingerprint()
    assert changed_cls != original

    def undo_cls(f):
        f["test/cls"][7, 2] = f["test/cls"][7, 2] - 1.0

    _poke(gaussian_cache, undo_cls)
    with FeatureCache(gaussian_cache) as fc:
        assert fc.fingerprint() == original  # same content, same fingerprint

    def relabel(f):
        f["train/label"][0] = 1

    _poke(gaussian_cache, relabel)
    with FeatureCache(gaussian_cache) as fc:
        relabelled = fc.fingerprint()
    assert relabelled not in (original, changed_cls)

    def rename(f):
        f["train/sample_id"][0] = "train/renamed"

    _poke(gaussian_cache, rename)
    with FeatureCache(gaussian_cache) as fc:
        assert fc.fingerprint() not in (original, changed_cls, relabelled)


def test_fingerprint_changes_with_attributes(gaussian_cache):
    with FeatureCache(gaussian_cache) as fc:
        original = fc.fingerprint()
    _poke(gaussian_cache, lambda f: f.attrs.__setitem__("created", "2000-01-01T00:00:00+00:00"))
    with FeatureCache(gaussian_cache) as fc:
        assert fc.fingerprint() != original


@pytest.mark.parametrize("edit,fragment", [
    (lambda f: f.attrs.__setitem__("class_names", "5"), "'class_names' must be a non-empty list of strings"),
    (lambda f: f.attrs.__setitem__("class_names", "not json"), "attribute 'class_names' is not valid JSON"),
    (lambda f: f.attrs.__setitem__("feature_dim", "abc"), "'feature_dim' must be a positive integer, got 'abc'"),
    (lambda f: f.attrs.__setitem__("complete", "False"), "attribute 'complete' must be a boolean, got 'False'"),
    (lambda f: f.attrs.__setitem__("format_version", True), "has format version True"),
    (lambda f: f.attrs.__setitem__("dataset", 5), "attributes ['dataset'] must be strings"),
    (lambda f: f.attrs.__setitem__("class_names", '["a", "a", "c"]'), "'class_names' repeats a name"),
    (lambda f: _replace(f, "train/sample_id", np.arange(21)), "/train/sample_id must hold strings, got int64"),
    (lambda f: _replace(f, "train/label", np.zeros((21, 1), np.int64)), "/train/label must be a 1-D integer array"),
    (lambda f: _replace(f, "train/label", np.zeros(21) + 0.5), "/train/label must be a 1-D integer array"),
    (lambda f: _replace(f, "test/cls", np.array([[b"x"] * 6] * 15)), "/test/cls must hold floats"),
    (lambda f: _replace(f, "test/patches", None), "split 'test' lacks datasets ['patches']"),
    (lambda f: f.attrs.__setitem__("normal_classes", '["zz"]'), "'normal_classes' must be a non-empty list of class "
                                                               "names, got ['zz']"),
    (lambda f: f.attrs.__setitem__("normal_classes", '[["a"]]'), "'normal_classes' must be a non-empty list"),
    (lambda f: f.attrs.__setitem__("normal_classes", '[]'), "'normal_classes' must be a non-empty list"),
])
def test_malformed_caches_are_refused(tmp_path, edit, fragment):
    path = write_cache(tmp_path / "c.h5", gaussian_splits(n_train=7, n_test=5), ["a", "b", "c"])
    _poke(path, edit)
    with pytest.raises(CacheError, match=re.escape(fragment)):
        FeatureCache(path)


def _replace(f, name, data):
    del f[name]
    if data is not None:
        f[name] = data


# ----------------------------------------------------------------------------------------------------------------
# optional fine labels (CIFAR-100)
# ----------------------------------------------------------------------------------------------------------------


def _fine_cache(path, fine_names=("f0", "f1", "f2", "f3")):
    """Gaussian cache with fine labels: class k's rows alternate between fine classes 2k mod 4 and 2k + 1 mod 4."""
    splits = gaussian_splits(n_train=4, n_test=2, num_classes=2)
    with CacheWriter(path) as writer:
        for split, (cls, patches, labels) in splits.items():
            writer.create_split(split, len(cls), cls.shape[1], patches.shape[1], "float32")
            writer.write(split, 0, cls, patches, labels, [f"{split}/{i}" for i in range(len(cls))])
            writer.write_fine_labels(split, 2 * labels + np.arange(len(labels)) % 2)
        return writer.finish(cache_attrs(["a", "b"], cls.shape[1], (2, 2), fine_class_names=list(fine_names)))


def test_fine_labels_round_trip_and_enter_the_fingerprint(tmp_path):
    path = _fine_cache(tmp_path / "c.h5")
    with FeatureCache(path) as fc:
        assert fc.fine_class_names == ["f0", "f1", "f2", "f3"]
        assert fc.split("train").fine_labels.tolist() == [0, 1, 0, 1, 2, 3, 2, 3]
        assert fc.split("test").fine_labels.dtype == np.int64
        before = fc.fingerprint()
    _poke(path, lambda f: f["train/fine_label"].__setitem__(0, 1))
    with FeatureCache(path) as fc:
        assert fc.fingerprint() != before


def test_a_cache_without_fine_labels_has_none(gaussian_cache):
    with FeatureCache(gaussian_cache) as fc:
        assert fc.fine_class_names is None and fc.split("train").fine_labels is None


def test_writer_refuses_fine_labels_without_names_or_of_the_wrong_length(tmp_path):
    splits = gaussian_splits(n_train=2, n_test=1, num_classes=2)
    with pytest.raises(CacheError, match="fine labels must be written for every split"):
        with CacheWriter(tmp_path / "c.h5") as writer:
            for split, (cls, patches, labels) in splits.items():
                writer.create_split(split, len(cls), cls.shape[1], patches.shape[1], "float32")
                writer.write(split, 0, cls, patches, labels, [f"{split}/{i}" for i in range(len(cls))])
                writer.write_fine_labels(split, labels)
            writer.finish(cache_attrs(["a", "b"], cls.shape[1], (2, 2)))
    assert not list(tmp_path.iterdir())
    with CacheWriter(tmp_path / "d.h5") as writer:
        cls, patches, labels = splits["train"]
        writer.create_split("train", len(cls), cls.shape[1], patches.shape[1], "float32")
        with pytest.raises(ValueError, match=r"fine labels of shape \(3,\), expected \(4,\)"):
            writer.write_fine_labels("train", labels[:3])
        writer.abort()


@pytest.mark.parametrize("edit,fragment", [
    (lambda f: f.attrs.__delitem__("fine_class_names"), "/train/fine_label and the attribute 'fine_class_names' must"),
    (lambda f: _replace(f, "test/fine_label", None), "/test/fine_label and the attribute 'fine_class_names' must"),
    (lambda f: f["train/fine_label"].__setitem__(0, 4), "/train/fine_label holds values outside 0..3"),
    (lambda f: _replace(f, "test/fine_label", np.zeros(3, np.int64)), "/test/fine_label must be a 1-D integer array of "
                                                                      "length 4"),
    (lambda f: f.attrs.__setitem__("fine_class_names", '"abc"'), "'fine_class_names' must be a non-empty list"),
])
def test_malformed_fine_labels_are_refused(tmp_path, edit, fragment):
    path = _fine_cache(tmp_path / "c.h5")
    _poke(path, edit)
    with pytest.raises(CacheError, match=re.escape(fragment)):
        FeatureCache(path)
