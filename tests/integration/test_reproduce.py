"""``pipeline.py reproduce``: the paper's tables from one command, checked by their rows, columns and ranges, killed
with SIGKILL and resumed without fitting again what had finished."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from extract.distributed import DistContext
from flow.experiments.config import FitConfig
from flow.experiments.reproduce import (
    LEDGER,
    LEDGER_COLUMNS,
    SCALES,
    TABLE7_BLOCKS,
    plan_units,
    read_ledger,
    settings_differences,
    settings_key,
    unit_settings,
    write_tables,
)
from flow.experiments.reproduce import reproduce as reproduce_tables
from pipeline import cli

from conftest import ROOT, gaussian_splits, write_cache


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def in_unit_range(text: str) -> bool:
    return 0.0 <= float(text) <= 1.0


@pytest.fixture
def two_class_cache(tmp_path) -> Path:
    return write_cache(tmp_path / "g.h5", gaussian_splits(n_train=24, n_test=12, num_classes=2), ["a", "b"])


@pytest.fixture(scope="module")
def quick_digits(tmp_path_factory):
    """``reproduce --scale quick`` end to end on the embedded digits (extraction included), with timm's randomly
    initialised ``test_vit`` at 32 px as the backbone and normal class 0, two seeds: every table."""
    root = tmp_path_factory.mktemp("quick")
    result = invoke("reproduce", "--scale", "quick", "--out", str(root / "out"), "--normal", "0", "--seeds", "0,1",
                    "--backbone", "test_vit", "--random-init", "--img-size", "32", "--patch-grid", "0",
                    "--num-workers", "0", "--device", "cpu", "--cache-dir", str(root / "caches"))
    assert result.exit_code == 0, result.output
    return root / "out", result.output


def test_quick_scale_writes_every_table_with_its_rows_columns_and_ranges(quick_digits):
    out, output = quick_digits
    assert "9 fits fitted, 0 reused" in output  # 2 flows x 2 seeds, 2 baselines, K = 2, 6, 8 once
    table2 = read(out / "table2.csv")
    assert {(r["row"], r["method"], r["score"]) for r in table2} == {
        (row, m, s) for row in ("0", "mean") for m, s in (("sanf", "nll"), ("sanf", "z2"), ("sanf-nocaff", "nll"),
                                                          ("sanf-nocaff", "z2"), ("knn", "cosine"),
                                                          ("gaussian", "mahalanobis"))}
    for r in table2:
        assert in_unit_range(r["auroc_mean"])
        assert r["n_seeds"] == ("2" if r["method"].startswith("sanf") else "1")
        assert (r["auroc_std"] != "") == r["method"].startswith("sanf")
        if r["auroc_std"]:
            assert 0.0 <= float(r["auroc_std"]) <= 0.75
        assert r["paper"] == ""  # the paper has no digits numbers
    table5 = read(out / "table5.csv")
    assert [(r["method"], r["score"], r["n_fits"]) for r in table5] == [
        ("sanf", "nll", "2"), ("sanf", "z2", "2"), ("sanf-nocaff", "nll", "2"), ("sanf-nocaff", "z2", "2")]
    assert all(in_unit_range(r["auroc_mean"]) for r in table5)
    # Table 2's flows are Table 5's: the same numbers
    means2 = {(r["method"], r["score"]): r["auroc_mean"] for r in table2 if r["row"] == "mean"}
    assert all(means2[r["method"], r["score"]] == r["auroc_mean"] for r in table5)
    table6 = read(out / "table6.csv")
    assert [r["features"] for r in table6][::2] == ["ViT-B/16-384", "ViT-L/16-384", "this run: test_vit"]
    assert all(int(r["num_parameters"]) > 0 and float(r["gflops_as_printed"]) >= float(r["gflops_computed"]) > 0
               for r in table6)
    vit_l = next(r for r in table6 if r["features"] == "ViT-L/16-384" and r["method"] == "sanf")
    assert abs(float(vit_l["gflops_as_printed"]) - 0.69) / 0.69 < 0.1  # the paper's FLOPs (docs/paper_tables.md)
    table7 = read(out / "table7.csv")
    assert [(int(r["blocks"]), r["score"]) for r in table7] == [(k, s) for k in TABLE7_BLOCKS for s in ("nll", "z2")]
    params = [int(r["num_parameters"]) for r in table7][::2]
    assert params == sorted(params) and len(set(params)) == 4
    assert all(in_unit_range(r["auroc_mean"]) and r["n_seeds"] == "1" for r in table7)
    md = (out / "tables.md").read_text()
    for heading in ("## Table 2", "## Table 5", "## Table 6", "## Table 7", "What differs from the paper",
                    "nothing is selected on the test split", "normal class 0 only", "Wall time"):
        assert heading in md


def test_a_second_call_reuses_every_fit_and_fits_nothing(quick_digits, tmp_path):
    out, _ = quick_digits
    runs = sorted((out / "runs").iterdir())
    before = {p: (p / "run.json").stat().st_mtime_ns for p in runs}
    ledger = (out / LEDGER).read_text()
    caches = out.parent / "caches"
    result = invoke("reproduce", "--scale", "quick", "--out", str(out), "--normal", "0", "--seeds", "0,1",
                    "--cache", str(next(caches.glob("*.h5"))))
    assert result.exit_code == 0, result.output
    assert "9 reused" in result.output and "0 fits fitted" in result.output
    assert (out / LEDGER).read_text() == ledger
    assert {p: (p / "run.json").stat().st_mtime_ns for p in runs} == before


def test_results_of_other_settings_in_the_output_folder_are_refused(quick_digits):
    out, _ = quick_digits
    caches = out.parent / "caches"
    result = invoke("reproduce", "--scale", "quick", "--out", str(out), "--normal", "0", "--seeds", "0",
                    "--tables", "2", "--steps", "3", "--cache", str(next(caches.glob("*.h5"))))
    assert result.exit_code == 2
    assert "holds results of other settings" in result.output and "--out" in result.output
    assert "--steps 10 there, 3 now" in result.output  # the setting that differs, named
    assert "steps\": 3" not in (out / "reproduce.json").read_text()  # the refused call recorded nothing


def test_an_output_folder_written_before_settings_were_recorded_is_still_refused_for_other_settings(
        two_class_cache, tmp_path):
    out = tmp_path / "out"
    args = ["reproduce", "--cache", str(two_class_cache), "--out", str(out), "--tables", "2", "--normal", "a",
            "--seeds", "0", "--device", "cpu"]
    assert invoke(*args, "--steps", "1").exit_code == 0
    manifest = json.loads((out / "reproduce.json").read_text())
    assert len(manifest.pop("settings")) == 4  # sanf, sanf-nocaff, knn, gaussian
    (out / "reproduce.json").write_text(json.dumps(manifest))
    result = invoke(*args, "--steps", "2")
    assert result.exit_code == 2
    assert "holds results of other settings (sanf K=4 seed 0" in result.output
    assert "fitted on another extraction or with another training" in result.output


def test_the_settings_that_differ_are_named_by_their_option_or_cache_attribute():
    before = unit_settings(FitConfig(blocks=4), {"patch_grid": [4, 4], "backbone": "b"})
    now = unit_settings(FitConfig(blocks=6, epochs=3), {"patch_grid": [8, 8], "backbone": "b"})
    assert settings_differences(before, now) == ["--blocks 4 there, 6 now", "--epochs not given there, 3 now",
                                                 "the cache's patch_grid [4, 4] there, [8, 8] now"]
    assert settings_differences(now, now) == []


def test_the_settings_key_of_a_configuration_does_not_change_so_committed_ledgers_stay_reusable():
    settings = unit_settings(FitConfig(steps=10), {"backbone": "tf_efficientnet_lite0", "patch_grid": [4, 4],
                                                   "created": "2026-12-06"})
    assert "created" not in settings["features"] and "seed" not in settings["fit"]
    assert settings_key(settings) == "d3237a343d6e"


def test_no_keep_runs_removes_each_run_folder_and_a_second_call_still_reuses_every_fit(two_class_cache, tmp_path):
    out = tmp_path / "out"
    args = ["reproduce", "--scale", "quick", "--cache", str(two_class_cache), "--out", str(out), "--seeds", "0",
            "--tables", "2", "--steps", "2", "--device", "cpu", "--no-keep-runs"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "8 fits fitted, 0 reused" in result.output
    assert list((out / "runs").iterdir()) == []  # no run folder, nothing hidden left behind
    ledger = (out / LEDGER).read_text()
    assert len({r["run"] for r in _ledger_rows(out)}) == 8
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert "8 reused from" in again.output and "0 fits fitted" in again.output
    assert (out / LEDGER).read_text() == ledger


def test_killed_mid_way_the_same_command_resumes_without_refitting(two_class_cache, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "pipeline.py", "reproduce", "--scale", "quick", "--cache", str(two_class_cache),
            "--out", str(out), "--seeds", "0", "--tables", "2", "--steps", "2", "--device", "cpu"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if len({r["run"] for r in _ledger_rows(out)}) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, "the command finished before it could be killed"
    finished = {r["run"] for r in _ledger_rows(out)}
    assert 3 <= len(finished) < 8
    mtimes = {run: (out / "runs" / run / "run.json").stat().st_mtime_ns for run in finished}
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(finished)} reused from" in done.stdout
    rows = read_ledger(out / LEDGER)
    units = [(r["method"], r["blocks"], r["seed"], r["normal_class"]) for r in rows if r["score"] in
             ("nll", "cosine", "mahalanobis")]
    assert len(units) == len(set(units)) == 8  # 2 classes x (sanf, sanf-nocaff, knn, gaussian)
    assert {run: (out / "runs" / run / "run.json").stat().st_mtime_ns for run in finished} == mtimes
    assert all(in_unit_range(r["auroc_mean"]) for r in read(out / "table2.csv"))


def _ledger_rows(out: Path) -> list[dict]:
    try:
        return read_ledger(out / LEDGER)
    except (OSError, ValueError, KeyError):
        return []


def test_absent_data_says_not_run_and_still_writes_the_size_table(tmp_path):
    result = invoke("reproduce", "--scale", "cpu", "--tables", "2,6", "--out", str(tmp_path / "out"),
                    "--data-root", str(tmp_path / "nowhere"), "--no-download", "--cache-dir", str(tmp_path / "c"))
    assert result.exit_code == 0, result.output
    md = (tmp_path / "out" / "tables.md").read_text()
    assert "not run: data absent" in md and "Not run: data absent" in md and "## Table 6" in md
    assert [r["features"] for r in read(tmp_path / "out" / "table6.csv")][::2] == ["ViT-B/16-384", "ViT-L/16-384"]
    assert not (tmp_path / "out" / "table2.csv").exists()


def test_absent_data_leaves_the_tables_of_earlier_fits_in_the_output_folder_as_they_are(two_class_cache, tmp_path):
    out = tmp_path / "out"
    done = invoke("reproduce", "--scale", "quick", "--cache", str(two_class_cache), "--out", str(out), "--seeds", "0",
                  "--tables", "2", "--steps", "2", "--device", "cpu", "--no-keep-runs")
    assert done.exit_code == 0, done.output
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    absent = invoke("reproduce", "--scale", "cpu", "--tables", "2,6", "--out", str(out),
                    "--data-root", str(tmp_path / "nowhere"), "--no-download", "--cache-dir", str(tmp_path / "c"))
    assert absent.exit_code == 2
    assert "holds the results of earlier fits" in absent.output and "choose another --out" in absent.output
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_extraction_options_with_a_cache_are_refused(two_class_cache, tmp_path):
    result = invoke("reproduce", "--cache", str(two_class_cache), "--out", str(tmp_path / "o"), "--backbone", "x")
    assert result.exit_code == 2 and "--backbone sets the extraction; with --cache" in result.output


def test_help_says_the_scale_sets_the_options_it_sets_instead_of_extracts_defaults():
    import pipeline

    assert set(pipeline.SCALE_SET) == {"dataset"}.union(*(s.extract for s in SCALES.values()))
    text = invoke("reproduce", "--help").output
    assert "vit_base_patch16_384" not in text and "default: 8" not in text
    params = {p.name: p for p in pipeline.reproduce.params}
    for name in pipeline.SCALE_SET:
        assert not params[name].show_default and "the --scale's" in params[name].help, name
    assert params["batch_size"].show_default is not False  # one the scales leave: extract's default shown


class OneRankJob(DistContext):
    """A stand-in for one rank of a torchrun job on a GPU machine: distributed, its collectives the identity, and the
    device it is given for ``cuda`` recorded (the CPU here)."""

    @property
    def distributed(self) -> bool:
        return True

    def gather(self, obj):
        return [obj]

    def device(self, requested: str) -> torch.device:
        self._state.setdefault("asked", []).append(requested)
        return torch.device("cpu")


def test_under_torchrun_each_rank_fits_on_the_device_of_its_rank(two_class_cache, tmp_path):
    job = OneRankJob()
    done = reproduce_tables(two_class_cache, tmp_path / "out", [2], "quick", seeds=[0], device="cuda", dist=job,
                            base=FitConfig(normal="a", steps=1), progress=False, log=lambda line: None)
    assert done.fitted == 4 and job._state["asked"] == ["cuda"]  # not "cuda" as given: cuda:0 on every rank


def test_tables_3_and_4_are_refused_with_a_pointer_to_the_other_datasets(tmp_path):
    result = invoke("reproduce", "--out", str(tmp_path / "out"), "--tables", "2,3")
    assert result.exit_code == 2
    assert "'3' is not one of 2, 5, 6, 7 (Tables 3 and 4 are Table 2 on other datasets: --dataset" in result.output
    assert not (tmp_path / "out").exists()


def test_units_are_planned_seed_by_seed_each_once():
    classes = [(0, "a"), (1, "b")]
    units = plan_units([2, 5, 7], classes, seeds=[0, 1, 2], table7_seeds=[0])
    assert [u.seed for u in units] == sorted(u.seed for u in units)  # whole seeds first
    assert len({u.key for u in units}) == len(units)
    # seed 0: sanf, sanf-nocaff, knn, gaussian, K = 2, 6, 8 (K = 4 is Table 2's); seeds 1, 2: the two flows
    assert len(units) == 2 * 7 + 2 * 2 * 2
    assert {u.method for u in units if u.seed > 0} == {"sanf", "sanf-nocaff"}
    assert not plan_units([6], classes, [0], [0])


def test_table_means_are_over_classes_per_seed_then_over_seeds(tmp_path):
    """Table 2's mean row: the mean over the classes within each seed, then mean ± sample std over the seeds."""
    auroc = {(0, 0): 0.9, (1, 0): 0.7, (0, 1): 0.8, (1, 1): 0.6}  # (class, seed)
    rows = [{"method": "sanf", "blocks": 4, "seed": s, "normal_class": k, "normal_name": "ab"[k], "score": "nll",
             "auroc": a, "fit_seconds": 1.0, "score_seconds": 0.5, "num_train": 10, "transform": "raw",
             "run": f"r{k}{s}", "settings": "x"} for (k, s), a in auroc.items()]
    attrs = {"dataset": "cifar10", "backbone": "b", "input_size": [3, 8, 8], "num_patches": 4, "patch_grid": [2, 2],
             "feature_dim": 6}
    keys = {("sanf", 4, s, k): "x" for (k, s) in auroc}
    other = {**rows[0], "seed": 7, "auroc": 0.1, "run": "r07"}  # a seed this call did not ask for: not in the tables
    files, seconds = write_tables(tmp_path, [2, 5], [*rows, other], attrs, SCALES["quick"], [0, 1], FitConfig(), keys,
                                  classes=[(0, "airplane"), (1, "automobile")])
    table2 = {(r["row"], r["method"], r["score"]): r for r in read(tmp_path / "table2.csv")}
    assert float(table2["mean", "sanf", "nll"]["auroc_mean"]) == pytest.approx(0.75)  # (0.8 + 0.7) / 2
    assert float(table2["mean", "sanf", "nll"]["auroc_std"]) == pytest.approx(np.std([0.8, 0.7], ddof=1), abs=1e-6)
    assert float(table2["mean", "sanf", "nll"]["paper"]) == 0.993
    assert float(table2["airplane", "sanf", "nll"]["auroc_mean"]) == pytest.approx(0.85)
    assert float(table2["airplane", "sanf", "nll"]["paper"]) == 0.995
    table5 = read(tmp_path / "table5.csv")
    assert float(table5[0]["auroc_mean"]) == pytest.approx(0.75)
    assert float(table5[0]["auroc_std"]) == pytest.approx(np.std(list(auroc.values()), ddof=1), abs=1e-6)
    assert (float(table5[0]["paper_ViT-B/16"]), float(table5[0]["paper_ViT-L/16"])) == (0.986, 0.993)
    assert seconds["table 2"] == pytest.approx(6.0)  # 4 fits of 1.5 s
    md = (tmp_path / "tables.md").read_text()
    assert "| **mean** | 0.750 ± 0.071 |" in md and "Transformaly, mean 0.981" in md
    assert files[0] == tmp_path / "tables.md" and os.path.exists(files[1])


