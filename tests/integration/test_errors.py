"""Bad input at the command line, one test per kind: exit code 2, one ``Error:`` line naming the argument or file,
and no output left behind that looks complete (no ``.h5`` cache, no run folder, no ``auroc.csv``).

The argument errors covered in test_cli.py (unknown dataset and backbone, missing or malformed data root,
``--normal`` out of range or unknown, unreadable image, unwritable runs folder, non-HDF5 cache, changed or
missing cache at ``score``) are not repeated here.
"""

from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pytest
from test_cli import SMALL, assert_input_error, assert_ok, extract_args, invoke

from conftest import RUNNING_EXTRACTION, gaussian_splits, make_image_tree, process_holding, write_cache

FIT = ("--epochs", "1", "--hidden", "8", "--device", "cpu")


def no_runs(runs_dir) -> bool:
    return not runs_dir.exists() or not any(p for p in runs_dir.iterdir() if not p.name.startswith("."))


def test_normal_class_without_train_rows(tmp_path):
    splits = gaussian_splits(n_train=4, n_test=2)
    cls, patches, labels = splits["train"]
    keep = labels != 2
    splits["train"] = (cls[keep], patches[keep], labels[keep])
    cache = write_cache(tmp_path / "c.h5", splits, ["a", "b", "c"])
    result = invoke("fit", "--cache", str(cache), "--normal", "c", "--runs-dir", str(tmp_path / "runs"), *FIT)
    assert_input_error(result, "--normal 'c': the train split has no rows of this class")
    assert no_runs(tmp_path / "runs")


@pytest.mark.parametrize("only,missing", [(0, "0 anomalous"), (1, "0 normal")])
def test_test_split_without_anomalous_or_normal_images(tmp_path, only, missing):
    splits = gaussian_splits(n_train=4, n_test=2)
    cls, patches, labels = splits["test"]
    keep = labels == only
    splits["test"] = (cls[keep], patches[keep], labels[keep])
    cache = write_cache(tmp_path / "c.h5", splits, ["a", "b", "c"])
    runs = tmp_path / "runs"
    assert_ok(invoke("fit", "--cache", str(cache), "--normal", "a", "--runs-dir", str(runs), *FIT))
    result = invoke("score", "--runs-dir", str(runs), "--device", "cpu")
    assert_input_error(result, "normal0-a__seed0, score nll: AUROC needs normal and anomalous samples", missing)
    assert not (runs / "auroc.csv").exists()
    assert not list(runs.glob("*/scores.csv"))


def test_truncated_image_is_named(tmp_path):
    root = make_image_tree(tmp_path / "data", per_split={"train": 2, "test": 1}, size=64)
    victim = root / "train" / "red" / "001.png"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    cache_dir = tmp_path / "cache"
    result = invoke(*extract_args(root, cache_dir, backbone=SMALL))
    assert_input_error(result, f"cannot read image {victim}")
    assert not list(cache_dir.glob("*.h5"))


def test_unreadable_images_are_all_named_before_any_is_encoded(tmp_path):
    root = make_image_tree(tmp_path / "data", per_split={"train": 2, "test": 1})
    bad = [root / "train" / "red" / "001.png", root / "test" / "blue" / "000.png"]
    bad[0].write_bytes(b"not a png at all")
    bad[1].write_bytes(bad[1].read_bytes()[:60])  # truncated
    cache_dir = tmp_path / "cache"
    result = invoke(*extract_args(root, cache_dir, backbone=SMALL))
    assert_input_error(result, f"cannot read image {bad[0]}: cannot identify image file (and 1 more unreadable: "
                               f"{bad[1]}); remove or replace them, then run the same command again")
    assert "encoded" not in result.output and list(cache_dir.iterdir()) == []  # nothing committed, no work folder


