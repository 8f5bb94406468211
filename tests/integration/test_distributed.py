"""``extract`` and ``run`` as distributed jobs under real torchrun (2 ranks, gloo, CPU), against one process.

The backbone is timm's randomly initialised ``test_vit`` at 32 px, one batch of 32 digits per committed chunk (58
chunks), as in test_resume.py. torchrun gives each rank one thread, the single process here has the machine's,
so features agree up to float rounding; labels, sample ids and every other attribute exactly.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_cli import read_csv
from test_resume import assert_same_cache, digits_args, invoke, uninterrupted  # noqa: F401 (a fixture)

from cache import CacheLock, partial_dir

from conftest import ROOT, gaussian_splits, make_image_tree, write_cache

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
NUM_CHUNKS = 58
#: test_vit's class token and patch tokens: values of order 1; other thread counts change them by ~1e-6
FEATURE_TOL = {"rtol": 1e-4, "atol": 1e-5}
RUN_ARGS = ["--methods", "knn,gaussian,sanf", "--normal", "all", "--epochs", "1", "--blocks", "1", "--hidden", "16"]


def torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, "pipeline.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def start_torchrun(*args: str) -> subprocess.Popen:
    return subprocess.Popen([*TORCHRUN, "pipeline.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("Error:")]


def rank_pid(proc: subprocess.Popen, rank: int, timeout_s: float = 120) -> int:
    """The pid of the worker of ``rank`` among the descendants of the torchrun process ``proc``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        parents = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
        family, grew = {proc.pid}, True
        while grew:
            more = {pid for pid, parent in parents.items() if parent in family} - family
            family |= more
            grew = bool(more)
        for pid in family - {proc.pid}:
            try:
                environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ and b"LOCAL_RANK=" + str(rank).encode() in environ:
                return pid
        if proc.poll() is not None:
            raise AssertionError(f"torchrun exited before rank {rank} was found: {proc.stdout.read()}")
        time.sleep(0.05)
    raise AssertionError(f"no worker of rank {rank} appeared")


def committed(cache_dir: Path) -> list[Path]:
    return sorted(p for work in cache_dir.glob("*.partial") for p in work.glob("*.npz"))


