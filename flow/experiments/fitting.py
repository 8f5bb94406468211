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
from flow.detectors.registry import BASELINES, FLOW_METHODS, METHODS, PRIMARY_SCORES
from flow.detectors.sanf import FlowDetector, flow_method
from flow.detectors.transforms import (
    AUTO,
    DEFAULT_FEATURES,
    FITTED,
    PAPER_FEATURES,
    FeatureTransform,
    check_features,
    resolve_features,
)
from flow.model.sanf import FlowConfig, count_flops, parameter_count
from flow.model.train import TrainConfig
from flow.store.run_folder import (
    CALIBRATION_FILE,
    RUN_FORMAT,
    RUN_VERSION,
    TRANSFORM_FILE,
    RunError,
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
        raise ValueError(f"no cache (*.h5) in --cache-dir {cache_dir}; run 'extract' first or pass --cache")
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


def fit_cache(cache: str | os.PathLike, normal: str | int = "all", runs_dir: str | os.PathLike = "runs",
              seed: int = 0, flow_config: dict | None = None, train_config: TrainConfig = TrainConfig(),
              device: str = "auto", val_fraction: float = 0.0, progress: bool = True,
              log: Callable[[str], None] = print, method: str | None = None,
              baseline_params: dict | None = None, setting: str = "", keep_existing: bool = False,
              features: str = DEFAULT_FEATURES) -> list[FitOutcome]:
    """Fit one detector per normal class on the train split of a cache and save each as a run.

    ``method`` is ``sanf`` (the CAFF flow), ``sanf-nocaff`` (MLP-only subnets; also chosen by
    ``flow_config["use_caff"] = False``), or a baseline of :mod:`flow.detectors.knn` and :mod:`flow.detectors.gaussian` (``knn``, ``gaussian``),
    which reads only the class tokens and ignores the flow and training settings.

    Only the train rows of the normal class are read from the file (not the whole cache).

    Args:
        cache: the ``.h5`` feature cache.
        normal: ``"all"``, a class index or a class name (see :func:`resolve_normal`).
        runs_dir: folder that receives one run folder per fitted model.
        seed: initialisation and batch-order seed.
        flow_config: FlowConfig fields other than ``dim`` (taken from the cache).
        train_config: optimisation settings.
        device: ``auto``, ``cpu`` or ``cuda``.
        val_fraction: hold out this fraction of the normal class's train rows (chosen by ``seed``) and
            record the loss on them after every epoch; the flow is trained on the rest. 0 trains on all.
        progress: show progress bars.
        log: where to print one line per fitted class.
        method: see above; default ``sanf`` (or ``sanf-nocaff`` per ``flow_config``).
        baseline_params: keyword arguments of the baseline's constructor (e.g. ``{"k": 2}`` for ``knn``).
        setting: a label for a sweep's flow setting (see :func:`flow_setting`); it goes into the run's name
            and record and labels its rows, so that the runs of a sweep do not replace each other.
        keep_existing: keep (do not fit again) a class whose run folder already holds a run of the same
            cache content, method, normal class, seed and settings (what makes an interrupted ``run`` resume);
            any other run in its place is replaced as usual.
        features: the feature transform of :mod:`flow.detectors.transforms` applied to class and patch tokens before the
            detector (``raw``: none, the paper's; ``auto``, the default: ``ssqrt-l2`` on a CNN's final features,
            ``raw`` otherwise, see :func:`flow.detectors.transforms.resolve_features`); its statistics are fitted on the rows
            the detector is fitted on (held-out rows excluded) and stored with the run, which records the
            transform ``auto`` resolved to. A transform other than ``raw`` is part of the run's setting label, so
            runs of different transforms do not replace each other.

    Returns:
        One :class:`FitOutcome` per normal class, in class order.

    Raises:
        CacheError: the cache is unreadable or invalid.
        ValueError: a bad ``normal`` or a normal class without train rows.
        FlowTrainingError: training diverged.
    """
    flow_config = dict(flow_config or {})
    check_features(features, allow_auto=True)
    if method is None:
        method = flow_method(flow_config.get("use_caff", True))
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}; got {method!r}")
    if method in FLOW_METHODS:
        train_config.check_held_out(val_fraction > 0)  # before the cache is read
    if features == AUTO:
        with FeatureCache(cache) as fc:  # the choice depends on what the cache holds
            features = resolve_features(features, fc.attrs)
        kind = "a CNN's final features" if features != PAPER_FEATURES else "not a CNN's final features"
        log = _said_first(log, f"--features auto: {features} ({kind}; --features raw is the paper's setting)")
    setting = run_setting(setting, features)
    if method in BASELINES:
        return _fit_baseline(cache, method, normal, runs_dir, seed, baseline_params or {}, log, keep_existing,
                             val_fraction, features, setting)
    if "use_caff" in flow_config and flow_method(flow_config["use_caff"]) != method:
        raise ValueError(f"--method {method} contradicts --no-caff={not flow_config['use_caff']}")
    flow_config["use_caff"] = method == "sanf"
    dev = resolve_device(device)
    runs_dir = Path(runs_dir)
    outcomes = []
    with _open_for_fit(cache, normal, runs_dir) as (fc, classes, fingerprint):
        train = fc.split("train")
        config = FlowConfig(dim=int(fc.attrs["feature_dim"]), **flow_config)
        n_params = parameter_count(config)
        check_training_memory(n_params)
        flops = count_flops(config, int(fc.attrs["num_patches"]))
        flops_written = count_flops(config, int(fc.attrs["num_patches"]), as_written=True)
        log(f"flow: {flow_method(config.use_caff)}, D={config.dim}, P={fc.attrs['num_patches']}, "
            f"K={config.num_blocks}, H={config.hidden}, heads={config.num_heads}, alpha={config.alpha}: "
            f"{n_params:,} trainable parameters, {flops / 1e9:.3f} GFLOPs per sample (forward; "
            f"{flops_written / 1e9:.3f} with the class attention as the paper prints it, docs/method.md eq. (14)-(16))")
        names = _check_slots(fc, cache, method, classes, runs_dir, seed, setting, features, val_fraction)
        for k in classes:
            kept = keep_existing and _kept_run(runs_dir / names[k], {
                "method": method, "normal_class": k, "seed": seed, "setting": setting, "flow": config.to_dict(),
                "train": train_config.to_dict(), "val_fraction": val_fraction, "feature_transform": features,
                "cache_fingerprint": fingerprint}, log)
            if kept:
                outcomes.append(kept)
                continue
            rows = train.rows_of_class(k)
            cls_np, patches_np = train.read(rows)
            cls_t = torch.from_numpy(cls_np)
            patches_t = torch.from_numpy(patches_np) if config.use_caff else None
            fit_idx, val_idx = split_holdout(rows.size, val_fraction, seed)
            val_cls = val_patches = None
            if val_idx.numel():
                val_cls, cls_t = cls_t[val_idx], cls_t[fit_idx]
                if patches_t is not None:
                    val_patches, patches_t = patches_t[val_idx], patches_t[fit_idx]
            transform = FeatureTransform(features).fit(cls_t.numpy())  # the fitted rows only, never held-out ones
            cls_t, patches_t, val_cls, val_patches = (None if t is None else transform(t)
                                                      for t in (cls_t, patches_t, val_cls, val_patches))
            name = names[k]
            if (runs_dir / name).exists():
                log(f"replacing the existing run {runs_dir / name}")
            detector = FlowDetector(config, train_config, seed=seed, device=dev, progress=progress)
            result = detector.fit(cls_t, patches_t, val_cls, val_patches).result
            files, calibration = {}, {}
            if val_cls is not None:
                held_out = detector.scores(val_cls, val_patches)
                files, calibration = _calibration(train, rows[val_idx.numpy()], held_out, val_fraction, seed, log)
            if transform.state():
                files[TRANSFORM_FILE] = transform.state()
            record = {
                **_record_head(fc, method, k, seed),
                "setting": setting,
                "feature_transform": features,
                "flow": config.to_dict(),
                "train": train_config.to_dict(),
                "train_loss_unit": "nats per dimension (docs/method.md eq. (23): the paper's loss divided by D, without the (D/2) log 2pi term)",
                "epochs": len(result.epoch_losses),  # passes made (the last one partial when --steps cut it)
                "steps": result.num_steps,
                "stopped_early": result.stopped_early,
                "epoch_losses": result.epoch_losses,
                "final_train_loss": result.final_loss,
                "val_fraction": val_fraction,
                "val_losses": result.val_losses,
                "num_train": int(cls_t.shape[0]),
                "num_val": int(val_idx.numel()),
                "num_parameters": n_params,
                # the paper's count (Table 6: class attention as docs/method.md eq. (14)-(16) print it), and what this code computes
                "gflops_per_sample": round(flops_written / 1e9, 6),
                "gflops_per_sample_computed": round(flops / 1e9, 6),
                "wall_time_s": round(result.wall_time_s, 3),
                "device": str(dev),
                "primary_score": PRIMARY_SCORES[method],
                **calibration,
                **_record_tail(fc, cache, fingerprint),
            }
            path = save_run(runs_dir, name, detector.state(), record, files)
            val_note = f", held-out loss {result.val_losses[-1]:.4f}" if result.val_losses else ""
            epochs = train_config.describe(int(cls_t.shape[0]))
            if result.stopped_early:
                epochs = (f"stopped early after {len(result.epoch_losses)} epochs (train loss below the held-out "
                          f"loss; at most {epochs})")
            log(f"fitted normal class {k} ({fc.class_names[k]}): {cls_t.shape[0]} train rows"
                f"{_features_note(features)}, "
                f"{epochs}, "
                f"final loss {result.final_loss:.4f} nats/dim{val_note}, {result.wall_time_s:.1f} s -> {path}")
            outcomes.append(FitOutcome(path, record))
    return outcomes


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