def test_data_that_is_there_but_malformed_is_an_error_not_absent(tmp_path):
    """Only absent data (no such folder, nothing to download) makes a 'not run' table; a malformed tree is refused."""
    (tmp_path / "empty").mkdir()
    result = invoke("reproduce", "--dataset", "folder", "--data-root", str(tmp_path / "empty"), "--out",
                    str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c"))
    assert result.exit_code == 2 and "expected folders" in result.output
    assert not (tmp_path / "out" / "tables.md").exists()


def test_an_output_folder_of_other_images_is_refused(two_class_cache, tmp_path):
    """The results in --out came from another cache's images (other sample ids): refused, not mixed in."""
    out = str(tmp_path / "out")
    assert invoke("reproduce", "--cache", str(two_class_cache), "--out", out, "--tables", "6").exit_code == 0
    other = write_cache(tmp_path / "h.h5", gaussian_splits(n_train=30, n_test=12, num_classes=2), ["a", "b"])
    result = invoke("reproduce", "--cache", str(other), "--out", out, "--tables", "6")
    assert result.exit_code == 2 and "holds results on other images" in result.output


HEADER = ",".join(LEDGER_COLUMNS) + "\n"


def test_a_torn_last_line_of_the_ledger_is_cut_off_and_its_unit_fitted_again(tmp_path):
    ledger = tmp_path / LEDGER
    knn = "knn,4,0,1,b,cosine,0.8,1.0,0.5,10,raw,r1,abcdef012345\n"
    nll = "sanf,4,0,0,a,nll,0.9,1.0,0.5,10,raw,r0,abcdef012345\n"
    ledger.write_text(f"{HEADER}{knn}{nll}sanf,4,0,0,a,z2,0.")  # killed in the middle of the unit's second row
    # the unit's complete nll row goes with its torn z2 row: the unit is not done, not done without its z2
    assert [r["method"] for r in read_ledger(ledger)] == ["knn"]
    assert ledger.read_text().endswith("z2,0.")  # read without repair: the file as it was
    assert [r["method"] for r in read_ledger(ledger, repair=True)] == ["knn"]
    assert ledger.read_text() == f"{HEADER}{knn}"  # repaired: the next append starts on a fresh line
    ledger.write_text(f"{HEADER}{knn}{nll}{nll.replace('nll', 'z2')[:-4]}")  # torn inside the last column
    assert [r["method"] for r in read_ledger(ledger, repair=True)] == ["knn"]
    assert ledger.read_text() == f"{HEADER}{knn}"
    ledger.write_text(f"{HEADER}sanf,4,0\n{knn}")
    with pytest.raises(ValueError, match="line 2 is malformed"):
        read_ledger(ledger)


def test_repairing_a_torn_ledger_keeps_every_complete_row_of_non_ascii_class_names(tmp_path):
    ledger = tmp_path / LEDGER
    first = "knn,4,0,0,chat_noir_été,cosine,0.8,1.0,0.5,10,raw,r0,abcdef012345\n"
    ledger.write_text(f"{HEADER}{first}knn,4,0,1,chien_âgé,cos", encoding="utf-8")
    assert [r["normal_name"] for r in read_ledger(ledger, repair=True)] == ["chat_noir_été"]
    assert ledger.read_text(encoding="utf-8") == f"{HEADER}{first}"  # cut at the byte, not at the character


def test_a_ledger_torn_in_its_first_write_is_empty_and_another_file_is_refused_unchanged(tmp_path):
    ledger = tmp_path / LEDGER
    ledger.write_text(HEADER[:20])
    assert read_ledger(ledger, repair=True) == [] and ledger.read_text() == ""
    ledger.write_text("name,score\nx,1\ny,")
    with pytest.raises(ValueError, match="is not a reproduce ledger"):
        read_ledger(ledger, repair=True)
    assert ledger.read_text() == "name,score\nx,1\ny,"


def test_two_ranks_appending_to_a_new_ledger_write_its_header_once(tmp_path, monkeypatch):
    """Rank 1 opens the new ledger, then waits for the lock that rank 0 holds while it writes the header and its
    unit: rank 1 must not write the header a second time."""
    import fcntl

    from flow.experiments import reproduce as module

    ledger = tmp_path / LEDGER
    row = {"method": "knn", "blocks": 4, "seed": 0, "normal_class": 0, "normal_name": "a", "score": "cosine",
           "auroc": "0.8", "fit_seconds": 1.0, "score_seconds": 0.5, "num_train": 10, "transform": "raw",
           "run": "r0", "settings": "abcdef012345"}
    real_flock = fcntl.flock

    def flock_after_the_other_rank(fd, op):
        if not ledger.stat().st_size:  # the other rank takes the lock first and appends its unit
            monkeypatch.setattr(module.fcntl, "flock", real_flock)
            module._append_ledger(ledger, [{**row, "normal_class": 1, "normal_name": "b"}])
        real_flock(fd, op)

    monkeypatch.setattr(module.fcntl, "flock", flock_after_the_other_rank)
    module._append_ledger(ledger, [row])
    assert ledger.read_text().count("method,blocks") == 1
    assert [r["normal_name"] for r in read_ledger(ledger)] == ["b", "a"]


def test_a_diverging_fit_is_left_out_and_the_others_go_on(tmp_path):
    """Class b's train rows scaled by 1e18 make its flows diverge: class a's fits finish and are tabulated, the failure
    is named in the tables and in the one-line error (exit 2), and the next call tries only the failed ones again."""
    splits = gaussian_splits(n_train=24, n_test=12, num_classes=2)
    cls, patches, labels = splits["train"]
    cls[labels == 1] *= 1e18
    patches[labels == 1] *= 1e18
    cache = write_cache(tmp_path / "div.h5", splits, ["a", "b"])
    args = ["reproduce", "--cache", str(cache), "--out", str(tmp_path / "out"), "--tables", "5", "--seeds", "0",
            "--steps", "2", "--device", "cpu"]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert "2 fits failed and are left out of the tables (first: sanf K=4 seed 0 normal b:" in result.output
    md = (tmp_path / "out" / "tables.md").read_text()
    assert "**2 fits failed**" in md and "normal b" in md
    assert [r["n_fits"] for r in read(tmp_path / "out" / "table5.csv")] == ["1", "1", "1", "1"]
    again = invoke(*args)
    assert "2 reused from" in again.output and "2 to fit" in again.output


def test_tables_only_fits_nothing_and_tabulates_what_the_ledger_holds(two_class_cache, tmp_path):
    out = tmp_path / "out"
    args = ["reproduce", "--cache", str(two_class_cache), "--out", str(out), "--tables", "2", "--seeds", "0",
            "--steps", "2", "--device", "cpu"]
    assert invoke(*args, "--normal", "a").exit_code == 0
    runs = sorted(p.name for p in (out / "runs").iterdir())
    result = invoke(*args, "--tables-only")
    assert result.exit_code == 0, result.output
    assert "4 reused from" in result.output and "0 fits fitted" in result.output
    assert "0fit" not in result.output  # no bar over nothing (tqdm: "0fit [00:00, ?fit/s]")
    assert sorted(p.name for p in (out / "runs").iterdir()) == runs
    assert {r["row"] for r in read(out / "table2.csv")} == {"a"}  # no mean over classes with class b missing
    assert "Incomplete: 4 of 8 fits finished" in (out / "tables.md").read_text()