def wait_for(condition, proc: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the job ended first: {proc.stdout.read()}")
        if time.monotonic() > deadline:
            raise AssertionError("the job did not get there in time")
        time.sleep(0.005)


def chunk_rows(chunks: list[Path]) -> int:
    """Images in the committed chunk files (32 a chunk, the last of each split holds the rest)."""
    sizes = {"train": 898, "test": 899}
    total = 0
    for p in chunks:
        split, start = p.stem.split("-")
        total += min(int(start) + 32, sizes[split]) - int(start)
    return total


def test_two_ranks_write_the_cache_of_one_process(uninterrupted, tmp_path):
    cache_dir = tmp_path / "cache"
    done = torchrun(*digits_args(cache_dir))
    assert done.returncode == 0, done.stdout + done.stderr
    assert [p.name for p in cache_dir.iterdir()] == [uninterrupted.name]  # no work folder, no lock left
    assert_same_cache(uninterrupted, cache_dir / uninterrupted.name, FEATURE_TOL)
    # one bar for the job (chunks of both ranks), on rank 0; rank 0 alone prints the status lines
    assert f"/{NUM_CHUNKS} [" in done.stderr and "extract train" not in done.stderr
    assert done.stdout.count("dataset digits:") == 1 and "[rank 1]" not in done.stdout
    assert "encoded 1797 images" in done.stdout and "on rank 0 of 2 ranks" in done.stdout


def test_sigkill_of_a_rank_then_resume_at_two_ranks_and_at_one(uninterrupted, tmp_path):
    cache_dir = tmp_path / "two"
    proc = start_torchrun(*digits_args(cache_dir))
    try:
        victim = rank_pid(proc, 1)
        wait_for(lambda: len(committed(cache_dir)) >= 3, proc)
        os.kill(victim, signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, out
    assert not list(cache_dir.glob("*.h5")), "a killed job left a file that looks complete"
    kept = committed(cache_dir)
    assert 3 <= len(kept) < NUM_CHUNKS, out
    one_dir = tmp_path / "one"
    shutil.copytree(cache_dir, one_dir)  # the same leftovers, for the resume at world size 1
    work = partial_dir(cache_dir / uninterrupted.name)
    missing = 1797 - chunk_rows(kept)

    again = torchrun(*digits_args(cache_dir))
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resuming the interrupted extraction in {work}: {len(kept)} of {NUM_CHUNKS} chunks already committed" \
        in again.stdout
    assert f"encoded {missing} images" in again.stdout  # only the missing chunks
    assert [p.name for p in cache_dir.iterdir()] == [uninterrupted.name]
    assert_same_cache(uninterrupted, cache_dir / uninterrupted.name, FEATURE_TOL)

    alone = invoke(*digits_args(one_dir))
    assert alone.exit_code == 0, alone.output
    assert f"{len(kept)} of {NUM_CHUNKS} chunks already committed" in alone.output
    assert f"encoded {missing} images" in alone.output
    assert [p.name for p in one_dir.iterdir()] == [uninterrupted.name]
    assert_same_cache(uninterrupted, one_dir / uninterrupted.name, FEATURE_TOL)


def test_a_held_lock_refuses_a_torchrun_job_with_one_line(uninterrupted, tmp_path):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    lock = CacheLock(cache_dir / uninterrupted.name)  # as held by a running single-process extraction
    try:
        done = torchrun(*digits_args(cache_dir))
    finally:
        lock.release()
    assert done.returncode != 0
    lines = error_lines(done.stdout + "\n" + done.stderr)
    assert len(lines) == 1, done.stdout + done.stderr
    assert f"another extraction (pid {os.getpid()}) is writing" in lines[0]
    assert "Traceback" not in done.stdout
    assert list(cache_dir.iterdir()) == []


def test_a_running_torchrun_job_refuses_a_plain_extraction(uninterrupted, tmp_path):
    cache_dir = tmp_path / "cache"
    proc = start_torchrun(*digits_args(cache_dir))
    workers = []
    try:
        workers = [rank_pid(proc, 0), rank_pid(proc, 1)]
        wait_for(lambda: len(committed(cache_dir)) >= 1, proc)
        for pid in workers:  # hold the job still while the second extraction tries
            os.kill(pid, signal.SIGSTOP)
        refused = invoke(*digits_args(cache_dir))
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        workers = []
        out, _ = proc.communicate(timeout=120)
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
    assert refused.exit_code == 2
    assert re.search(r"another extraction \(pid \d+\) is writing", refused.output), refused.output
    assert proc.returncode == 0, out  # the job itself went on and finished
    assert_same_cache(uninterrupted, cache_dir / uninterrupted.name, FEATURE_TOL)


def test_an_unreadable_image_on_rank_1_stops_the_job_with_one_line(tmp_path):
    """Each rank decodes the images of its own chunks before encoding any: rank 1 finds the file, nothing is
    committed."""
    root = make_image_tree(tmp_path / "data", size=16)  # train: blue 000-003, red 000-003 (rows 4-7)
    victim = root / "train" / "red" / "001.png"  # train row 5: chunk 5 of the list, rank 1's
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    cache_dir = tmp_path / "cache"
    done = torchrun("extract", "--dataset", "folder", "--data-root", str(root), "--backbone", "test_vit",
                    "--random-init", "--img-size", "32", "--batch-size", "1", "--commit-every", "1",
                    "--num-workers", "0", "--device", "cpu", "--cache-dir", str(cache_dir))
    assert done.returncode != 0
    lines = error_lines(done.stdout + "\n" + done.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"Error: [rank 1] cannot read image {victim}"), \
        done.stdout + done.stderr
    assert lines[0].endswith("; remove or replace it, then run the same command again")
    assert not list(cache_dir.glob("*.h5")) and committed(cache_dir) == []
    assert not list(cache_dir.glob("*.lock"))


def _auroc(runs: Path) -> dict[tuple, float]:
    _, rows = read_csv(runs / "auroc.csv")
    return {(r["method"], r["normal_class"], r["score"], r["seed"]): float(r["auroc"]) for r in rows}


def test_sweep_on_two_ranks_gives_the_summary_of_one_process(uninterrupted, tmp_path):
    cache_dir = uninterrupted.parent  # both runs on the same features: the fits are compared, not the extraction
    one, two = tmp_path / "one", tmp_path / "two"
    alone = invoke("sweep", *digits_args(cache_dir)[1:], *RUN_ARGS, "--runs-dir", str(one))
    assert alone.exit_code == 0, alone.output
    done = torchrun("sweep", *digits_args(cache_dir)[1:], *RUN_ARGS, "--runs-dir", str(two))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[rank 1] fitted" in done.stdout and f"/{3 * 10} [" in done.stderr  # one bar: every fit of the job
    want, have = _auroc(one), _auroc(two)
    assert want.keys() == have.keys() and len(want) == 10 * (2 + 1 + 2)  # knn l2/cosine, gaussian, sanf nll/z2
    for key, value in want.items():
        if key[0] in ("knn", "gaussian"):
            assert have[key] == value, key
        else:
            assert abs(have[key] - value) <= 1e-3, (key, have[key], value)
    (summary_one,) = one.glob("*__summary.csv")
    (summary_two,) = two.glob("*__summary.csv")
    rows_one = read_csv(summary_one)[1]
    rows_two = read_csv(summary_two)[1]
    assert [r for r in rows_two if r["method"] != "sanf"] == [r for r in rows_one if r["method"] != "sanf"]
    assert len(rows_two) == len(rows_one)
    assert (two / f"{uninterrupted.stem}__report.md").is_file()
    assert any((two / f"{uninterrupted.stem}__plots").iterdir())


def test_reproduce_on_two_ranks_shares_the_fits_and_gives_the_ledger_of_one_process(uninterrupted, tmp_path):
    args = ["reproduce", "--cache", str(uninterrupted), "--tables", "2,5", "--normal", "0", "--seeds", "0,1",
            "--steps", "2", "--device", "cpu"]
    alone = invoke(*args, "--out", str(tmp_path / "one"))
    assert alone.exit_code == 0, alone.output
    done = torchrun(*args, "--out", str(tmp_path / "two"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("6 fits fitted, 0 reused") == 1  # rank 0 says it, for the whole job
    assert "/6 [" in done.stderr and "/3 [" not in done.stderr  # one bar over the job's 6 fits, not a rank's 3

    def ledger(out: Path) -> dict[tuple, float]:
        _, rows = read_csv(out / "fits.csv")
        return {(r["method"], r["seed"], r["score"]): float(r["auroc"]) for r in rows}

    want, have = ledger(tmp_path / "one"), ledger(tmp_path / "two")
    assert want.keys() == have.keys() and len(want) == 2 * 2 * 2 + 2  # 2 flows x 2 seeds x nll/z2, 2 baselines
    for key, value in want.items():
        assert abs(have[key] - value) <= (0 if key[0] in ("knn", "gaussian") else 1e-3), (key, have[key], value)
    assert {p.name for p in (tmp_path / "two").iterdir()} >= {"tables.md", "table2.csv", "table5.csv"}
    again = torchrun(*args, "--out", str(tmp_path / "two"))
    assert again.returncode == 0 and "0 fits fitted, 6 reused" in again.stdout, again.stdout + again.stderr


def test_reproduce_with_absent_data_says_not_run_once_and_every_rank_exits_0(tmp_path):
    done = torchrun("reproduce", "--dataset", "folder", "--data-root", str(tmp_path / "absent"), "--cache-dir",
                    str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--tables", "2,6", "--device", "cpu")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("not run: data absent") == 1
    assert "not run: data absent" in (tmp_path / "out" / "tables.md").read_text()


def test_errors_of_reproduce_after_the_job_started_are_printed_once_without_a_traceback(tmp_path):
    """A bad --normal (found on every rank from the cache) and diverging fits (found by the rank that fitted them,
    reported by rank 0 after the tables): one Error line each, every rank exits 2, no rank's traceback."""
    splits = gaussian_splits(n_train=24, n_test=12, num_classes=2)
    cls, patches, labels = splits["train"]
    cls[labels == 1] *= 1e18  # class b's flows diverge
    patches[labels == 1] *= 1e18
    cache = write_cache(tmp_path / "div.h5", splits, ["a", "b"])
    args = ["reproduce", "--cache", str(cache), "--out", str(tmp_path / "out"), "--tables", "5", "--seeds", "0",
            "--steps", "2", "--device", "cpu"]
    for extra, message in ((("--normal", "zz"), "--normal must be 'all', an index 0..1 or one of a, b; got 'zz'"),
                           ((), "2 fits failed and are left out of the tables (first: sanf K=4 seed 0 normal b:")):
        done = torchrun(*args, *extra)
        output = done.stdout + "\n" + done.stderr
        lines = error_lines(output)
        assert len(lines) == 1 and message in lines[0], output
        assert not re.search(r"\[rank\d\]: Traceback", output), output  # torchrun's own report aside
        assert "exitcode  : 2" in output and "exitcode  : 1" not in output, output


@pytest.mark.parametrize("args, message", [
    (("extract", "--dataset", "nosuch"), "Invalid value for '--dataset': 'nosuch' is not one of"),  # click's parser
    (("sweep", "--device", "cpu"), "sweep needs either --dataset (what to extract) or --cache (an existing cache)"),
    (("extract", "--dataset", "mvtec", "--category", "all", "--device", "cpu"), "--dataset mvtec needs --data-root"),
    (("reproduce", "--dataset", "mvtec", "--category", "all", "--out", "out", "--device", "cpu"),
     "--category: reproduce takes one MVTec AD category (one cache); got 'all'"),
    (("fit", "--method", "knn", "--device", "cpu"), "fit does not run as a torchrun job (WORLD_SIZE 2): start it as "
                                                    "one process; extract, sweep, reproduce run as jobs"),
    (("sweep", "--dataset", "digits", "--epochs", "2", "--steps", "5"),  # found by the command from its arguments
     "Error: --epochs and --steps exclude each other (a fit has one length); got --epochs 2 and --steps 5"),
    (("extract", "--dataset", "digits", "--device", "cuda"),  # before the ranks connect (no GPU here)
     "device 'cuda' was asked for but torch sees no CUDA device"),
])
def test_an_error_of_the_command_line_is_printed_once(tmp_path, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = torchrun(*args, "--cache-dir", str(tmp_path / "cache"))
    assert done.returncode != 0
    lines = error_lines(done.stdout + "\n" + done.stderr)
    assert len(lines) == 1 and message in lines[0], done.stdout + done.stderr
    assert "[rank" not in lines[0]  # rank 0's line
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