def _check_slots(fc: FeatureCache, cache, method: str, classes: list[int], runs_dir: Path,
                 seed: int, setting: str = "", features: str = PAPER_FEATURES,
                 val_fraction: float = 0.0, baseline_params: dict | None = None) -> dict[int, str]:
    """Run names per class; refuses, before anything is fitted, a class without train rows, with fewer rows left
    after holding out than a transform's statistics (2) or the baseline (:meth:`min_train_rows`) need, or a run
    slot taken by something that is not a run."""
    names = {k: run_name(Path(cache).stem, method, k, fc.class_names[k], seed, setting) for k in classes}
    train = fc.split("train")
    for k in classes:
        n = train.rows_of_class(k).size
        if n == 0:
            raise ValueError(f"--normal {fc.class_names[k]!r}: the train split has no rows of this class")
        n_fit = n - int(split_holdout(n, val_fraction, seed)[1].numel())
        if features in FITTED and n_fit < 2:
            raise ValueError(f"--features {features} needs at least 2 train rows to fit its statistics on; normal "
                             f"class {fc.class_names[k]!r} has {n}" + (" before holding out" if val_fraction else ""))
        need = BASELINES[method](**(baseline_params or {})).min_train_rows() if method in BASELINES else 1
        if n_fit < need:
            kept = f", {n_fit} after --val-fraction {val_fraction} holds out {n - n_fit}" if val_fraction else ""
            advice = "; lower --val-fraction" if val_fraction and n >= need else ""
            raise ValueError(f"--method {method} needs at least {need} train rows; normal class "
                             f"{fc.class_names[k]!r} has {n}{kept}{advice}")
        blocked = runs_dir / names[k]
        if os.path.lexists(blocked) and not (blocked / "run.json").is_file():
            raise RunError(f"{blocked} exists and is not a run folder; move it away")
    return names


