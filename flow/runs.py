"""Fitting flows on a cache, saving them as runs, and scoring every run: the library behind ``fit`` and ``score``.

A run is a folder ``<runs_dir>/<name>/`` holding ``model.safetensors`` (the flow's state dict),
``run.json`` (every setting, the cache and its fingerprint, the train loss per epoch, wall time) and,
after scoring, ``scores.csv``. ``<runs_dir>/auroc.csv`` collects one row per (run, score type).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cache import PARTIAL_SUFFIX, FeatureCache

from .baselines import BASELINES
from .metrics import MetricError, aupr, auroc, fpr_at_tpr
from .model import FlowConfig, SANFFlow, count_flops, parameter_count
from .train import FlowTrainingError, TrainConfig, fit_flow, resolve_device, score_batches

RUN_FORMAT = "sanf-ad-run"
RUN_VERSION = 1
SCORE_TYPES = ("nll", "z2")
AUROC_COLUMNS = ("dataset", "backbone", "normal_class", "normal_name", "method", "score", "seed", "auroc",
                 "n_normal", "n_anomalous", "run", "cache", "aupr", "fpr95", "setting")
#: Columns of ``auroc_by_anomaly.csv``: the metrics of each run and score on the normal test images against the
#: test images of one anomalous class (MVTec AD: one defect type) at a time.
BY_ANOMALY_COLUMNS = ("dataset", "backbone", "normal_class", "normal_name", "method", "score", "seed", "anomaly_class",
                      "anomaly_name", "auroc", "n_normal", "n_anomalous", "run", "cache", "aupr", "fpr95", "setting")


class RunError(Exception):
    """A run folder or its cache is missing, changed or unreadable."""


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
        ValueError: no cache given and ``cache_dir`` holds none or several (the candidates are listed).
    """
    if cache is not None:
        return Path(cache)
    found = sorted(Path(cache_dir).glob("*.h5"))
    if len(found) == 1:
        return found[0]
    if not found:
        unfinished = sorted(Path(cache_dir).glob(f"*.h5{PARTIAL_SUFFIX}"))
        if unfinished:
            raise ValueError(f"no complete cache in --cache-dir {cache_dir}, only an interrupted extraction "
                             f"({unfinished[0].name}); run the same extract command again to resume it")
        raise ValueError(f"no cache (*.h5) in --cache-dir {cache_dir}; run 'extract' first or pass --cache")
    raise ValueError(f"--cache-dir {cache_dir} holds {len(found)} caches; pass --cache with one of: "
                     + ", ".join(str(p) for p in found))


FLOW_METHODS = ("sanf", "sanf-nocaff")
#: Every method of ``fit --method``: the flow, its ablation and the baselines.
METHODS = FLOW_METHODS + tuple(BASELINES)


def method_name(use_caff: bool) -> str:
    """``"sanf"`` for the CAFF flow, ``"sanf-nocaff"`` for the MLP-only ablation."""
    return "sanf" if use_caff else "sanf-nocaff"


