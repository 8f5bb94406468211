"""CacheRows in DataLoader workers: 4 workers under fork and spawn read every row exactly once, correctly."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cache import FeatureCache
from cache.dataset import CacheRows

from conftest import gaussian_splits, write_cache


@pytest.fixture
def cache_path(tmp_path):
    # 3 classes x 37 train rows: 111 rows, so batches of 8 leave a final batch of 7
    return write_cache(tmp_path / "c.h5", gaussian_splits(n_train=37, n_test=5), ["a", "b", "c"])


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_four_workers_read_every_row_exactly_once(cache_path, context):
    data = CacheRows(cache_path, "train")
    data[0]  # the parent has the file open before the workers start (a forked child must not use that handle)
    loader = DataLoader(data, batch_size=8, shuffle=True, num_workers=4, multiprocessing_context=context,
                        generator=torch.Generator().manual_seed(0))
    seen, cls_rows, patch_rows = [], {}, {}
    for epoch in range(2):
        rows_this_epoch = []
        for cls, patches, labels, rows in loader:
            assert cls.shape[1:] == (6,) and patches.shape[1:] == (4, 6) and cls.dtype == torch.float32
            for i, row in enumerate(rows.tolist()):
                cls_rows[row] = cls[i].numpy()
                patch_rows[row] = patches[i].numpy()
                assert labels[i].item() == row // 37
            rows_this_epoch += rows.tolist()
        assert sorted(rows_this_epoch) == list(range(111)), f"epoch {epoch}"
        seen.append(rows_this_epoch)
    assert seen[0] != seen[1]  # shuffled per epoch, yet each row once per epoch
    with FeatureCache(cache_path) as fc:
        cls, patches = fc.split("train").read(slice(None))
    np.testing.assert_array_equal(np.stack([cls_rows[r] for r in range(111)]), cls)
    np.testing.assert_array_equal(np.stack([patch_rows[r] for r in range(111)]), patches)


def test_a_subset_of_rows_pickles_without_a_handle(cache_path):
    with FeatureCache(cache_path) as fc:
        rows = fc.split("test").rows_of_class(2)
    data = CacheRows(cache_path, "test", rows)
    assert len(data) == 5 and data.labels.tolist() == [2] * 5
    assert data[0][3] == 10 and data[4][3] == 14
    clone = pickle.loads(pickle.dumps(data))
    assert clone.cache._file is None
    torch.testing.assert_close(clone[2][1], data[2][1], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"rows must lie in 0\.\.14 for split 'test'"):
        CacheRows(cache_path, "test", np.array([15]))


def _report_handles(fc: FeatureCache, queue) -> None:
    inherited = fc._file
    queue.put((inherited is not None, fc.file is not inherited, fc.split("train").num_rows))


def test_a_forked_child_opens_its_own_handle(cache_path):
    """HDF5 handles must not be shared across fork: the child's first access opens a new one."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    with FeatureCache(cache_path) as fc:
        parent_handle = fc.file
        queue = ctx.Queue()
        child = ctx.Process(target=_report_handles, args=(fc, queue))
        child.start()
        child.join(60)
        assert child.exitcode == 0
        assert queue.get(timeout=10) == (True, True, 111)
        assert fc.file is parent_handle and parent_handle.id.valid  # the parent's handle is untouched