def check_fit(cache: str | os.PathLike, normal: str | int, runs_dir: str | os.PathLike, seed: int, method: str,
              features: str = DEFAULT_FEATURES, val_fraction: float = 0.0, baseline_params: dict | None = None,
              setting: str = "") -> None:
    """Refuse, without fitting anything, what :func:`fit_cache` with these arguments would refuse before its first
    fit: a bad ``normal``, too few train rows for the method once ``val_fraction`` is held out, a run slot taken by
    something that is not a run. A sweep checks every fit first, so that it does not stop after hours of fits.

    Raises:
        ValueError, RunError, CacheError: as :func:`fit_cache`.
    """
    with FeatureCache(cache) as fc:
        resolved = resolve_features(features, fc.attrs)  # auto -> the cache's choice, others unchanged
        classes = normal_classes(fc, normal)
        _check_slots(fc, cache, method, classes, Path(runs_dir), seed, run_setting(setting, resolved), resolved,
                     val_fraction, baseline_params)


def _record_head(fc: FeatureCache, method: str, k: int, seed: int) -> dict:
    return {"format": RUN_FORMAT, "format_version": RUN_VERSION, "method": method, "dataset": fc.attrs["dataset"],
            "backbone": fc.attrs["backbone"], "normal_class": k, "normal_name": fc.class_names[k], "seed": seed}


