"""extract.distributed without a process group: detection from the environment, the chunk / fit assignment, and
how every rank agrees on an error (other ranks simulated)."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from extract.distributed import SINGLE, DistContext, JobError, assign, from_env
from flow.experiments.sweep import SweepFit, per_class, sweep_fits
from pipeline import command

TORCHRUN_ENV = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "localhost"}


def test_no_torchrun_environment_means_one_process():
    for environ in ({}, {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}, {"RANK": "1", "WORLD_SIZE": "2"},
                    {"WORLD_SIZE": "4", "LOCAL_RANK": "0"}):
        ctx = from_env(environ)
        assert not ctx.distributed and ctx.is_main and (ctx.rank, ctx.world_size) == (0, 1), environ


def test_torchrun_environment_is_detected():
    ctx = from_env(TORCHRUN_ENV)
    assert ctx.distributed and not ctx.is_main
    assert (ctx.rank, ctx.world_size, ctx.local_rank) == (1, 2, 1)
    assert from_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}).local_rank == 1  # 2nd node of 4 GPUs


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "one", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "must be integers; got RANK='one'"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK 2 / LOCAL_RANK 0 do not fit WORLD_SIZE 2"),
])
def test_a_malformed_environment_is_refused(environ, message):
    with pytest.raises(ValueError, match=message):
        from_env(environ)


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [0, 1, 2, 7, 58])
def test_items_go_to_rank_i_mod_world_size_without_overlap(world_size, n):
    items = [("train", 32 * i, 32 * i + 32) for i in range(n)]
    shares = [assign(items, rank, world_size) for rank in range(world_size)]
    for rank, share in enumerate(shares):
        assert share == [item for i, item in enumerate(items) if i % world_size == rank]
    flat = [item for share in shares for item in share]
    assert len(flat) == len(set(flat)) == n and set(flat) == set(items)  # disjoint, and together every item
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert DistContext(rank=world_size - 1, world_size=world_size).share(items) == shares[-1]


def test_assign_refuses_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        assign([1, 2, 3], 2, 2)


def test_one_process_collectives_are_the_identity():
    assert SINGLE.gather({"a": 1}) == [{"a": 1}]
    assert SINGLE.broadcast([3, 4]) == [3, 4]
    assert SINGLE.share([1, 2, 3]) == [1, 2, 3]
    assert SINGLE.log(print) is print
    assert SINGLE.device("cpu").type == "cpu" and SINGLE.backend("cpu") == "gloo"
    err = KeyError("x")
    with pytest.raises(KeyError) as caught:
        with SINGLE.all_succeed():
            raise err
    assert caught.value is err  # unchanged: a plain run behaves as before
    with SINGLE.progress(10, "extract", "chunk") as step:
        step()


def test_other_ranks_lines_carry_their_rank():
    lines = []
    DistContext(rank=1, world_size=2).log(lines.append)("fitted knn")
    DistContext(rank=0, world_size=2).log(lines.append)("fitted gaussian")
    assert lines == ["[rank 1] fitted knn", "fitted gaussian"]


class TwoRanks(DistContext):
    """A distributed context whose collectives answer for the other rank with ``other`` (no process group)."""

    def __init__(self, rank: int, other):
        super().__init__(rank=rank, world_size=2)
        object.__setattr__(self, "other", other)

    def gather(self, obj):
        return [obj, self.other] if self.rank == 0 else [self.other, obj]


def test_every_rank_leaves_a_block_that_failed_on_one_rank():
    with TwoRanks(0, None).all_succeed():  # nobody failed: the block is passed
        pass
    main = TwoRanks(0, "cannot read image train/red/001.png")
    with pytest.raises(JobError) as caught:
        with main.all_succeed():
            pass
    assert (str(caught.value), caught.value.rank, caught.value.silent) == ("cannot read image train/red/001.png",
                                                                          1, False)
    assert main._state["failed"]
    with pytest.raises(JobError) as caught:  # the failing rank 1 itself: rank 0 reports, rank 1 stays quiet
        with TwoRanks(1, None).all_succeed():
            raise ValueError("cannot read image train/red/001.png")
    assert caught.value.silent and caught.value.rank == 1
    with pytest.raises(JobError) as caught:  # rank 1 learns of rank 0's error and stays quiet
        with TwoRanks(1, "lock held").all_succeed():
            pass
    assert caught.value.silent and caught.value.rank == 0
    own = OSError("disk full")
    with pytest.raises(OSError) as caught:  # rank 0 failed first: its own error, as one process would raise it
        with TwoRanks(0, "later error").all_succeed():
            raise own
    assert caught.value is own


def test_a_bug_on_another_rank_keeps_its_type_in_the_message():
    with pytest.raises(JobError, match="^KeyError: 'feature_dim'$"):
        with TwoRanks(1, None).all_succeed():
            raise KeyError("feature_dim")


def test_the_cli_prints_rank_0s_line_and_nothing_on_the_other_ranks():
    @click.command()
    @click.option("--silent", is_flag=True)
    @command
    def job(silent):
        raise JobError("cannot read image x.png", rank=1, silent=silent)

    loud = CliRunner().invoke(job, [])
    assert loud.exit_code == 2 and loud.output.strip() == "Error: [rank 1] cannot read image x.png"
    quiet = CliRunner().invoke(job, ["--silent"])
    assert quiet.exit_code == 2 and quiet.output == ""


def test_sweep_fits_keep_the_order_of_one_process(tmp_path):
    fits = sweep_fits([tmp_path / "c.h5"], "all", ["sanf", "knn"], [0, 1], ["raw"], [2, 4], [16])
    assert [(f.method, f.seed, f.setting) for f in fits] == [
        ("sanf", 0, "K2-H16"), ("sanf", 0, "K4-H16"), ("sanf", 1, "K2-H16"), ("sanf", 1, "K4-H16"), ("knn", 0, "")]
    assert all(isinstance(f, SweepFit) and f.normal == "all" for f in fits)


def test_sweep_fits_resolve_auto_per_cache_and_fit_a_transform_once(tmp_path):
    from conftest import gaussian_splits, write_cache

    cnn = write_cache(tmp_path / "cnn.h5", gaussian_splits(), ["a", "b", "c"], semantic_vector="spatial_mean")
    vit = write_cache(tmp_path / "vit.h5", gaussian_splits(), ["a", "b", "c"])
    fits = sweep_fits([cnn, vit], "all", ["knn"], [0], ["auto", "ssqrt-l2", "raw"], [4], [8])
    assert [(f.cache.name, f.features) for f in fits] == [
        ("cnn.h5", "ssqrt-l2"), ("cnn.h5", "raw"), ("vit.h5", "raw"), ("vit.h5", "ssqrt-l2")]


def test_per_class_splits_each_fit_into_its_normal_classes(gaussian_cache):
    fits = per_class(sweep_fits([gaussian_cache], "all", ["knn", "gaussian"], [0], ["raw"], [4], [1024]))
    assert [(f.method, f.normal) for f in fits] == [("knn", "a"), ("knn", "b"), ("knn", "c"), ("gaussian", "a"),
                                                    ("gaussian", "b"), ("gaussian", "c")]
    assert [f.normal for f in per_class(sweep_fits([gaussian_cache], "2", ["knn"], [0], ["raw"], [4], [8]))] == ["c"]
    with pytest.raises(ValueError, match="--normal must be 'all', an index 0..2 or one of a, b, c"):
        per_class(sweep_fits([gaussian_cache], "z", ["knn"], [0], ["raw"], [4], [8]))


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("dataset, download, first", [
    ("cifar10", True, True),  # torchvision downloads it: rank 0 alone first, the others after it
    ("cifar10", False, False),
    ("folder", True, False),  # nothing to download
])
def test_rank_0_downloads_a_dataset_alone_before_the_other_ranks_read_it(monkeypatch, rank, dataset, download, first):
    import extract.run
    from extract.datasets import DataAbsentError

    events = []

    class Recording(TwoRanks):
        def gather(self, obj):
            events.append("meet")
            return super().gather(obj)

    def build(name, data_root, may_download, **kwargs):
        events.append(("build", may_download))
        raise DataAbsentError("not here")  # ends the extraction at its first setup

    monkeypatch.setattr(extract.run, "build_dataset", build)
    with pytest.raises((DataAbsentError, JobError)):
        extract.run.extract_features(dataset, "/nowhere", download=download, device="cpu",
                                     dist=Recording(rank, None))
    setup = [("build", download), "meet"]  # every rank, in the all_succeed block
    assert events == ([("build", True), "meet"] if rank == 0 else ["meet"]) + setup if first else setup
