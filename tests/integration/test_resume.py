"""Resumable extraction on real data (scikit-learn's digits): SIGKILL at several points, resume, compare.

The backbone is timm's randomly initialised ``test_vit`` at 32 px (a 2 x 2 token grid, D = 64), with one
batch of 32 images per committed chunk, so the 898 train and 899 test digits make 58 chunks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from cache import CacheLock, FeatureCache, partial_dir
from pipeline import cli

from conftest import ROOT

TIMING_ATTRS = {"created", "extract_seconds", "images_per_second"}


def digits_args(cache_dir: Path, *extra: str) -> list[str]:
    return ["extract", "--dataset", "digits", "--backbone", "test_vit", "--random-init", "--img-size", "32",
            "--patch-grid", "0", "--batch-size", "32", "--commit-every", "1", "--num-workers", "0",
            "--device", "cpu", "--dtype", "float32", "--cache-dir", str(cache_dir), *extra]


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _chunks(cache_dir: Path) -> int:
    return sum(1 for work in cache_dir.glob("*.partial") for p in work.glob("*.npz"))


def _start(cache_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "pipeline.py", *digits_args(cache_dir)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_when(proc: subprocess.Popen, ready, timeout_s: float = 240.0) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; False when it exited first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            return True
        time.sleep(0.005)
    proc.kill()
    proc.wait(30)
    raise AssertionError("the extraction did not reach the kill point in time")


def _arrays(path: Path) -> dict:
    out = {}
    with h5py.File(path, "r") as f:
        for split in ("train", "test"):
            for name in ("cls", "patches", "label", "sample_id"):
                out[f"{split}/{name}"] = f[split][name][:]
        out["attrs"] = {k: v for k, v in f.attrs.items() if k not in TIMING_ATTRS}
    return out


def assert_same_cache(expected: Path, got: Path, features_tol: dict | None = None) -> None:
    """Labels, sample ids and attributes (but timing) equal; the features too, or within ``features_tol``
    (``rtol`` / ``atol`` of ``np.testing.assert_allclose``)."""
    want, have = _arrays(expected), _arrays(got)
    assert want.keys() == have.keys()
    for key in want:
        if key == "attrs":
            assert want[key].keys() == have[key].keys()
            for name, value in want[key].items():
                np.testing.assert_array_equal(have[key][name], value, err_msg=name)
        elif features_tol is not None and key.endswith(("/cls", "/patches")):
            assert have[key].shape == want[key].shape
            np.testing.assert_allclose(have[key], want[key], err_msg=key, **features_tol)
        else:
            np.testing.assert_array_equal(have[key], want[key], err_msg=key)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    cache_dir = tmp_path_factory.mktemp("uninterrupted")
    result = invoke(*digits_args(cache_dir))
    assert result.exit_code == 0, result.output
    (path,) = cache_dir.glob("*.h5")
    return path


def test_sigkill_at_several_points_then_resume_gives_the_same_cache(uninterrupted, tmp_path):
    cache_dir = tmp_path / "cache"
    kills = []
    # 1: while importing / building (nothing committed yet); 2, 3: mid-train and mid-test split
    for ready in (lambda: partial_dir_exists(cache_dir), lambda: _chunks(cache_dir) >= 5,
                  lambda: _chunks(cache_dir) >= 40):
        before = _chunks(cache_dir)
        proc = _start(cache_dir)
        killed = _kill_when(proc, ready)
        assert killed, proc.stdout.read()
        assert proc.returncode == -signal.SIGKILL
        kills.append((before, _chunks(cache_dir)))
        assert not list(cache_dir.glob("*.h5")), "a killed run left a file that looks complete"
        with pytest.raises(Exception, match="run the same extract command again to resume|does not exist"):
            FeatureCache(cache_dir / uninterrupted.name)
    assert kills[1][1] >= 5 and kills[2][1] >= 40  # the kills really hit different points of the work
    assert kills[2][0] >= 5  # and the chunks of the earlier runs were kept
    # a temporary chunk file of the killed writer may remain; it is ignored and overwritten
    result = invoke(*digits_args(cache_dir))
    assert result.exit_code == 0, result.output
    assert "already committed" in result.output
    assert [p.name for p in cache_dir.iterdir()] == [uninterrupted.name]  # no work folder, no lock left
    assert_same_cache(uninterrupted, cache_dir / uninterrupted.name)
    with FeatureCache(cache_dir / uninterrupted.name) as fc:
        assert fc.fingerprint() != "" and fc.split("train").num_rows == 898


def partial_dir_exists(cache_dir: Path) -> bool:
    return any(cache_dir.glob("*.partial"))


def test_kill_during_assembly_resumes_from_the_chunks(uninterrupted, tmp_path):
    """Every chunk committed, killed while the HDF5 file is written: the rerun only assembles."""
    cache_dir = tmp_path / "cache"
    work = partial_dir(cache_dir / uninterrupted.name)
    proc = _start(cache_dir)
    killed = _kill_when(proc, lambda: any(cache_dir.glob("*.h5.writing")))
    if not killed:  # assembling these few MB can be quicker than the polling; then redo the last step by hand
        pytest.skip("the assembly finished before it could be killed")
    assert not list(cache_dir.glob("*.h5")) and work.is_dir()
    result = invoke(*digits_args(cache_dir))
    assert result.exit_code == 0, result.output
    assert "58 of 58 chunks already committed" in result.output
    assert "encoded 0 images" in result.output
    with FeatureCache(cache_dir / uninterrupted.name) as fc:  # timing summed over the chunks of both runs
        assert fc.attrs["extract_seconds"] > 0 and fc.attrs["images_per_second"] > 0
    np.testing.assert_array_equal(_arrays(cache_dir / uninterrupted.name)["train/patches"],
                                  _arrays(uninterrupted)["train/patches"])


def test_a_second_extraction_of_the_same_cache_is_refused(uninterrupted, tmp_path):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    lock = CacheLock(cache_dir / uninterrupted.name)  # as held by a running extraction
    try:
        result = invoke(*digits_args(cache_dir))
    finally:
        lock.release()
    assert result.exit_code == 2
    assert f"another extraction (pid {os.getpid()}) is writing" in result.output
    assert list(cache_dir.iterdir()) == []


def test_unfinished_cache_is_refused_by_fit_with_a_resume_hint(uninterrupted, tmp_path):
    cache_dir = tmp_path / "cache"
    proc = _start(cache_dir)
    assert _kill_when(proc, lambda: _chunks(cache_dir) >= 3)
    target = cache_dir / uninterrupted.name
    result = invoke("fit", "--cache", str(target), "--runs-dir", str(tmp_path / "runs"), "--device", "cpu")
    assert result.exit_code == 2
    assert "its extraction was interrupted with" in result.output
    assert "of 58 chunks committed; run the same extract command again to resume" in result.output
    result = invoke("fit", "--cache-dir", str(cache_dir), "--runs-dir", str(tmp_path / "runs"), "--device", "cpu")
    assert result.exit_code == 2
    assert "an interrupted extraction" in result.output and "resume" in result.output
    result = invoke("fit", "--cache", str(partial_dir(target)), "--runs-dir", str(tmp_path / "runs"))
    assert result.exit_code == 2
    assert "is a directory" in result.output  # click's check; the library says more (tests/unit/test_chunks.py)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_other_settings_do_not_resume_and_overwrite_starts_over(uninterrupted, tmp_path):
    cache_dir = tmp_path / "cache"
    proc = _start(cache_dir)
    assert _kill_when(proc, lambda: _chunks(cache_dir) >= 3)
    # a different batch size changes the batches, so the chunks of the first run cannot be reused
    args = digits_args(cache_dir)
    args[args.index("--batch-size") + 1] = "16"
    result = invoke(*args)
    assert result.exit_code == 2
    assert "used other settings: --batch-size (was 32, now 16), rows per chunk" in result.output
    assert "--overwrite" in result.output
    result = invoke(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert "already committed" not in result.output
    assert [p.suffix for p in cache_dir.iterdir()] == [".h5"]


def test_work_folder_left_beside_a_finished_cache_is_removed_by_a_rerun(uninterrupted, tmp_path):
    """A kill between renaming the finished cache into place and deleting the work folder."""
    import shutil

    cache_dir = tmp_path / "cache"
    proc = _start(cache_dir)
    assert _kill_when(proc, lambda: _chunks(cache_dir) >= 3)  # a real work folder of this command's plan
    shutil.copyfile(uninterrupted, cache_dir / uninterrupted.name)  # and the cache that run would have finished
    result = invoke(*digits_args(cache_dir))
    assert result.exit_code == 0, result.output
    assert "is complete: an earlier run of this command finished it" in result.output
    assert [p.name for p in cache_dir.iterdir()] == [uninterrupted.name]