def _record_tail(fc: FeatureCache, cache, fingerprint: str) -> dict:
    """The end of every run.json: how the features were computed (the cache's provenance, so the run can be used
    on new images without its cache), the cache and its fingerprint, versions and time."""
    return {"features": provenance(fc.attrs), "cache": str(Path(cache).resolve()), "cache_fingerprint": fingerprint,
            "torch_version": torch.__version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


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
    log(f"kept {path}: fitted before with the same cache, method, seed and settings (--refit fits it again)")
    return FitOutcome(path, record, kept=True)


def _fit_baseline(cache, method: str, normal, runs_dir, seed: int, params: dict,
                  log: Callable[[str], None], keep_existing: bool = False, val_fraction: float = 0.0,
                  features: str = PAPER_FEATURES, setting: str = "") -> list[FitOutcome]:
    """:func:`fit_cache` for the baselines of :mod:`flow.detectors.knn` and :mod:`flow.detectors.gaussian` (class tokens only; ``seed`` is recorded,
    names the run and chooses the held-out rows, but the baselines are deterministic)."""
    runs_dir = Path(runs_dir)
    outcomes = []
    with _open_for_fit(cache, normal, runs_dir) as (fc, classes, fingerprint):
        names = _check_slots(fc, cache, method, classes, runs_dir, seed, setting, features, val_fraction, params)
        train = fc.split("train")
        for k in classes:
            kept = keep_existing and _kept_run(runs_dir / names[k], {
                "method": method, "normal_class": k, "seed": seed, "setting": setting,
                "params": BASELINES[method](**params).params(), "val_fraction": val_fraction,
                "feature_transform": features, "cache_fingerprint": fingerprint}, log)
            if kept:
                outcomes.append(kept)
                continue
            rows = train.rows_of_class(k)
            cls_np, _ = train.read(rows)
            fit_idx, val_idx = (i.numpy() for i in split_holdout(rows.size, val_fraction, seed))
            start = time.perf_counter()
            transform = FeatureTransform(features).fit(cls_np[fit_idx])  # the fitted rows only
            cls_np = transform(cls_np)
            detector = BASELINES[method](**params).fit(cls_np[fit_idx])
            elapsed = time.perf_counter() - start
            files, calibration = {}, {}
            if val_idx.size:
                files, calibration = _calibration(train, rows[val_idx], detector.scores(cls_np[val_idx]),
                                                  val_fraction, seed, log)
            if transform.state():
                files[TRANSFORM_FILE] = transform.state()
            record = {**_record_head(fc, method, k, seed), "setting": setting, "feature_transform": features,
                      "params": detector.params(),
                      "scores": list(detector.score_names), "num_train": int(fit_idx.size),
                      "val_fraction": val_fraction, "num_val": int(val_idx.size), "wall_time_s": round(elapsed, 3),
                      "primary_score": PRIMARY_SCORES[method], **calibration, **_record_tail(fc, cache, fingerprint)}
            path = save_run(runs_dir, names[k], detector.state(), record, files)
            log(f"fitted {method} for normal class {k} ({fc.class_names[k]}): {fit_idx.size} train rows"
                f"{_features_note(features)}"
                f"{f', {val_idx.size} held out for calibration' if val_idx.size else ''}, {elapsed:.1f} s -> {path}")
            outcomes.append(FitOutcome(path, record))
    return outcomes


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