def _umask_mode(mode: int) -> int:
    """``mode`` with the process umask applied (tempfile creates 0600 files and 0700 folders)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            handle.write(text)
        os.chmod(tmp, _umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class FitOutcome:
    """One fitted run: where it was saved and its record (the content of ``run.json``)."""

    path: Path
    record: dict


def fit_cache(cache: str | os.PathLike, normal: str | int = "all", runs_dir: str | os.PathLike = "runs",
              seed: int = 0, flow_config: dict | None = None, train_config: TrainConfig = TrainConfig(),
              device: str = "auto", val_fraction: float = 0.0, progress: bool = True,
              log: Callable[[str], None] = print, method: str | None = None,
              baseline_params: dict | None = None, setting: str = "", keep_existing: bool = False
              ) -> list[FitOutcome]:
    """Fit one detector per normal class on the train split of a cache and save each as a run.

    ``method`` is ``sanf`` (the CAFF flow), ``sanf-nocaff`` (MLP-only subnets; also chosen by
    ``flow_config["use_caff"] = False``), or a baseline of :mod:`flow.baselines` (``knn``, ``gaussian``),
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

    Returns:
        One :class:`FitOutcome` per normal class, in class order.

    Raises:
        CacheError: the cache is unreadable or invalid.
        ValueError: a bad ``normal`` or a normal class without train rows.
        FlowTrainingError: training diverged.
    """
    flow_config = dict(flow_config or {})
    if method is None:
        method = method_name(flow_config.get("use_caff", True))
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}; got {method!r}")
    if method in BASELINES:
        return _fit_baseline(cache, method, normal, runs_dir, seed, baseline_params or {}, log, keep_existing)
    if "use_caff" in flow_config and method_name(flow_config["use_caff"]) != method:
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
        log(f"flow: {method_name(config.use_caff)}, D={config.dim}, P={fc.attrs['num_patches']}, "
            f"K={config.num_blocks}, H={config.hidden}, heads={config.num_heads}, alpha={config.alpha}: "
            f"{n_params:,} trainable parameters, {flops / 1e9:.3f} GFLOPs per sample (forward; "
            f"{flops_written / 1e9:.3f} with the class attention as eq. 6-10 print it)")
        names = _check_slots(fc, cache, method, classes, runs_dir, seed, setting)
        for k in classes:
            kept = keep_existing and _kept_run(runs_dir / names[k], {
                "method": method, "normal_class": k, "seed": seed, "setting": setting, "flow": config.to_dict(),
                "train": train_config.to_dict(), "val_fraction": val_fraction, "cache_fingerprint": fingerprint}, log)
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
            name = names[k]
            if (runs_dir / name).exists():
                log(f"replacing the existing run {runs_dir / name}")
            model, result = fit_flow(cls_t, patches_t, config, train_config, seed=seed, device=dev,
                                     progress=progress, val_cls=val_cls, val_patches=val_patches)
            record = {
                **_record_head(fc, method, k, seed),
                "setting": setting,
                "flow": config.to_dict(),
                "train": train_config.to_dict(),
                "train_loss_unit": "nats per dimension (eq. 14 divided by D, without the (D/2) log 2pi term)",
                "epochs": train_config.epochs,
                "epoch_losses": result.epoch_losses,
                "final_train_loss": result.final_loss,
                "val_fraction": val_fraction,
                "val_losses": result.val_losses,
                "num_train": int(cls_t.shape[0]),
                "num_val": int(val_idx.numel()),
                "num_parameters": n_params,
                # the paper's count (Table 6: class attention as eq. 6-10 print it), and what this code computes
                "gflops_per_sample": round(flops_written / 1e9, 6),
                "gflops_per_sample_computed": round(flops / 1e9, 6),
                "wall_time_s": round(result.wall_time_s, 3),
                "device": str(dev),
                **_record_tail(cache, fingerprint),
            }
            path = save_run(runs_dir, name, model.state_dict(), record)
            val_note = f", held-out loss {result.val_losses[-1]:.4f}" if result.val_losses else ""
            epochs = f"{train_config.epochs} epoch{'s' if train_config.epochs != 1 else ''}"
            log(f"fitted normal class {k} ({fc.class_names[k]}): {cls_t.shape[0]} train rows, {epochs}, "
                f"final loss {result.final_loss:.4f} nats/dim{val_note}, {result.wall_time_s:.1f} s -> {path}")
            outcomes.append(FitOutcome(path, record))
    return outcomes


@contextlib.contextmanager
def _open_for_fit(cache, normal, runs_dir: Path):
    """Open the cache and yield ``(cache, normal class indices, fingerprint)`` once ``--normal`` is resolved and
    ``runs_dir`` is known to be writable (what every method checks before it fits)."""
    with FeatureCache(cache) as fc:
        classes = resolve_normal(normal, fc.class_names)
        allowed = [fc.class_names.index(c) for c in fc.normal_classes]
        if str(normal) not in fc.class_names and str(normal).strip() == "all":
            classes = allowed  # every class that can be normal (good/defect layouts: only 'good')
        refused = [fc.class_names[k] for k in classes if k not in allowed]
        if refused:
            raise ValueError(f"--normal {refused[0]!r}: only {', '.join(fc.normal_classes)} can be the normal class "
                             "of this cache (the other classes are defect types)")
        check_writable_dir(runs_dir, "--runs-dir")
        yield fc, classes, fc.fingerprint()


def _check_slots(fc: FeatureCache, cache, method: str, classes: list[int], runs_dir: Path,
                 seed: int, setting: str = "") -> dict[int, str]:
    """Run names per class; refuses, before anything is fitted, a class without train rows or a run slot taken
    by something that is not a run."""
    names = {k: run_name(Path(cache).stem, method, k, fc.class_names[k], seed, setting) for k in classes}
    train = fc.split("train")
    for k in classes:
        if train.rows_of_class(k).size == 0:
            raise ValueError(f"--normal {fc.class_names[k]!r}: the train split has no rows of this class")
        blocked = runs_dir / names[k]
        if os.path.lexists(blocked) and not (blocked / "run.json").is_file():
            raise RunError(f"{blocked} exists and is not a run folder; move it away")
    return names


def _record_head(fc: FeatureCache, method: str, k: int, seed: int) -> dict:
    return {"format": RUN_FORMAT, "format_version": RUN_VERSION, "method": method, "dataset": fc.attrs["dataset"],
            "backbone": fc.attrs["backbone"], "normal_class": k, "normal_name": fc.class_names[k], "seed": seed}


def _record_tail(cache, fingerprint: str) -> dict:
    return {"cache": str(Path(cache).resolve()), "cache_fingerprint": fingerprint, "torch_version": torch.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _kept_run(path: Path, expected: dict, log: Callable[[str], None]) -> FitOutcome | None:
    """The run at ``path`` when its record holds ``expected`` (compared as JSON) and its weights file exists."""
    try:
        record = read_run_record(path)
    except RunError:
        return None
    same = all(json.dumps(record.get(key, "" if key == "setting" else None), sort_keys=True)
               == json.dumps(value, sort_keys=True) for key, value in expected.items())
    if not same or not (path / "model.safetensors").is_file():
        return None
    log(f"kept {path}: fitted before with the same cache, method, seed and settings (--refit fits it again)")
    return FitOutcome(path, record)


def _fit_baseline(cache, method: str, normal, runs_dir, seed: int, params: dict,
                  log: Callable[[str], None], keep_existing: bool = False) -> list[FitOutcome]:
    """:func:`fit_cache` for the baselines of :mod:`flow.baselines` (class tokens only; ``seed`` is recorded
    and names the run, but the baselines are deterministic)."""
    runs_dir = Path(runs_dir)
    outcomes = []
    with _open_for_fit(cache, normal, runs_dir) as (fc, classes, fingerprint):
        names = _check_slots(fc, cache, method, classes, runs_dir, seed)
        train = fc.split("train")
        for k in classes:
            kept = keep_existing and _kept_run(runs_dir / names[k], {
                "method": method, "normal_class": k, "seed": seed, "setting": "",
                "params": BASELINES[method](**params).params(), "cache_fingerprint": fingerprint}, log)
            if kept:
                outcomes.append(kept)
                continue
            cls_np, _ = train.read(train.rows_of_class(k))
            start = time.perf_counter()
            detector = BASELINES[method](**params).fit(cls_np)
            elapsed = time.perf_counter() - start
            record = {**_record_head(fc, method, k, seed), "params": detector.params(),
                      "scores": list(detector.score_names), "num_train": int(len(cls_np)),
                      "wall_time_s": round(elapsed, 3), **_record_tail(cache, fingerprint)}
            state = {key: torch.from_numpy(np.array(value)) for key, value in detector.state().items()}
            path = save_run(runs_dir, names[k], state, record)
            log(f"fitted {method} for normal class {k} ({fc.class_names[k]}): {len(cls_np)} train rows, "
                f"{elapsed:.1f} s -> {path}")
            outcomes.append(FitOutcome(path, record))
    return outcomes


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


def run_name(cache_stem: str, method: str, normal_class: int, normal_name: str, seed: int, setting: str = "") -> str:
    """``<cache>__<method>[-<setting>]__normal<k>-<name>__seed<s>``, with characters other than letters, digits,
    ``.``, ``_`` and ``-`` in the class name replaced by ``-`` (Fashion-MNIST has ``T-shirt/top``)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", normal_name)
    label = f"{method}-{setting}" if setting else method
    return f"{cache_stem}__{label}__normal{normal_class}-{safe}__seed{seed}"


