"""Several ``fit`` processes writing into one runs folder at the same time."""

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
    # two different normal classes, and the same class twice (the later run replaces the earlier whole)
    procs = [_fit(cache, runs, normal) for normal in ("a", "b", "c", "c")]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
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
