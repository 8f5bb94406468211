"""Several ``fit`` processes writing into one runs folder at the same time: different runs do not clash, and one
run is written by one process at a time."""

from __future__ import annotations

import subprocess
import sys

from flow.store.run_folder import list_runs, load_run

from conftest import ROOT, gaussian_splits, write_cache


def _fit(cache, runs, normal: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "pipeline.py", "fit", "--cache", str(cache), "--normal", normal,
                             "--runs-dir", str(runs), "--epochs", "3", "--hidden", "8", "--device", "cpu"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_concurrent_fits_into_one_runs_dir_do_not_clash(tmp_path):
    cache = write_cache(tmp_path / "c.h5", gaussian_splits(n_train=64, n_test=8), ["a", "b", "c"])
    runs = tmp_path / "runs"
    # two different normal classes, and the same class twice: its run folder is locked while one fit writes it, so
    # the other is refused naming the holder (or, started after the first finished, replaces that run whole)
    procs = [_fit(cache, runs, normal) for normal in ("a", "b", "c", "c")]
    outs = [proc.communicate(timeout=300)[0] for proc in procs]
    for proc, out in zip(procs[:2], outs[:2], strict=True):
        assert proc.returncode == 0, out
    same = [(proc.returncode, out) for proc, out in zip(procs[2:], outs[2:], strict=True)]
    assert any(code == 0 for code, _ in same), same
    for code, out in same:
        assert code == 0 or (code == 2 and "__sanf__normal2-c__seed0 is being fitted by pid " in out), out
    found = list_runs(runs)
    assert [p.name.split("__")[-2] for p in found] == ["normal0-a", "normal1-b", "normal2-c"]
    for path in found:
        model, record = load_run(path)
        assert record["epochs"] == 3 and len(record["epoch_losses"]) == 3
    assert sorted(p.name for p in runs.iterdir()) == sorted(p.name for p in found)  # no temporary folder left
    done = subprocess.run([sys.executable, "pipeline.py", "score", "--runs-dir", str(runs), "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len((runs / "auroc.csv").read_text().splitlines()) == 1 + 3 * 2