def split_holdout(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``range(n)`` into (fit, held-out) index tensors; ``round(fraction * n)`` held out, chosen by ``seed``.

    Raises:
        ValueError: ``fraction`` outside [0, 1) or leaving no row to fit on.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1); got {fraction}")
    n_val = int(round(fraction * n))
    if n_val >= n:
        raise ValueError(f"--val-fraction {fraction} leaves no training rows of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1_000_003))
    return order[n_val:].sort().values, order[:n_val].sort().values


def check_writable_dir(folder: Path, option: str) -> None:
    """Create ``folder`` if needed and check that files can be written in it.

    Raises:
        ValueError: it cannot be created or written (the message names the option and the path).
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ValueError(f"{option} {folder}: cannot write there ({err.strerror or err})") from None


def save_run(runs_dir: Path, name: str, state: dict[str, torch.Tensor], record: dict) -> Path:
    """Write a run folder atomically (a temporary folder renamed into place); replaces a run of that name.

    Raises:
        FlowTrainingError: the weights hold NaN or infinite values (nothing is written).
        RunError: something other than a run folder is in the way.
    """
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise FlowTrainingError(f"run {name}: {len(bad)} weight tensors hold NaN or infinite values after "
                                "training (check --lr and --weight-decay); nothing saved")
    final = runs_dir / name
    if final.exists() and not (final / "run.json").is_file():
        raise RunError(f"{final} exists and is not a run folder; move it away")
    runs_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=runs_dir, prefix=f".{name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, _umask_mode(0o777))
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "run.json").write_text(json.dumps(record, indent=2) + "\n")
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _move_into_place(folder: Path, final: Path, attempts: int = 5) -> None:
    """Rename ``folder`` to ``final``, replacing an existing ``final`` whole.

    On Linux an existing run is swapped with the new one atomically (``renameat2(RENAME_EXCHANGE)``), so
    readers and a process killed at any moment see either the old run or the new one, never neither.
    Elsewhere the old run is renamed aside first (a window of two renames). A concurrent writer of the
    same run makes this retry instead of failing.
    """
    for _ in range(attempts):
        if final.exists() and _exchange(folder, final):
            shutil.rmtree(folder, ignore_errors=True)  # now holds the old run
            return
        aside = None
        if final.exists():
            aside = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".old")) / "run"
            try:
                os.replace(final, aside)
            except FileNotFoundError:  # another writer moved it first
                pass
        try:
            os.replace(folder, final)
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            continue  # another writer put its run in place meanwhile: replace that one
        finally:
            if aside is not None:
                shutil.rmtree(aside.parent, ignore_errors=True)
        return
    raise RunError(f"could not put the run {final} in place: other processes keep writing it")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2(..., RENAME_EXCHANGE)``; False where unsupported."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # no libc, or glibc older than 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOENT):  # unsupported here, or b vanished
        return False
    raise OSError(code, os.strerror(code), str(b))


#: Keys every run.json holds, with their types; flows add ``flow`` (dict), baselines ``params`` (dict) and
#: ``scores`` (list of score names).
RECORD_TYPES = {"method": str, "dataset": str, "backbone": str, "normal_class": int, "normal_name": str, "seed": int,
                "cache": str, "cache_fingerprint": str}


def read_run_record(path: str | os.PathLike) -> dict:
    """Read and check a run folder's ``run.json``.

    Raises:
        RunError: unreadable, not JSON, of another format or version, or lacking a required key; the
            message names the run folder.
    """
    path = Path(path)
    try:
        record = json.loads((path / "run.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunError(f"run {path}: cannot read run.json ({err})") from None
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT \
            or record.get("format_version") != RUN_VERSION:
        raise RunError(f"run {path}: run.json is not a {RUN_FORMAT} v{RUN_VERSION} record")
    types = dict(RECORD_TYPES)
    types.update({"flow": dict} if record.get("method") in FLOW_METHODS else {"params": dict, "scores": list})
    missing = [key for key in types if key not in record]
    if missing:
        raise RunError(f"run {path}: run.json lacks {missing}")
    wrong = [key for key, kind in types.items() if not isinstance(record[key], kind) or isinstance(record[key], bool)]
    if wrong:
        raise RunError(f"run {path}: run.json has values of the wrong type for {wrong}")
    if record["method"] not in METHODS:
        raise RunError(f"run {path}: unknown method {record['method']!r} (this build has {', '.join(METHODS)})")
    if record["method"] in BASELINES and list(record["scores"]) != list(BASELINES[record["method"]].score_names):
        raise RunError(f"run {path}: run.json lists scores {record['scores']} for {record['method']}")
    return record


def score_names(record: dict) -> tuple[str, ...]:
    """The scores a run's method gives: ``nll``, ``z2`` for the flows; the baseline's own otherwise."""
    return SCORE_TYPES if record["method"] in FLOW_METHODS else tuple(BASELINES[record["method"]].score_names)


def load_run(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[SANFFlow, dict]:
    """Load a run folder's model (eval mode) and record.

    Raises:
        RunError: ``run.json`` or ``model.safetensors`` is missing, damaged, of another format, or the
            weights do not fit the recorded architecture; the message names the run folder.
    """
    path = Path(path)
    record = read_run_record(path)
    if record["method"] in BASELINES:
        return _load_baseline(path, record), record
    try:
        config = FlowConfig(**record["flow"])
        expected = parameter_count(config)
    except Exception as err:  # TypeError, ValueError, or torch's errors on impossible sizes
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RunError(f"run {path}: run.json has an invalid flow configuration ({first})") from None
    try:
        state = load_file(str(path / "model.safetensors"))
    except Exception as err:  # OSError, or safetensors' own error type on a damaged file
        raise RunError(f"run {path}: cannot read model.safetensors ({err})") from None
    stored = sum(v.numel() for k, v in state.items() if "perm" not in k)
    if stored != expected:  # checked before building the model, which run.json could make of any size
        raise RunError(f"run {path}: model.safetensors does not fit the flow described in run.json "
                       f"({stored:,} weights stored, {expected:,} expected)")
    model = SANFFlow(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise RunError(f"run {path}: model.safetensors does not fit the flow described in run.json") from None
    return model.to(device).eval(), record


def _load_baseline(path: Path, record: dict):
    try:
        state = {key: value.numpy() for key, value in load_file(str(path / "model.safetensors")).items()}
    except Exception as err:  # OSError, or safetensors' own error type on a damaged file
        raise RunError(f"run {path}: cannot read model.safetensors ({err})") from None
    try:
        return BASELINES[record["method"]].from_state(record["params"], state)
    except (TypeError, ValueError, KeyError) as err:
        raise RunError(f"run {path}: model.safetensors or run.json does not describe a {record['method']} "
                       f"detector ({err})") from None


def list_runs(runs_dir: str | os.PathLike) -> list[Path]:
    """Run folders (those holding a ``run.json``) directly under ``runs_dir``, sorted by name."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    return sorted(p for p in runs_dir.iterdir() if not p.name.startswith(".") and (p / "run.json").is_file())


def score_runs(runs_dir: str | os.PathLike = "runs", batch_size: int = 256, device: str = "auto",
               block_rows: int = 2048, log: Callable[[str], None] = print) -> list[dict]:
    """Score the test split of its cache with every run under ``runs_dir``; write scores and AUROCs.

    The test split is read once per cache in blocks of ``block_rows`` rows and every run on that cache
    scores each block, so memory stays bounded by a block whatever the cache's size.

    Writes ``<run>/scores.csv`` (sample_id, label, is_anomaly, nll in nats, z2) per run,
    ``<runs_dir>/auroc.csv`` (columns ``AUROC_COLUMNS``: one row per run and score type; the protocol's
    numbers) and ``<runs_dir>/auroc_by_anomaly.csv`` (columns ``BY_ANOMALY_COLUMNS``: normal test images
    against each anomalous class alone, e.g. per MVTec AD defect type).

    Args:
        runs_dir: folder of run folders.
        batch_size: samples per forward pass.
        device: ``auto``, ``cpu`` or ``cuda``.
        block_rows: test rows read from the cache at once.
        log: where to print progress lines.

    Returns:
        The AUROC rows (dicts keyed by ``AUROC_COLUMNS``).

    Raises:
        RunError: no runs, a run's cache is missing or its fingerprint changed.
        CacheError: a cache is invalid.
        MetricError: non-finite scores, or a test split without normal or anomalous samples.
    """
    dev = resolve_device(device)
    runs = list_runs(runs_dir)
    if not runs:
        raise RunError(f"no fitted runs under {runs_dir}; run 'fit' first")
    by_cache: dict[str, list[Path]] = {}
    for run in runs:
        by_cache.setdefault(read_run_record(run)["cache"], []).append(run)
    rows: list[dict] = []
    by_anomaly: list[dict] = []
    pending_writes: list[tuple] = []
    for cache_path, cache_runs in by_cache.items():
        if not Path(cache_path).exists():
            raise RunError(f"the cache of run {cache_runs[0].name} is missing: {cache_path}")
        with FeatureCache(cache_path) as fc:
            fingerprint = fc.fingerprint()
            loaded = []
            for run in cache_runs:
                model, record = load_run(run, dev)
                if record["cache_fingerprint"] != fingerprint:
                    raise RunError(f"the cache {cache_path} changed since run {run.name} was fitted "
                                   f"(fingerprint {fingerprint[:12]} != {record['cache_fingerprint'][:12]}); "
                                   "fit again")
                loaded.append((run, model, record))
            test = fc.split("test")
            if test.num_rows == 0:
                raise RunError(f"the test split of {cache_path} is empty: nothing to score")
            scores = {run: {key: [] for key in score_names(record)} for run, _, record in loaded}
            start = time.perf_counter()
            for _, cls_np, patches_np in test.iter_blocks(block_rows):
                cls_t = torch.from_numpy(cls_np)
                patches_t = torch.from_numpy(patches_np)
                for run, model, record in loaded:
                    if record["method"] in FLOW_METHODS:
                        block = score_batches(model, cls_t, patches_t, batch_size)
                    else:
                        block = model.scores(cls_np)
                    for key in score_names(record):
                        scores[run][key].append(block[key])
            elapsed = time.perf_counter() - start
            labels = test.labels
            sample_ids = test.sample_ids
            class_names = fc.class_names
            for run, _, record in loaded:
                per_run = {key: np.concatenate(parts) for key, parts in scores[run].items()}
                normal_rows = labels == record["normal_class"]
                is_anomaly = (~normal_rows).astype(np.int64)
                anomaly_classes = np.unique(labels[~normal_rows]).tolist()
                pending_writes.append((run / "scores.csv", sample_ids, labels, is_anomaly, per_run))
                for key in score_names(record):
                    try:
                        metrics = _metrics(is_anomaly, per_run[key])
                    except MetricError as err:
                        raise MetricError(f"run {run.name}, score {key}: {err}") from None
                    head = {"dataset": record["dataset"], "backbone": record["backbone"],
                            "normal_class": record["normal_class"], "normal_name": record["normal_name"],
                            "method": record["method"], "setting": record.get("setting", ""), "score": key,
                            "seed": record["seed"], "n_normal": int(normal_rows.sum()), "run": run.name,
                            "cache": cache_path}
                    rows.append({**head, **metrics, "n_anomalous": int(is_anomaly.sum())})
                    for c in anomaly_classes:  # one anomalous class at a time
                        subset = normal_rows | (labels == c)
                        by_anomaly.append({**head, "anomaly_class": c, "anomaly_name": class_names[c],
                                           **_metrics(is_anomaly[subset], per_run[key][subset]),
                                           "n_anomalous": int((labels == c).sum())})
            log(f"scored {test.num_rows} test rows of {Path(cache_path).name} with {len(loaded)} run(s) "
                f"in {elapsed:.1f} s")
    # every AUROC is computed, and every destination checked, before anything is written: an error leaves the
    # earlier outputs as they were
    outputs = [args[0] for args in pending_writes] + [Path(runs_dir) / "auroc_by_anomaly.csv",
                                                      Path(runs_dir) / "auroc.csv"]
    for path in outputs:
        if os.path.lexists(path) and not path.is_file():
            raise RunError(f"cannot write {path}: it exists and is not a file; move it away")
    for args in pending_writes:
        _write_scores(*args)
    rows.sort(key=lambda r: (r["dataset"], r["backbone"], r["method"], r["setting"], r["normal_class"], r["seed"],
                             r["score"]))
    by_anomaly.sort(key=lambda r: (r["dataset"], r["backbone"], r["method"], r["setting"], r["normal_class"],
                                   r["seed"], r["score"], r["anomaly_class"]))
    _write_csv(Path(runs_dir) / "auroc_by_anomaly.csv", BY_ANOMALY_COLUMNS, by_anomaly)
    _write_csv(Path(runs_dir) / "auroc.csv", AUROC_COLUMNS, rows)
    return rows


def _metrics(is_anomaly: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """auroc, aupr and fpr95 of scores (N,) against 0/1 labels (N,) (anomalous positive; :mod:`flow.metrics`)."""
    return {name: fn(is_anomaly, scores) for name, fn in (("auroc", auroc), ("aupr", aupr), ("fpr95", fpr_at_tpr))}


def _write_scores(path: Path, sample_ids: list[str], labels: np.ndarray, is_anomaly: np.ndarray,
                  scores: dict[str, np.ndarray]) -> None:
    rows = [{"sample_id": s, "label": int(l), "is_anomaly": int(a)} for s, l, a in zip(sample_ids, labels, is_anomaly)]
    for key, values in scores.items():
        for row, value in zip(rows, values):
            row[key] = repr(float(value))
    _write_csv(path, ("sample_id", "label", "is_anomaly", *scores), rows)


def _write_csv(path: Path, columns: Sequence[str], rows: list[dict]) -> None:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write_text(path, buffer.getvalue())


def _label(row: dict) -> str:
    """``sanf`` or, for a sweep's non-default setting, ``sanf[K2-H1024]``."""
    return f"{row['method']}[{row['setting']}]" if row.get("setting") else row["method"]


def auroc_table(rows: list[dict]) -> str:
    """A plain-text table: one line per normal class, one column per (method, score), and the mean.

    AUROCs of several seeds of the same run settings are averaged. One table per (dataset, backbone).
    """
    out = []
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["backbone"]), []).append(row)
    for (dataset, backbone), group in groups.items():
        columns = sorted({(_label(r), r["score"]) for r in group})
        classes = sorted({(r["normal_class"], r["normal_name"]) for r in group})
        cell: dict[tuple, list[float]] = {}
        for r in group:
            cell.setdefault((r["normal_class"], _label(r), r["score"]), []).append(r["auroc"])
        names = [f"{m}/{s}" for m, s in columns]
        width = max(12, *(len(n) for n in names))
        first = max(14, *(len(f"{k} {n}") for k, n in classes))
        out.append(f"AUROC  dataset={dataset}  backbone={backbone}")
        out.append("normal class".ljust(first) + "".join(n.rjust(width + 2) for n in names))
        means = {c: [] for c in columns}
        for k, name in classes:
            line = f"{k} {name}".ljust(first)
            for c in columns:
                values = cell.get((k, *c))
                if values:
                    v = float(np.mean(values))
                    means[c].append(v)
                    line += f"{v:.4f}".rjust(width + 2)
                else:
                    line += "-".rjust(width + 2)
            out.append(line)
        out.append("mean".ljust(first) + "".join(
            (f"{np.mean(means[c]):.4f}" if means[c] else "-").rjust(width + 2) for c in columns))
    return "\n".join(out)