def test_unwritable_cache_dir(image_tree, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = invoke(*extract_args(image_tree, blocker / "cache", backbone=SMALL))
    assert_input_error(result, "cannot write cache file", str(blocker / "cache"))
    assert blocker.read_text() == "x"


@pytest.fixture
def small_cache(tmp_path):
    return write_cache(tmp_path / "cache" / "c.h5", gaussian_splits(n_train=4, n_test=2), ["a", "b", "c"])


def test_truncated_hdf5_cache(small_cache, tmp_path):
    data = small_cache.read_bytes()
    small_cache.write_bytes(data[: len(data) // 2])
    for args in (("fit", "--cache", str(small_cache), "--runs-dir", str(tmp_path / "runs"), *FIT),
                 ("info", str(small_cache))):
        assert_input_error(invoke(*args), f"{small_cache} is not a readable HDF5 file (truncated or of another kind)")
    assert no_runs(tmp_path / "runs")


def test_a_cache_whose_extraction_is_running_is_named_by_the_pid_writing_it(tmp_path):
    cache = tmp_path / "cache" / "c.h5"
    cache.parent.mkdir()
    plan = {"batch_size": 1, "chunk_rows": 2, "splits": {"train": {"num_rows": 4}, "test": {"num_rows": 2}}}
    runs = tmp_path / "runs"
    with process_holding(RUNNING_EXTRACTION, str(cache), json.dumps(plan)) as proc:
        result = invoke("fit", "--cache-dir", str(cache.parent), "--runs-dir", str(runs), *FIT)
        assert_input_error(result, f"no complete cache in --cache-dir {cache.parent} yet: c.h5 is being written by "
                                   f"pid {proc.pid}; wait for its extraction to finish")
        result = invoke("fit", "--cache", str(cache), "--runs-dir", str(runs), *FIT)
        assert_input_error(result, f"cache file {cache} does not exist yet: its extraction is being written by pid "
                                   f"{proc.pid} (0 of 3 chunks committed); wait for it to finish")
    assert no_runs(runs)
    result = invoke("fit", "--cache-dir", str(cache.parent), "--runs-dir", str(runs), *FIT)  # killed: interrupted
    assert_input_error(result, "only an interrupted extraction (c.h5.partial); run the same extract command again")


def test_a_cache_open_for_writing_elsewhere_is_reported_as_locked(small_cache, tmp_path):
    code = "import sys, time, h5py; f = h5py.File(sys.argv[1], 'r+'); print('ready', flush=True); time.sleep(60)"
    with process_holding(code, str(small_cache)):
        for args in (("fit", "--cache", str(small_cache), "--runs-dir", str(tmp_path / "runs"), *FIT),
                     ("info", str(small_cache))):
            assert_input_error(invoke(*args), f"{small_cache} is locked by another process that has it open for "
                                              "writing (HDF5 file locking); wait for that process to finish")
    assert no_runs(tmp_path / "runs")
    assert_ok(invoke("info", str(small_cache)))  # the writer is gone: readable again


def test_foreign_hdf5_file(tmp_path):
    foreign = tmp_path / "other.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.zeros(3)
        f.attrs["format"] = "something-else"
    result = invoke("fit", "--cache", str(foreign), "--runs-dir", str(tmp_path / "runs"), *FIT)
    assert_input_error(result, f"{foreign} is not a sanf-ad-features cache (format attribute: 'something-else')")
    assert no_runs(tmp_path / "runs")


def test_unknown_format_version(small_cache, tmp_path):
    with h5py.File(small_cache, "r+") as f:
        f.attrs["format_version"] = 99
    result = invoke("info", str(small_cache))
    assert_input_error(result, "has format version 99; this build reads versions [1, 2]")


def test_cache_with_inconsistent_shapes(small_cache, tmp_path):
    with h5py.File(small_cache, "r+") as f:
        del f["test/sample_id"]
        f["test/sample_id"] = np.array([b"x"] * 5)
    result = invoke("fit", "--cache", str(small_cache), "--runs-dir", str(tmp_path / "runs"), *FIT)
    assert_input_error(result, "/test/sample_id has shape (5,), expected (6,)")
    assert no_runs(tmp_path / "runs")


def test_non_finite_rows_are_refused_by_fit_and_score(tmp_path):
    splits = gaussian_splits(n_train=4, n_test=2)
    splits["train"][0][1, 3] = np.nan  # class a, train row 1
    splits["test"][1][4, 0, 2] = np.inf  # test row 4 (class c)
    cache = write_cache(tmp_path / "c.h5", splits, ["a", "b", "c"])
    runs = tmp_path / "runs"
    result = invoke("fit", "--cache", str(cache), "--normal", "a", "--runs-dir", str(runs), *FIT)
    assert_input_error(result, f"{cache}: /train/cls row 1 holds NaN or infinite values (1 such rows read)")
    assert no_runs(runs)
    assert_ok(invoke("fit", "--cache", str(cache), "--normal", "b", "--runs-dir", str(runs), *FIT))  # rows 4..7
    result = invoke("score", "--runs-dir", str(runs), "--device", "cpu")
    assert_input_error(result, f"{cache}: /test/patches row 4 holds NaN or infinite values")
    assert not (runs / "auroc.csv").exists()


def test_non_finite_backbone_output_stops_extraction_naming_the_image(image_tree, tmp_path, monkeypatch):
    from extract.backbone import TokenEncoder

    forward = TokenEncoder.forward

    def poisoned(self, images):
        cls, patches = forward(self, images)
        patches = patches.clone()
        if len(patches) > 1:  # (extract's free-space check encodes one blank image)
            patches[1, 0, 0] = float("nan")  # the second image of every batch
        return cls, patches

    monkeypatch.setattr(TokenEncoder, "forward", poisoned)
    cache_dir = tmp_path / "cache"
    result = invoke(*extract_args(image_tree, cache_dir, "--batch-size", "4", backbone=SMALL))
    assert_input_error(result, "the backbone gave non-finite features for 1 images, first 'train/blue/001.png' "
                               "(train row 1) in an fp32 forward; check the backbone and its weights")
    assert not list(cache_dir.glob("*.h5"))
    # in a reduced-precision forward the message suggests fp32
    result = invoke(*extract_args(image_tree, cache_dir, "--batch-size", "4", "--precision", "bf16", backbone=SMALL))
    assert_input_error(result, "the backbone gave non-finite features for 1 images, first 'train/blue/001.png' "
                               "(train row 1); try --precision fp32")


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_features_beyond_float16_range_are_refused_before_they_are_stored(image_tree, tmp_path, monkeypatch, dtype):
    """Finite float32 features of 1e5 become inf in float16: refused, naming the image and --dtype float32,
    and nothing is committed; float32 storage keeps them."""
    from extract.backbone import TokenEncoder

    forward = TokenEncoder.forward

    def large(self, images):
        cls, patches = forward(self, images)
        cls = cls.clone()
        if len(cls) > 2:
            cls[2, 5] = 1e5  # the third image of every batch of more than 2
        return cls, patches

    monkeypatch.setattr(TokenEncoder, "forward", large)
    cache_dir = tmp_path / "cache"
    result = invoke(*extract_args(image_tree, cache_dir, "--batch-size", "4", "--dtype", dtype, backbone=SMALL))
    if dtype == "float32":
        assert_ok(result)
        return
    assert_input_error(result, "the features of 1 images exceed the range of --dtype float16 (largest |value| 1e+05; "
                               "float16 holds up to 65504), first 'train/blue/002.png' (train row 2); use --dtype "
                               "float32")
    assert not list(cache_dir.glob("*.h5")) and not list(cache_dir.glob("*.partial/*.npz"))


@pytest.mark.parametrize("dtype, precision, advice", [
    ("float16", "bf16", "with --dtype float32 if the features exceed float16's range (65504), or with --precision "
                        "fp32 if the backbone's bf16 forward overflowed"),
    ("float16", "fp32", "with --dtype float32 if the features exceed float16's range (65504)$"),
    ("float32", "fp32", "after checking the backbone and its weights: its own fp32 output was not finite"),
])
def test_non_finite_rows_of_a_cache_name_the_causes_its_settings_leave(tmp_path, dtype, precision, advice):
    """The advice names float16 storage only for a float16 cache and the forward precision only when it was not
    fp32 (an fp32 cache was told to use --precision fp32, which it already had)."""
    splits = gaussian_splits(n_train=4, n_test=2)
    splits["train"][0][1, 3] = np.inf
    cache = write_cache(tmp_path / "c.h5", splits, ["a", "b", "c"], dtype=dtype, precision=precision)
    result = invoke("fit", "--cache", str(cache), "--normal", "a", "--runs-dir", str(tmp_path / "runs"), *FIT)
    assert_input_error(result, "/train/cls row 1 holds NaN or infinite values (1 such rows read); extract again "
                               "(--overwrite) ")
    assert re.search(re.escape(advice.rstrip("$")) + ("$" if advice.endswith("$") else ""),
                     result.output.strip().splitlines()[-1]), result.output


# found by a breaking session


def test_img_size_that_is_not_a_multiple_of_the_patch(image_tree, tmp_path):
    args = extract_args(image_tree, tmp_path / "cache")
    args[args.index("--img-size") + 1] = "44"
    assert_input_error(invoke(*args), "--img-size 44 is not a multiple of the patch size 16 of vit_tiny_patch16_224; "
                                      "use e.g. 48")


@pytest.mark.parametrize("option,value", [("--hidden", "3000000000"), ("--heads", "100000000"),
                                          ("--blocks", "100000")])
def test_flow_sizes_beyond_any_memory_are_refused(small_cache, tmp_path, option, value):
    result = invoke("fit", "--cache", str(small_cache), "--runs-dir", str(tmp_path / "runs"), option, value)
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("value", ["³", "١", "1.0"])
def test_normal_accepts_ascii_digits_only(small_cache, tmp_path, value):
    result = invoke("fit", "--cache", str(small_cache), "--normal", value, "--runs-dir", str(tmp_path / "runs"), *FIT)
    assert_input_error(result, "--normal must be 'all', an index 0..2 or one of a, b, c", f"got {value!r}")
    assert no_runs(tmp_path / "runs")


@pytest.mark.parametrize("option", ["--cache-dir", "--runs-dir"])
def test_empty_folder_paths_are_refused(small_cache, tmp_path, option, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--cache", str(small_cache), "--runs-dir", str(tmp_path / "runs"), *FIT]
    args += [option, ""] if option == "--cache-dir" else []
    if option == "--runs-dir":
        args[args.index("--runs-dir") + 1] = ""
    result = invoke(*args)
    assert result.exit_code == 2 and f"Invalid value for '{option}': an empty path is not allowed" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_fit_all_checks_every_run_slot_before_training(small_cache, tmp_path):
    from flow.store.run_folder import run_name

    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / run_name("c", "sanf", 2, "c", 0)).write_text("in the way")
    result = invoke("fit", "--cache", str(small_cache), "--normal", "all", "--runs-dir", str(runs), *FIT)
    assert_input_error(result, "normal2-c__seed0 exists and is not a run folder")
    assert "fitted" not in result.output
    assert sorted(p.name for p in runs.iterdir()) == [run_name("c", "sanf", 2, "c", 0)]


def test_score_refuses_an_empty_test_split(tmp_path):
    splits = gaussian_splits(n_train=4, n_test=2)
    cls, patches, labels = splits["test"]
    splits["test"] = (cls[:0], patches[:0], labels[:0])
    cache = write_cache(tmp_path / "c.h5", splits, ["a", "b", "c"])
    runs = tmp_path / "runs"
    assert_ok(invoke("fit", "--cache", str(cache), "--normal", "a", "--runs-dir", str(runs), *FIT))
    assert_input_error(invoke("score", "--runs-dir", str(runs)), f"the test split of {cache.resolve()} is empty")


@pytest.mark.parametrize("edit,fragment", [
    (lambda r: r["flow"].update(hidden=-1), "run.json has an invalid flow configuration"),
    (lambda r: r.update(cache=5), "run.json has values of the wrong type for ['cache']"),
    (lambda r: r.update(normal_class="0", seed=None), "wrong type for ['normal_class', 'seed']"),
    (lambda r: r["flow"].update(alpha="3"), "flow clamp (alpha in run.json) must be a finite number > 0, got '3'"),
    (lambda r: r["flow"].update(use_caff="false"), "flow use_caff must be true or false, got 'false'"),
    (lambda r: r["flow"].update(num_blocks=10**6), "flow num_blocks must be an integer in 1..256, got 1000000"),
    (lambda r: r["flow"].update(num_blocks=3), "model.safetensors does not fit the flow described in run.json"),
])
def test_score_names_run_json_values_of_the_wrong_kind(small_cache, tmp_path, edit, fragment):
    import json

    runs = tmp_path / "runs"
    assert_ok(invoke("fit", "--cache", str(small_cache), "--normal", "a", "--runs-dir", str(runs), *FIT))
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    record = json.loads((run / "run.json").read_text())
    edit(record)
    (run / "run.json").write_text(json.dumps(record))
    assert_input_error(invoke("score", "--runs-dir", str(runs)), f"run {run}", fragment)
    assert not (runs / "auroc.csv").exists()


def test_a_flow_too_large_for_this_machine_is_refused_before_allocating(small_cache, tmp_path):
    result = invoke("fit", "--cache", str(small_cache), "--runs-dir", str(tmp_path / "runs"), "--hidden", "65536",
                    "--blocks", "256", "--device", "cpu")
    assert_input_error(result, "parameters:", "GiB with gradients and Adam state, more than this machine's",
                       "lower --hidden or --blocks")
    assert no_runs(tmp_path / "runs")


def test_dangling_link_in_a_run_slot_is_refused_before_training(small_cache, tmp_path):
    from flow.store.run_folder import run_name

    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / run_name("c", "sanf", 1, "b", 0)).symlink_to(tmp_path / "nowhere")
    result = invoke("fit", "--cache", str(small_cache), "--normal", "all", "--runs-dir", str(runs), *FIT)
    assert_input_error(result, "normal1-b__seed0 exists and is not a run folder")
    assert "fitted" not in result.output


@pytest.mark.parametrize("command", ["fit", "sweep", "demo"])
def test_epochs_and_steps_together_are_refused(tmp_path, command):
    """A fit has one length: --epochs and --steps both given is refused before anything is read or written."""
    where = ["--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
    where += ["--dataset", "digits"] if command == "sweep" else []
    result = invoke(command, "--epochs", "3", "--steps", "40", *where)
    assert_input_error(result, "--epochs and --steps exclude each other (a fit has one length); got --epochs 3 "
                               "and --steps 40")
    assert no_runs(tmp_path / "runs") and not (tmp_path / "cache").exists()
    bad = invoke(command, "--steps", "0", *where)
    assert bad.exit_code == 2 and "--steps" in bad.output


def test_early_stop_without_held_out_rows_is_refused(tmp_path):
    cache = write_cache(tmp_path / "c.h5", gaussian_splits(n_train=8, n_test=2), ["a", "b", "c"])
    result = invoke("fit", "--cache", str(cache), "--normal", "a", "--early-stop", "--runs-dir", str(tmp_path / "runs"),
                    *FIT)
    assert_input_error(result, "--early-stop needs held-out normal rows to compare the train loss with: pass "
                               "--val-fraction (e.g. 0.2)")
    assert no_runs(tmp_path / "runs")
    ok = invoke("fit", "--cache", str(cache), "--normal", "a", "--early-stop", "--val-fraction", "0.25",
                "--runs-dir", str(tmp_path / "runs"), *FIT)
    assert_ok(ok)


@pytest.mark.parametrize("layout,split,expected", [
    ("classes", "train", "train/<class>/<image>"), ("classes", "test", "test/<class>/<image>"),
    ("good-defect", "train", "train/good/<image>"), ("good-defect", "test", "test/{good,red}/<image>")])
def test_images_outside_the_class_folders_are_refused(tmp_path, layout, split, expected):
    root = make_image_tree(tmp_path / "data", classes=("good", "red"), per_split={"train": 2, "test": 1})
    if layout == "good-defect":
        for stray in (root / "train" / "red").iterdir():
            stray.unlink()
        (root / "train" / "red").rmdir()
    for name in ("a.png", "b.jpg"):
        (root / split / name).write_bytes((root / "test" / "good" / "000.png").read_bytes())
    (root / split / "notes.txt").write_text("not an image: not counted")
    cache_dir = tmp_path / "cache"
    result = invoke(*extract_args(root, cache_dir, "--layout", layout, backbone=SMALL))
    assert_input_error(result, f"--data-root {root}: {split}/ holds 2 image files outside any class folder (a.png, "
                               f"b.jpg); images must lie in {root}/{expected}: move them into class folders")
    assert not cache_dir.exists()


@pytest.mark.parametrize("split", ["train", "test"])
def test_an_empty_class_folder_points_to_the_good_defect_layout(tmp_path, split):
    """Normal images only in train/ (an empty defect folder there), or none of a class in test/: --layout classes
    needs every class in both splits; the message points to --layout good-defect."""
    root = make_image_tree(tmp_path / "data", classes=("defect", "good"), per_split={"train": 2, "test": 1})
    for image in (root / split / "defect").iterdir():
        image.unlink()
    cache_dir = tmp_path / "cache"
    result = invoke(*extract_args(root, cache_dir, backbone=SMALL))
    assert_input_error(result, f"--data-root {root}: the class folder {split}/defect/ holds no images; every class "
                               f"needs images in {root}/{split}/<class>/<image>; for normal images only in train/ "
                               f"({root}/train/good/, {root}/test/good/, {root}/test/<defect type>/) pass --layout "
                               "good-defect")
    assert not cache_dir.exists()


def test_extract_refuses_up_front_when_the_disk_is_too_small(image_tree, tmp_path, monkeypatch):
    """Before any image is encoded: the chunks still to commit plus the assembled cache (about twice the cache) are
    compared with the free space of --cache-dir; the error names the folder, both sizes and what is free."""
    import shutil

    disk_usage = shutil.disk_usage
    monkeypatch.setattr("extract.run.shutil.disk_usage", lambda path: disk_usage(path)._replace(free=1000))
    cache_dir = tmp_path / "cache"
    result = invoke(*extract_args(image_tree, cache_dir, backbone=SMALL))
    line = assert_input_error(result, f"--cache-dir {cache_dir}: extracting needs about ",
                              "1.0 kB is free; free space or choose another --cache-dir")
    needed = re.search(r"needs about (\S+ \S+) free \((\S+ \S+) for the remaining chunks, (\S+ \S+) to assemble the "
                       r"cache\), ", line)
    assert needed, line
    assert "encoded" not in result.output and list(cache_dir.iterdir()) == []  # no work folder, no lock, no cache


def test_a_disk_that_fills_mid_run_keeps_the_committed_chunks_and_the_same_command_resumes(image_tree, tmp_path,
                                                                                           monkeypatch):
    """ENOSPC while the second chunk is written: one error line naming the folder and the space needed, the
    half-written temporary chunk removed, the first chunk kept; the same command then resumes and finishes."""
    import errno

    from cache import FeatureCache

    savez = np.savez
    calls = []

    def full_on_the_second_chunk(file, *args, **kwargs):
        calls.append(file)
        if len(calls) == 2:
            file.write(b"PK\x03\x04 the first bytes of a chunk")
            raise OSError(errno.ENOSPC, "No space left on device")
        return savez(file, *args, **kwargs)

    monkeypatch.setattr("cache.chunks.np.savez", full_on_the_second_chunk)
    cache_dir = tmp_path / "cache"
    args = extract_args(image_tree, cache_dir, "--batch-size", "2", "--commit-every", "1", backbone=SMALL)
    result = invoke(*args)
    (work,) = cache_dir.glob("*.partial")
    assert_input_error(result, f"the disk holding {cache_dir} is full (No space left on device): committing the "
                               "chunk train rows 2..3 failed; finishing the extraction needs about ",
                       f"is free; the 1 committed chunk is kept in {work}: free space and run the same extract "
                       "command again to resume")
    assert sorted(p.name for p in work.iterdir()) == ["manifest.json", "train-0000000000.npz"]  # no temporary file
    assert [p.name for p in cache_dir.iterdir()] == [work.name]  # no cache, no lock

    monkeypatch.setattr("cache.chunks.np.savez", savez)
    result = invoke(*args)
    assert_ok(result)
    assert "resuming the interrupted extraction" in result.output and "1 of 7 chunks already committed" in result.output
    (path,) = cache_dir.iterdir()
    assert path.suffix == ".h5"
    with FeatureCache(path) as cache:
        assert cache.split("train").num_rows == 8 and cache.split("test").num_rows == 6
