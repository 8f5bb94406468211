"""Fitting detectors on the train split of a cache, one run folder per normal class: the protocol behind ``fit``.

Runs are stored by :mod:`flow.store.run_folder`. A run fitted with held-out normal train rows (``val_fraction > 0``)
is calibrated: the held-out rows' scores are stored with it (:mod:`flow.detectors.calibration`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from cache import PARTIAL_SUFFIX, CacheError, FeatureCache, lock_holder, read_root_attrs
from extract.device import resolve_device
from extract.encode import provenance
from flow.detectors.calibration import (
    DEFAULT_ALPHA,
    min_calibration_rows,
    smallest_p_value,
)
from flow.detectors.registry import PRIMARY_SCORES, detector_class
from flow.detectors.sanf import FlowDetector, flow_method
from flow.detectors.transforms import (
    AUTO,
    FITTED,
    PAPER_FEATURES,
    FeatureTransform,
    resolve_features,
)
from flow.experiments.config import FitConfig
from flow.model.sanf import FlowConfig, count_flops, parameter_count
from flow.store.run_folder import (
    CALIBRATION_FILE,
    RUN_FORMAT,
    RUN_VERSION,
    TRANSFORM_FILE,
    RunError,
    RunLock,
    calibration_text,
    check_writable_dir,
    load_feature_transform,
    read_run_record,
    run_name,
    save_run,
)


def resolve_normal(spec: str | int, class_names: Sequence[str]) -> list[int]:
    """Turn ``--normal`` into class indices.

    A class name matches first (so a folder class named ``3`` or ``all`` is chosen by its name), then
    ``all``, then an index.

    Args:
        spec: a class name, ``"all"``, or a class index (int or digit string).
        class_names: the cache's class names.

    Returns:
        Sorted class indices.

    Raises:
        ValueError: no such name and not a valid index; the message lists the allowed values.
    """
    text = str(spec)
    if text in class_names:
        return [list(class_names).index(text)]
    text = text.strip()
    if text == "all":
        return list(range(len(class_names)))
    if re.fullmatch(r"[0-9]+", text) and int(text) < len(class_names):
        return [int(text)]
    raise ValueError(f"--normal must be 'all', an index 0..{len(class_names) - 1} or one of "
                     f"{', '.join(class_names)}; got {str(spec)!r}")


#: The default cache folder before it was renamed caches/ (it is also the name of the package folder cache/).
OLD_CACHE_DIR = "cache"


def find_cache(cache: str | os.PathLike | None, cache_dir: str | os.PathLike) -> Path:
    """The cache file to use: ``cache`` when given, else the only ``*.h5`` in ``cache_dir``.

    Raises:
        ValueError: no cache given and ``cache_dir`` holds none or several. Several are listed on one line, each
            with what tells it apart from the others (:func:`describe_caches`); when it holds only the work folder
            of an extraction, the message says whether that extraction is running (the pid holding its lock) or
            was interrupted.
    """
    if cache is not None:
        return Path(cache)
    found = sorted(Path(cache_dir).glob("*.h5"))
    if len(found) == 1:
        return found[0]
    if not found:
        unfinished = sorted(Path(cache_dir).glob(f"*.h5{PARTIAL_SUFFIX}"))
        if unfinished:
            cache = unfinished[0].with_name(unfinished[0].name[:-len(PARTIAL_SUFFIX)])
            holder = lock_holder(cache)
            if holder is not None:
                raise ValueError(f"no complete cache in --cache-dir {cache_dir} yet: {cache.name} is being written by "
                                 f"pid {holder}; wait for its extraction to finish")
            raise ValueError(f"no complete cache in --cache-dir {cache_dir}, only an interrupted extraction "
                             f"({unfinished[0].name}); run the same extract command again to resume it")
        old = "" if Path(cache_dir) == Path(OLD_CACHE_DIR) or not list(Path(OLD_CACHE_DIR).glob("*.h5")) else (
            f" ({OLD_CACHE_DIR}/ holds caches: the default folder before it became caches/; pass --cache-dir "
            f"{OLD_CACHE_DIR} or move them)")
        raise ValueError(f"no cache (*.h5) in --cache-dir {cache_dir}; run 'extract' first or pass --cache{old}")
    raise ValueError(f"--cache-dir {cache_dir} holds {len(found)} caches; pass --cache with one of: "
                     + ", ".join(describe_caches(found)))


#: The root attributes that tell caches apart, in the order shown, with their labels.
CACHE_DIFFERENCES = (("dataset", "dataset"), ("backbone", "backbone"), ("input_size", "img size"),
                     ("patch_grid", "patch grid"), ("data_source", "data source"), ("layer", "layer"),
                     ("dtype", "dtype"), ("precision", "precision"), ("weights_source", "weights"))


def describe_caches(paths: Sequence[Path]) -> list[str]:
    """One ``"<path> (<what differs>)"`` per cache file: the :data:`CACHE_DIFFERENCES` attributes whose values are
    not the same in every readable cache (when none are, the other root attributes that differ, e.g.
    ``created``), read from the root attributes alone (:func:`cache.read_root_attrs`: no array is read). A file
    whose attributes cannot be read is ``"<path> (unreadable: <reason>)"``.
    """
    attrs: dict[Path, dict] = {}
    reasons: dict[Path, str] = {}
    for path in paths:
        try:
            attrs[path] = read_root_attrs(path)
        except CacheError as err:
            reasons[path] = str(err).removeprefix(f"{path}: ")
    labels = dict(CACHE_DIFFERENCES)

    def differing(keys) -> list[str]:
        return [k for k in keys if len({json.dumps(a.get(k), sort_keys=True) for a in attrs.values()}) > 1]

    keys = differing(labels) or differing(sorted({k for a in attrs.values() for k in a}))
    out = []
    for path in paths:
        if path in reasons:
            out.append(f"{path} (unreadable: {reasons[path]})")
            continue
        shown = [f"{labels.get(k, k)} {_attr_text(k, attrs[path].get(k))}" for k in keys]
        out.append(f"{path} ({', '.join(shown) if shown else 'the same attributes as another'})")
    return out


def _attr_text(key: str, value) -> str:
    """A root attribute as :func:`describe_caches` shows it: ``224 px`` for input_size, ``8x8`` for a grid."""
    if value is None:
        return "-"
    if key == "input_size" and isinstance(value, list) and len(value) == 3:
        return f"{value[1]} px" if value[1] == value[2] else f"{value[1]}x{value[2]} px"
    if key.endswith("_grid") and isinstance(value, list):
        return "x".join(str(v) for v in value)
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


@dataclass
class FitOutcome:
    """One fitted run: where it was saved, its record (the content of ``run.json``), and whether it was kept
    (``keep_existing``: a run fitted before with the same settings, not fitted again; its record, its
    ``wall_time_s`` included, is the earlier fit's)."""

    path: Path
    record: dict
    kept: bool = False


def fit_cache(cache: str | os.PathLike, config: FitConfig = FitConfig(), runs_dir: str | os.PathLike = "runs",
              device: str = "auto", progress: bool = True, log: Callable[[str], None] = print, setting: str = "",
              keep_existing: bool = False, overwrite: bool = False) -> list[FitOutcome]:
    """Fit one detector per normal class on the train split of a cache and save each as a run folder.

    Only the train rows of the normal class are read from the file (not the whole cache). The feature transform's
    statistics are fitted on the rows the detector is fitted on (held-out rows excluded) and stored with the run,
    which records the transform ``auto`` resolved to (:func:`flow.detectors.transforms.resolve_features`).

    Args:
        cache: the ``.h5`` feature cache.
        config: what to fit (:class:`~flow.experiments.config.FitConfig`: normal class, method, transform,
            held-out fraction, seed, and the flows' shape and training).
        runs_dir: folder that receives one run folder per fitted detector.
        device: ``auto``, ``cpu`` or ``cuda`` (the flows' training).
        progress: show progress bars.
        log: where to print one line per fitted class.
        setting: a label for a sweep's flow setting (see :func:`flow_setting`); it goes into the run's name
            and record and labels its rows, so that the runs of a sweep do not replace each other.
        keep_existing: keep (do not fit again) a class whose run folder already holds a run of the same
            cache content and settings (what makes an interrupted sweep resume).
        overwrite: replace a run folder that holds a run fitted with other settings (refused otherwise: a fitted,
            maybe deployed, model is not lost by accident). A run of the same settings is always fitted again.

    Returns:
        One :class:`FitOutcome` per normal class, in class order.

    Raises:
        CacheError: the cache is unreadable or invalid.
        ValueError: a bad ``normal``, a normal class without (enough) train rows.
        RunError: a run folder in the way holds a run of other settings (without ``overwrite``), is not a run
            folder, or is being written by another process.
        FlowTrainingError: training diverged.
    """
    features = config.transform
    if features == AUTO:
        with FeatureCache(cache) as fc:  # the choice depends on what the cache holds
            features = resolve_features(features, fc.attrs)
        kind = "a CNN's final features" if features != PAPER_FEATURES else "not a CNN's final features"
        log = _said_first(log, f"--transform auto: {features} ({kind}; --transform raw is the paper's setting)")
    setting = run_setting(setting, features)
    dev = resolve_device(device)
    runs_dir = Path(runs_dir)
    outcomes = []
    with _open_for_fit(cache, config.normal, runs_dir) as (fc, classes, fingerprint):
        flow_config = config.flow_config(int(fc.attrs["feature_dim"])) if config.is_flow else None
        size = _flow_size(flow_config, int(fc.attrs["num_patches"]), log) if config.is_flow else {}
        names = _check_slots(fc, cache, config, classes, runs_dir, setting, features)
        settings_of = {k: _settings(config, k, setting, features, fingerprint, flow_config) for k in classes}
        for k in classes:  # every class's run folder before the first fit, not after some of them
            _check_replace(runs_dir / names[k], settings_of[k], overwrite)
        for k in classes:
            path = runs_dir / names[k]
            settings = settings_of[k]
            kept = keep_existing and _kept_run(path, settings, log)
            if kept:
                outcomes.append(kept)
                continue
            with RunLock(path):
                _check_replace(path, settings, overwrite)
                outcomes.append(_fit_one(fc, cache, config, k, path, settings, features, fingerprint, flow_config,
                                         size, dev, progress, log))
    return outcomes


def _flow_size(flow_config: FlowConfig, num_patches: int, log: Callable[[str], None]) -> dict:
    """The flow's parameter count and FLOPs (logged, and recorded in every run.json); refuses a flow too large for
    this machine's memory before anything is allocated."""
    n_params = parameter_count(flow_config)
    check_training_memory(n_params)
    flops = count_flops(flow_config, num_patches)
    flops_written = count_flops(flow_config, num_patches, as_written=True)
    log(f"flow: {flow_method(flow_config.use_caff)}, D={flow_config.dim}, P={num_patches}, "
        f"K={flow_config.num_blocks}, H={flow_config.hidden}, heads={flow_config.num_heads}, "
        f"clamp={flow_config.clamp}: {n_params:,} trainable parameters, {flops / 1e9:.3f} GFLOPs per sample "
        f"(forward; {flops_written / 1e9:.3f} with the class attention as the paper prints it, docs/method.md "
        f"eq. (14)-(16))")
    # the paper's count (Table 6: class attention as docs/method.md eq. (14)-(16) print it), and what this code computes
    return {"num_parameters": n_params, "gflops_per_sample": round(flops_written / 1e9, 6),
            "gflops_per_sample_computed": round(flops / 1e9, 6)}


def _settings(config: FitConfig, k: int, setting: str, features: str, fingerprint: str,
              flow_config: FlowConfig | None) -> dict:
    """The entries of run.json that say what was fitted: a run with the same ones is the same fit."""
    head = {"method": config.method, "normal_class": k, "seed": config.seed, "setting": setting}
    if flow_config is not None:
        what = {"flow": flow_config.to_dict(), "train": config.train_config().to_dict()}
    else:
        what = {"params": detector_class(config.method)(**config.detector_params()).params()}
    return {**head, **what, "val_fraction": config.val_fraction, "feature_transform": features,
            "cache_fingerprint": fingerprint}


def _check_replace(path: Path, settings: dict, overwrite: bool) -> None:
    """Refuse to replace the run at ``path`` when it was fitted with other settings, unless ``overwrite``.

    Raises:
        RunError: names the run folder, the first setting that differs (old and new values) and ``--overwrite``.
    """
    if overwrite or not (path / "run.json").is_file():
        return
    try:
        record = read_run_record(path)
    except RunError:
        return  # a damaged run is replaced, as before
    absent = {"setting": "", "feature_transform": PAPER_FEATURES}  # records written before these keys
    for key, value in settings.items():
        old, new = _jsonable(record.get(key, absent.get(key))), _jsonable(value)
        if old == new:
            continue
        what, old_v, new_v = key, old, new
        if isinstance(new, dict) and isinstance(old, dict):  # name the field that differs: train.epochs 2, now 5
            field = next(f for f in sorted(set(old) | set(new)) if old.get(f) != new.get(f))
            what, old_v, new_v = f"{key}.{field}", old.get(field), new.get(field)
        old_v, new_v = ("not set" if v is None else v for v in (old_v, new_v))
        differs = (f"{_SETTING_OPTIONS.get(what, what)} {old_v}, now {new_v}" if key != "cache_fingerprint" else
                   "another cache content: fitted on another extraction")
        raise RunError(f"the run folder {path} holds a run fitted with other settings ({differs}); pass --overwrite "
                       "to replace it, or choose another --runs-dir")


#: The option that sets each entry of run.json, for messages.
_SETTING_OPTIONS = {"method": "--method", "normal_class": "--normal", "seed": "--seed", "setting": "the sweep setting",
                    "val_fraction": "--val-fraction", "feature_transform": "--transform", "flow.num_blocks": "--blocks",
                    "flow.hidden": "--hidden", "flow.num_heads": "--heads", "flow.alpha": "--clamp",
                    "flow.use_caff": "--method", "flow.dim": "the tokens' width D", "train.epochs": "--epochs",
                    "train.steps": "--steps", "train.early_stop": "--early-stop", "train.batch_size": "--batch-size",
                    "train.lr": "--lr", "train.betas": "--beta1/--beta2", "train.eps": "--adam-eps",
                    "train.weight_decay": "--weight-decay", "params.k": "--k"}


def _jsonable(value):
    """``value`` as it reads back from JSON (tuples become lists), for comparing settings with a run.json."""
    return json.loads(json.dumps(value))


def _fit_one(fc: FeatureCache, cache, config: FitConfig, k: int, path: Path, settings: dict, features: str,
             fingerprint: str, flow_config: FlowConfig | None, size: dict, dev, progress: bool,
             log: Callable[[str], None]) -> FitOutcome:
    """Fit the detector of normal class ``k`` and save its run folder at ``path``."""
    train = fc.split("train")
    rows = train.rows_of_class(k)
    cls, patches = (torch.from_numpy(a) for a in train.read(rows))
    fit_idx, val_idx = split_holdout(rows.size, config.val_fraction, config.seed)
    start = time.perf_counter()
    transform = FeatureTransform(features).fit(cls[fit_idx])  # the fitted rows only, never held-out ones
    if flow_config is not None:
        detector = FlowDetector(flow_config, config.train_config(), seed=config.seed, device=dev, progress=progress)
    else:
        detector = detector_class(config.method)(**config.detector_params())
    uses_patches = detector.uses_patches
    fit_cls, fit_patches = transform(cls[fit_idx]), transform(patches[fit_idx]) if uses_patches else None
    val_cls = transform(cls[val_idx]) if len(val_idx) else None
    val_patches = transform(patches[val_idx]) if len(val_idx) and uses_patches else None
    if path.exists():
        log(f"replacing the existing run {path}")
    detector.fit(fit_cls, fit_patches, val_cls, val_patches)
    elapsed = time.perf_counter() - start
    files, calibration = {}, {}
    if val_cls is not None:
        held_out = detector.scores(val_cls, val_patches)
        files, calibration = _calibration(train, rows[val_idx.numpy()], held_out, config.val_fraction, config.seed,
                                          log)
    if transform.state():
        files[TRANSFORM_FILE] = transform.state()
    head = {"format": RUN_FORMAT, "format_version": RUN_VERSION, "method": config.method,
            "dataset": fc.attrs["dataset"], "backbone": fc.attrs["backbone"], "normal_class": k,
            "normal_name": fc.class_names[k], "seed": config.seed, "setting": settings["setting"],
            "feature_transform": features}
    tail = {"primary_score": PRIMARY_SCORES[config.method], **calibration, "features": provenance(fc.attrs),
            "cache": str(Path(cache).resolve()), "cache_fingerprint": fingerprint, "torch_version": torch.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    name = f"{config.method} for normal class {k} ({fc.class_names[k]})"
    if flow_config is not None:
        result = detector.result
        fit = detector.fit_record()
        record = {**head, "flow": settings["flow"], "train": settings["train"],
                  "train_loss_unit": "nats per dimension (docs/method.md eq. (23): the paper's loss divided by D, "
                                     "without the (D/2) log 2pi term)",
                  **{key: fit[key] for key in ("epochs", "steps", "stopped_early", "epoch_losses", "final_train_loss")},
                  "val_fraction": config.val_fraction, "val_losses": fit["val_losses"],
                  "num_train": int(fit_idx.numel()), "num_val": int(val_idx.numel()), **size,
                  "wall_time_s": fit["wall_time_s"], "device": str(dev), **tail}
        val_note = f", held-out loss {result.val_losses[-1]:.4f}" if result.val_losses else ""
        epochs = config.train_config().describe(int(fit_idx.numel()))
        if result.stopped_early:
            epochs = (f"stopped early after {len(result.epoch_losses)} epochs (train loss below the held-out "
                      f"loss; at most {epochs})")
        line = (f"fitted normal class {k} ({fc.class_names[k]}): {fit_idx.numel()} train rows"
                f"{_features_note(features)}, {epochs}, final loss {result.final_loss:.4f} nats/dim{val_note}, "
                f"{result.wall_time_s:.1f} s")
    else:
        record = {**head, "params": detector.params(), "scores": list(detector.score_names),
                  "num_train": int(fit_idx.numel()), "val_fraction": config.val_fraction,
                  "num_val": int(val_idx.numel()), "wall_time_s": round(elapsed, 3), **tail}
        held = f", {val_idx.numel()} held out for calibration" if val_idx.numel() else ""
        line = (f"fitted {name}: {fit_idx.numel()} train rows{_features_note(features)}{held}, {elapsed:.1f} s")
    saved = save_run(path.parent, path.name, detector.state(), record, files)
    log(f"{line} -> {saved}")
    return FitOutcome(saved, record)


@contextlib.contextmanager
def _open_for_fit(cache, normal, runs_dir: Path):
    """Open the cache and yield ``(cache, normal class indices, fingerprint)`` once ``--normal`` is resolved and
    ``runs_dir`` is known to be writable (what every method checks before it fits)."""
    with FeatureCache(cache) as fc:
        classes = normal_classes(fc, normal)
        created = not runs_dir.exists()
        check_writable_dir(runs_dir, "--runs-dir")
        try:
            yield fc, classes, fc.fingerprint()
        except BaseException:
            if created:  # a refused or failed fit leaves no empty --runs-dir behind
                with contextlib.suppress(OSError):
                    runs_dir.rmdir()  # only when empty
            raise


def normal_classes(fc: FeatureCache, normal: str | int) -> list[int]:
    """The class indices ``--normal`` asks for in the open cache ``fc``: ``all`` is every class that can be
    normal (good/defect layouts: only ``good``), otherwise as :func:`resolve_normal`.

    Raises:
        ValueError: a bad ``normal``, or a class that cannot be normal (a defect type).
    """
    classes = resolve_normal(normal, fc.class_names)
    allowed = [fc.class_names.index(c) for c in fc.normal_classes]
    if str(normal) not in fc.class_names and str(normal).strip() == "all":
        classes = allowed  # every class that can be normal (good/defect layouts: only 'good')
    refused = [fc.class_names[k] for k in classes if k not in allowed]
    if refused:
        raise ValueError(f"--normal {refused[0]!r}: only {', '.join(fc.normal_classes)} can be the normal class "
                         "of this cache (the other classes are defect types)")
    return classes


def _check_slots(fc: FeatureCache, cache, config: FitConfig, classes: list[int], runs_dir: Path,
                 setting: str = "", features: str = PAPER_FEATURES) -> dict[int, str]:
    """Run names per class; refuses, before anything is fitted, a class without train rows, with fewer rows left
    after holding out than a transform's statistics (2) or the detector (:meth:`min_train_rows`) need, or a run
    slot taken by something that is not a run."""
    method, seed, val_fraction = config.method, config.seed, config.val_fraction
    names = {k: run_name(Path(cache).stem, method, k, fc.class_names[k], seed, setting) for k in classes}
    train = fc.split("train")
    need = 1 if config.is_flow else detector_class(method)(**config.detector_params()).min_train_rows()
    for k in classes:
        n = train.rows_of_class(k).size
        if n == 0:
            raise ValueError(f"--normal {fc.class_names[k]!r}: the train split has no rows of this class")
        n_fit = n - int(split_holdout(n, val_fraction, seed)[1].numel())
        if features in FITTED and n_fit < 2:
            raise ValueError(f"--transform {features} needs at least 2 train rows to fit its statistics on; normal "
                             f"class {fc.class_names[k]!r} has {n}" + (" before holding out" if val_fraction else ""))
        if n_fit < need:
            kept = f", {n_fit} after --val-fraction {val_fraction} holds out {n - n_fit}" if val_fraction else ""
            advice = "; lower --val-fraction" if val_fraction and n >= need else ""
            raise ValueError(f"--method {method} needs at least {need} train rows; normal class "
                             f"{fc.class_names[k]!r} has {n}{kept}{advice}")
        blocked = runs_dir / names[k]
        if os.path.lexists(blocked) and not (blocked / "run.json").is_file():
            raise RunError(f"{blocked} exists and is not a run folder; move it away")
    return names


def check_fit(cache: str | os.PathLike, config: FitConfig, runs_dir: str | os.PathLike, setting: str = "",
              overwrite: bool = False) -> None:
    """Refuse, without fitting anything, what :func:`fit_cache` with these arguments would refuse before its first
    fit: a bad ``normal``, too few train rows for the method once ``val_fraction`` is held out, a run slot taken by
    something that is not a run, or (without ``overwrite``) by a run fitted with other settings. A sweep checks
    every fit first, so that it does not stop after hours of fits.

    Raises:
        ValueError, RunError, CacheError: as :func:`fit_cache`.
    """
    runs_dir = Path(runs_dir)
    with FeatureCache(cache) as fc:
        resolved = resolve_features(config.transform, fc.attrs)  # auto -> the cache's choice, others unchanged
        classes = normal_classes(fc, config.normal)
        setting = run_setting(setting, resolved)
        names = _check_slots(fc, cache, config, classes, runs_dir, setting, resolved)
        taken = [k for k in classes if (runs_dir / names[k] / "run.json").is_file()]
        if taken and not overwrite:  # the cache's fingerprint is read only when a run is in the way
            fingerprint = fc.fingerprint()
            flow_config = config.flow_config(int(fc.attrs["feature_dim"])) if config.is_flow else None
            for k in taken:
                _check_replace(runs_dir / names[k], _settings(config, k, setting, resolved, fingerprint,
                                                              flow_config), overwrite)


def _kept_run(path: Path, expected: dict, log: Callable[[str], None]) -> FitOutcome | None:
    """The run at ``path`` when its record holds ``expected`` (compared as JSON) and its weights file exists."""
    try:
        record = read_run_record(path)
    except RunError:
        return None
    absent = {"setting": "", "feature_transform": PAPER_FEATURES}  # records written before these keys
    same = all(json.dumps(record.get(key, absent.get(key)), sort_keys=True)
               == json.dumps(value, sort_keys=True) for key, value in expected.items())
    if not same or not (path / "model.safetensors").is_file():
        return None
    try:
        load_feature_transform(path, record)  # its fitted statistics must be there too
    except RunError:
        return None
    log(f"kept {path}: fitted before with the same cache, method, seed and settings")
    return FitOutcome(path, record, kept=True)


def _calibration(train, rows: np.ndarray, scores: dict[str, np.ndarray], val_fraction: float,
                 seed: int, log: Callable[[str], None] = print) -> tuple[dict[str, str], dict]:
    """The calibration file of a run and its entry in run.json, from the scores of its held-out normal train rows
    (``rows``: indices into the cache's train split)."""
    if smallest_p_value(len(rows)) > DEFAULT_ALPHA:
        log(f"note: {len(rows)} held-out row{'s' if len(rows) != 1 else ''}: no p-value can be <= {DEFAULT_ALPHA} "
            f"(the smallest is 1/{len(rows) + 1}); hold out at least {min_calibration_rows(DEFAULT_ALPHA)} rows to "
            f"flag anything at alpha {DEFAULT_ALPHA}")
    ids = train.sample_ids
    text = calibration_text(rows, [ids[r] for r in rows], scores)
    entry = {"file": CALIBRATION_FILE, "num_rows": int(len(rows)),
             "source": f"normal train rows held out of fitting (val_fraction {val_fraction}, chosen by seed {seed})"}
    return {CALIBRATION_FILE: text}, {"calibration": entry}


def check_training_memory(num_parameters: int) -> None:
    """Refuse a flow whose weights, gradients and two Adam moments (4 x 4 bytes per parameter) exceed this
    machine's physical memory, before anything is allocated.

    Raises:
        ValueError: it cannot fit; the message gives both sizes and what to lower.
    """
    need = 16 * num_parameters
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not available on this platform: no check
        return
    if need > total:
        raise ValueError(f"the flow has {num_parameters:,} parameters: {need / 2**30:.1f} GiB with gradients and "
                         f"Adam state, more than this machine's {total / 2**30:.1f} GiB; lower --hidden or --blocks")


def flow_setting(num_blocks: int, hidden: int) -> str:
    """``"K<K>-H<H>"``: the label of a sweep's runs and rows."""
    return f"K{num_blocks}-H{hidden}"


def run_setting(setting: str, features: str) -> str:
    """A run's setting label: a sweep's flow setting (:func:`flow_setting`) and, unless ``raw``, the feature
    transform (``K2-H1024-ssqrt-l2``, ``ssqrt-l2``); empty for the paper's setting."""
    return "-".join(part for part in (setting, "" if features == "raw" else features) if part)


def _said_first(log: Callable[[str], None], line: str) -> Callable[[str], None]:
    """``log`` that prints ``line`` before its first line (so nothing is said before the arguments are checked)."""
    pending = [line]

    def wrapped(message: str) -> None:
        while pending:
            log(pending.pop())
        log(message)

    return wrapped


def _features_note(features: str) -> str:
    return "" if features == "raw" else f" ({features} features)"


def split_holdout(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``range(n)`` into (fit, held-out) index tensors; ``round(fraction * n)`` held out, chosen by ``seed``.

    Raises:
        ValueError: ``fraction`` outside [0, 1) or leaving no row to fit on.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1); got {fraction}")
    n_val = int(round(fraction * n))
    if fraction > 0 and n_val == 0:
        raise ValueError(f"--val-fraction {fraction} holds out 0 of {n} rows; raise it (or pass 0 to hold out none)")
    if n_val >= n:
        raise ValueError(f"--val-fraction {fraction} leaves no training rows of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1_000_003))
    return order[n_val:].sort().values, order[:n_val].sort().values
