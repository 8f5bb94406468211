"""ChunkStore and CacheLock: committed chunks, resume plans, damaged chunks, the lock between processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from cache import CacheError, CacheLock, ChunkStore, FeatureCache, lock_holder, partial_dir, partial_progress

from conftest import ROOT, RUNNING_EXTRACTION, cache_attrs, process_holding

D, P = 3, 2


def plan(num_train=5, num_test=3, chunk_rows=2, **extra) -> dict:
    return {"settings": {"x": 1}, "batch_size": 1, "chunk_rows": chunk_rows,
            "splits": {"train": {"num_rows": num_train}, "test": {"num_rows": num_test}}, **extra}


def rows(split: str, start: int, stop: int):
    base = np.arange(start, stop, dtype=np.float32)[:, None] + (0.5 if split == "test" else 0.0)
    cls = np.repeat(base, D, axis=1)
    patches = np.repeat(cls[:, None, :], P, axis=1)
    return cls, patches, np.arange(start, stop) % 2, [f"{split}/{i}" for i in range(start, stop)], (1, 2)


def commit_all(store: ChunkStore, only=None) -> None:
    for split in store.splits:
        for start, stop in store.pending(split):
            if only is None or (split, start) in only:
                store.commit(split, start, *rows(split, start, stop))


def finished_cache(path, the_plan: dict):
    """Commit every chunk of ``the_plan`` and assemble the cache at ``path``."""
    with ChunkStore(path, the_plan, log=lambda _: None) as store:
        commit_all(store)
        return store.assemble(attrs())


def attrs():
    return cache_attrs(["even", "odd"], D, (1, 2), token_grid=[1, 2])


def test_chunks_cover_each_split_and_assemble_into_a_cache(tmp_path):
    path = tmp_path / "c.h5"
    logs = []
    with ChunkStore(path, plan(), log=logs.append) as store:
        assert store.chunks("train") == [(0, 2), (2, 4), (4, 5)]
        assert store.chunks("test") == [(0, 2), (2, 3)]
        assert partial_dir(path).is_dir() and (tmp_path / "c.h5.lock").is_file()
        commit_all(store)
        assert store.pending("train") == [] and store.pending("test") == []
        assert store.geometry() == {"token_grid": [1, 2], "num_patches": P, "feature_dim": D}
        assert store.assemble(attrs()) == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5"]  # work folder and lock gone
    assert logs == []
    with FeatureCache(path) as fc:
        cls, patches = fc.split("train").read(slice(None))
        np.testing.assert_array_equal(cls[:, 0], np.arange(5))
        np.testing.assert_array_equal(fc.split("test").labels, [0, 1, 0])
        assert fc.split("test").sample_ids == ["test/0", "test/1", "test/2"]


def test_commit_refuses_rows_that_are_not_one_chunk(tmp_path):
    with ChunkStore(tmp_path / "c.h5", plan()) as store:
        with pytest.raises(ValueError, match=r"train rows 1\.\.3 are not one planned chunk"):
            store.commit("train", 1, *rows("train", 1, 3))
        with pytest.raises(ValueError, match=r"train rows 0\.\.1 are not one planned chunk"):
            store.commit("train", 0, *rows("train", 0, 1))
        with pytest.raises(CacheError, match=r"chunks not committed yet \{'train': 3, 'test': 2\}"):
            store.assemble(attrs())
    assert not partial_dir(tmp_path / "c.h5").exists()  # nothing committed: nothing kept


def test_interrupted_store_resumes_only_the_missing_chunks(tmp_path):
    path = tmp_path / "c.h5"
    with pytest.raises(KeyboardInterrupt):
        with ChunkStore(path, plan(), log=lambda _: None) as store:
            commit_all(store, only={("train", 0), ("test", 2)})
            raise KeyboardInterrupt
    assert partial_progress(path) == (2, 5)
    with pytest.raises(CacheError, match=r"interrupted with 2 of 5 chunks committed; run the same extract command"):
        FeatureCache(path)
    with pytest.raises(CacheError, match=r"c\.h5\.partial is the work folder of an interrupted extraction"):
        FeatureCache(partial_dir(path))
    logs = []
    with ChunkStore(path, plan(), log=logs.append) as store:
        assert logs == [f"resuming the interrupted extraction in {partial_dir(path)}: 2 of 5 chunks already "
                        "committed"]
        assert store.pending("train") == [(2, 4), (4, 5)]
        assert store.pending("test") == [(0, 2)]
        commit_all(store)
        store.assemble(attrs())
    with FeatureCache(path) as fc:
        np.testing.assert_array_equal(fc.split("test").read(slice(None))[0][:, 0], [0.5, 1.5, 2.5])


def test_a_running_extraction_is_named_by_the_pid_holding_its_lock_not_called_interrupted(tmp_path):
    path = tmp_path / "c.h5"
    assert lock_holder(path) is None  # no lock file
    with pytest.raises(KeyboardInterrupt), ChunkStore(path, plan(), log=lambda _: None) as store:
        commit_all(store, only={("train", 0), ("test", 2)})
        raise KeyboardInterrupt
    with process_holding(RUNNING_EXTRACTION, str(path), json.dumps(plan())) as proc:
        assert lock_holder(path) == str(proc.pid)
        with pytest.raises(CacheError, match=rf"c\.h5 does not exist yet: its extraction is being written by pid "
                                             rf"{proc.pid} \(2 of 5 chunks committed\); wait for it to finish$"):
            FeatureCache(path)
        with pytest.raises(CacheError, match=rf"c\.h5\.partial is the work folder of an extraction being written by "
                                             rf"pid {proc.pid}, not a cache; wait for it to finish, then use .*c\.h5$"):
            FeatureCache(partial_dir(path))
        assert lock_holder(path) == str(proc.pid)  # testing did not take the lock from it
    assert (tmp_path / "c.h5.lock").is_file() and lock_holder(path) is None  # a stale lock file of a killed holder
    with pytest.raises(CacheError, match="its extraction was interrupted with 2 of 5 chunks committed"):
        FeatureCache(path)


def test_a_different_plan_is_refused_and_overwrite_starts_over(tmp_path):
    path = tmp_path / "c.h5"
    with pytest.raises(RuntimeError):
        with ChunkStore(path, plan(), log=lambda _: None) as store:
            commit_all(store, only={("train", 0)})
            raise RuntimeError
    with pytest.raises(CacheError, match=r"used other settings: rows per chunk \(--batch-size x --commit-every\) "
                                         r"\(was 2, now 4\), settings \(was \{\"x\": 1\}, now \{\"x\": 2\}\); run it "
                                         r"with the same settings to resume, or pass --overwrite to start over"):
        ChunkStore(path, plan(chunk_rows=4, settings={"x": 2}))
    assert partial_progress(path) == (1, 5)  # refusing did not touch the committed work
    assert not (tmp_path / "c.h5.lock").exists()  # and released the lock
    with ChunkStore(path, plan(chunk_rows=4), overwrite=True) as store:
        assert store.pending("train") == [(0, 4), (4, 5)]
        commit_all(store)
        store.assemble(attrs())
    # an existing cache: refused without overwrite; with it, replaced only when the new one is assembled
    with pytest.raises(CacheError, match="exists already; pass --overwrite"):
        ChunkStore(path, plan())
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with ChunkStore(path, plan(), overwrite=True):
            raise RuntimeError
    assert path.read_bytes() == before


def test_a_damaged_chunk_is_removed_and_named(tmp_path):
    path = tmp_path / "c.h5"
    with pytest.raises(KeyboardInterrupt):
        with ChunkStore(path, plan(), log=lambda _: None) as store:
            commit_all(store)
            raise KeyboardInterrupt
    chunk = partial_dir(path) / "train-0000000002.npz"
    chunk.write_bytes(chunk.read_bytes()[:50])  # e.g. a disk error
    with ChunkStore(path, plan(), log=lambda _: None) as store:
        with pytest.raises(CacheError, match=r"train-0000000002\.npz is damaged .* and was removed; run the same "
                                             "extract command again"):
            store.assemble(attrs())
        assert store.pending("train") == [(2, 4)]
    assert not path.exists()


def test_chunks_that_disagree_with_the_attributes_are_refused(tmp_path):
    path = tmp_path / "c.h5"
    with ChunkStore(path, plan(), log=lambda _: None) as store:
        commit_all(store)
        with pytest.raises(CacheError, match=r"chunk train rows 0\.\.2 has patches \(2, 2, 3\) on a \[1, 2\] grid; "
                                             r"expected \(2, 4, 3\) on \[2, 2\]"):
            store.assemble(cache_attrs(["even", "odd"], D, (2, 2), token_grid=[2, 2]))
    assert not path.exists() and not path.with_name("c.h5.writing").exists()


def test_work_folder_blocked_by_a_file(tmp_path):
    partial_dir(tmp_path / "c.h5").write_text("not a folder")
    with pytest.raises(CacheError, match=r"c\.h5\.partial is in the way"):
        ChunkStore(tmp_path / "c.h5", plan())
    assert not (tmp_path / "c.h5.lock").exists()


def test_lock_is_exclusive_and_dies_with_its_process(tmp_path):
    path = tmp_path / "c.h5"
    held = CacheLock(path)
    with pytest.raises(CacheError, match=rf"another extraction \(pid {os.getpid()}\) is writing .*c\.h5; wait"):
        CacheLock(path)
    with pytest.raises(CacheError, match="another extraction"):
        ChunkStore(path, plan())
    held.release()
    held.release()  # idempotent
    assert not (tmp_path / "c.h5.lock").exists()

    code = ("import sys, time; from cache import CacheLock; CacheLock(sys.argv[1]); print('locked', flush=True); "
            "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(CacheError, match=rf"another extraction \(pid {proc.pid}\)"):
            CacheLock(path)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    CacheLock(path).release()  # the kernel dropped the dead holder's lock; its stale file is reused


def test_an_overwrite_run_is_resumed_by_the_same_overwrite_command_only(tmp_path):
    path = tmp_path / "c.h5"
    finished_cache(path, plan())
    before = path.read_bytes()
    with pytest.raises(KeyboardInterrupt):  # an --overwrite run killed half way
        with ChunkStore(path, plan(), overwrite=True, log=lambda _: None) as store:
            commit_all(store, only={("train", 0), ("train", 2)})
            raise KeyboardInterrupt
    with pytest.raises(CacheError, match="exists already; pass --overwrite"):
        ChunkStore(path, plan())
    logs = []
    with ChunkStore(path, plan(), overwrite=True, log=logs.append) as store:  # the same command resumes
        assert logs[0].endswith("2 of 5 chunks already committed")
        assert store.pending("train") == [(4, 5)]
    assert path.read_bytes() == before  # the old cache stays until the new one is assembled
    # a plain run's leftovers are discarded by --overwrite, and an --overwrite run's are not resumed without it
    path.unlink()
    with pytest.raises(CacheError, match=r"an interrupted 'extract --overwrite' of this cache is in .*; run it again "
                                         "with --overwrite to resume it"):
        ChunkStore(path, plan())
    with pytest.raises(RuntimeError):
        with ChunkStore(path, plan(chunk_rows=4), overwrite=True, log=lambda _: None) as store:
            commit_all(store, only={("train", 0)})
            raise RuntimeError
    logs = []
    with ChunkStore(path, plan(), overwrite=True, log=logs.append) as store:
        assert logs == [f"--overwrite: discarding the interrupted extraction in {partial_dir(path)}"]
        assert len(store.pending("train")) == 3


def test_leftovers_of_a_finished_extraction_are_removed(tmp_path):
    from cache.chunks import remove_finished_leftovers

    path = tmp_path / "c.h5"
    finished_cache(path, plan())
    assert not remove_finished_leftovers(path, plan())  # nothing left over
    partial_dir(path).mkdir()  # as if killed between the rename of the cache and the removal of its work folder
    (partial_dir(path) / "manifest.json").write_text(json.dumps({**plan(), "overwrite": False}))
    assert not remove_finished_leftovers(path, plan(chunk_rows=3))  # another plan: not ours to remove
    assert remove_finished_leftovers(path, plan())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5"]


def test_assembly_checks_the_sample_ids_against_the_plan(tmp_path):
    import hashlib

    digest = hashlib.sha256("\n".join(f"train/{i}" for i in range(5)).encode()).hexdigest()
    good = plan()
    good["splits"]["train"]["sample_ids_sha256"] = digest
    finished_cache(tmp_path / "a.h5", good)
    with ChunkStore(tmp_path / "b.h5", good, log=lambda _: None) as store:
        commit_all(store)
        chunk = partial_dir(tmp_path / "b.h5") / "train-0000000002.npz"
        chunk.write_bytes((partial_dir(tmp_path / "b.h5") / "train-0000000000.npz").read_bytes())  # a swapped chunk
        with pytest.raises(CacheError, match=r"chunks of split 'train' in .* do not hold the planned images in order"):
            store.assemble(attrs())
    assert not (tmp_path / "b.h5").exists()


def test_a_manifest_that_is_not_an_object_starts_over(tmp_path):
    path = tmp_path / "c.h5"
    partial_dir(path).mkdir()
    (partial_dir(path) / "manifest.json").write_text("[1, 2]")
    (partial_dir(path) / "train-0000000000.npz").write_bytes(b"junk")
    with ChunkStore(path, plan(), log=lambda _: None) as store:
        assert len(store.pending("train")) == 3


def test_a_half_deleted_work_folder_is_finished_off(tmp_path):
    from cache.chunks import remove_finished_leftovers

    path = tmp_path / "c.h5"
    finished_cache(path, plan())
    doomed = tmp_path / "c.h5.partial.removing"  # killed while the finished work folder was being deleted
    doomed.mkdir()
    (doomed / "train-0000000000.npz").write_bytes(b"x")
    assert remove_finished_leftovers(path, plan())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5"]


def test_a_follower_commits_into_the_lock_holders_work_folder_only(tmp_path):
    """The other ranks of a distributed job: no lock, nothing created or removed, the lock holder assembles."""
    path = tmp_path / "c.h5"
    with pytest.raises(CacheError, match="not visible here: every node .* shared filesystem"):
        ChunkStore(path, plan(), follower=True)
    assert not partial_dir(path).exists() and not (tmp_path / "c.h5.lock").exists()
    with ChunkStore(path, plan(), log=lambda _: None) as store:
        with pytest.raises(CacheError, match=r"this rank's plan differs from rank 0's .*rows per chunk"):
            ChunkStore(path, plan(chunk_rows=3), follower=True)
        follower = ChunkStore(path, plan(), follower=True)
        commit_all(follower, only={("train", 2), ("test", 0)})
        with pytest.raises(ValueError, match="only the process holding the lock assembles"):
            follower.assemble(attrs())
        follower.close()  # leaves the folder and the lock alone
        assert partial_dir(path).is_dir() and (tmp_path / "c.h5.lock").is_file()
        assert store.pending("train") == [(0, 2), (4, 5)] and store.pending("test") == [(2, 3)]
        commit_all(store)
        store.assemble(attrs())
    with FeatureCache(path) as fc:
        np.testing.assert_array_equal(fc.split("train").read(np.arange(5))[0][:, 0], np.arange(5))


def _commit_features(store: ChunkStore, dim: int, patches: int, dtype: str = "float16") -> None:
    """Commit every pending chunk with random features (dim D, ``patches`` P on a 4 x 4 grid)."""
    rng = np.random.default_rng(0)
    for split in store.splits:
        for start, stop in store.pending(split):
            n = stop - start
            store.commit(split, start, rng.standard_normal((n, dim)).astype(dtype),
                         rng.standard_normal((n, patches, dim)).astype(dtype), np.arange(start, stop) % 2,
                         [f"{split}/{i}" for i in range(start, stop)], (4, 4))


def test_space_needed_is_about_the_chunks_and_the_cache_they_assemble_into(tmp_path):
    """Estimated from the shapes before any chunk exists: at least the size of the chunk files and of the assembled
    cache, and within 10 % of each; once every chunk is committed only the assembly is left."""
    path = tmp_path / "c.h5"
    dim, patches = 48, 16
    with ChunkStore(path, plan(num_train=1500, num_test=700, chunk_rows=256), log=lambda _: None) as store:
        chunks, assembly = store.space_needed(dim, patches, "float16", len("train/1499"))
        _commit_features(store, dim, patches)
        written = sum(p.stat().st_size for p in partial_dir(path).glob("*.npz"))
        assert store.space_needed(dim, patches, "float16", len("train/1499")) == (0, assembly)
        store.assemble(cache_attrs(["even", "odd"], dim, (4, 4), token_grid=[4, 4], dtype="float16"))
    assert written <= chunks <= 1.1 * written
    assert path.stat().st_size <= assembly <= 1.1 * path.stat().st_size


def test_a_disk_that_fills_during_assembly_removes_the_half_written_cache_and_keeps_the_chunks(tmp_path,
                                                                                              monkeypatch):
    """ENOSPC while HDF5 writes the cache (here after 64 kB): one error naming the folder and the space needed, no
    ``.writing`` file left, every chunk kept; with room again the same store assembles the cache."""
    import errno
    import io

    class SmallDisk(io.FileIO):
        room = 64_000

        def write(self, data):
            size = memoryview(data).nbytes
            if size > SmallDisk.room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            SmallDisk.room -= size
            return super().write(data)

    path = tmp_path / "c.h5"
    the_plan = plan(num_train=300, num_test=200, chunk_rows=128)
    the_attrs = cache_attrs(["even", "odd"], 48, (4, 4), token_grid=[4, 4], dtype="float16")
    monkeypatch.setattr("cache.writer.open", lambda file, mode, buffering: SmallDisk(file, "w+"), raising=False)
    logs = []
    with ChunkStore(path, the_plan, log=logs.append) as store:
        _commit_features(store, 48, 16)
        with pytest.raises(CacheError) as caught:
            store.assemble(the_attrs)
    message = str(caught.value)
    assert message.startswith(f"the disk holding {tmp_path} is full (No space left on device): assembling the cache "
                              f"{path} failed; finishing the extraction needs about ")
    assert re.search(r"needs about \d+\.\d kB free to assemble the cache, \S+ \S+ is free; the 5 committed chunks "
                     r"are kept in ", message), message
    assert message.endswith(f"{partial_dir(path)}: free space and run the same extract command again to resume")
    assert not path.exists() and not path.with_name("c.h5.writing").exists()
    assert len(list(partial_dir(path).glob("*.npz"))) == 5 and not list(partial_dir(path).glob(".*"))

    monkeypatch.undo()  # room again
    with ChunkStore(path, the_plan, log=logs.append) as store:
        assert store.assemble(the_attrs) == path
    with FeatureCache(path) as fc:
        assert fc.split("train").num_rows == 300 and fc.split("test").sample_ids[-1] == "test/199"


def test_assembly_is_refused_before_writing_when_the_free_space_is_less_than_the_chunks(tmp_path, monkeypatch):
    """The cache holds the rows of the chunks: with less free space than they take, nothing is written."""
    import shutil

    disk_usage = shutil.disk_usage
    monkeypatch.setattr("cache.chunks.shutil.disk_usage", lambda path: disk_usage(path)._replace(free=1000))
    path = tmp_path / "c.h5"
    with ChunkStore(path, plan(), log=lambda _: None) as store:
        commit_all(store)
        with pytest.raises(CacheError, match=rf"^the disk holding {re.escape(str(tmp_path))} has too little free "
                                             r"space left to assemble the cache; finishing the extraction needs about "
                                             r"\d+\.\d kB free to assemble the cache, 1\.0 kB is free; the 5 committed "
                                             r"chunks are kept in .*c\.h5\.partial: free space and run the same "
                                             r"extract command again to resume$"):
            store.assemble(attrs())
        assert not path.with_name("c.h5.writing").exists() and store.pending("train") == []
