"""The public Python API of SANF-AD: every ``pipeline.py`` command is one call of this module.

A researcher's path, on the embedded digits dataset::

    from flow.api import FitConfig, extract, fit, score

    cache = extract("digits", backbone="tf_efficientnet_lite0")         # features, once (an HDF5 cache)
    runs = fit(cache, FitConfig(normal="3", method="knn", val_fraction=0.2), runs_dir="runs/api")
    rows = score("runs/api")                                            # AUROC rows, auroc.csv

A practitioner's path, with a fitted run folder::

    from flow.api import load

    run = load("runs/api/<run>")
    result = run.predict(["new/1.png", pil_image, uint8_array])         # scores, p-values, decisions
    run.export("model.onnx")

The names in ``__all__`` are the API; everything else in the package may change. Errors are the library's own
types (:data:`USER_ERRORS`), each with a one-line message naming the argument, what is allowed and what was given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cache import CacheError, FeatureCache
from extract import BackboneError, DatasetError, ExtractionError, ImageReadError
from extract.datasets import DataAbsentError
from extract.distributed import SINGLE, DistContext, JobError
from extract.encode import CHANNELS
from extract.run import extract_categories
from flow.deploy.export import export_onnx
from flow.deploy.predict import Predictions, PredictionSummary, Predictor, predict
from flow.deploy.runtime import ExportError
from flow.detectors.calibration import DEFAULT_ALPHA
from flow.experiments.config import FitConfig
from flow.experiments.fitting import find_cache, fit_cache
from flow.experiments.metrics import MetricError
from flow.experiments.reproduce import SCALES, TABLES, Reproduction
from flow.experiments.reproduce import reproduce as reproduce_tables
from flow.experiments.scoring import score_runs
from flow.experiments.summary import summarise
from flow.experiments.sweep import fit_sweep
from flow.model.train import FlowTrainingError
from flow.store.run_folder import RunError, read_run_record

#: Where ``extract`` writes caches and ``fit`` looks for one, unless told otherwise.
DEFAULT_CACHE_DIR = "caches"
#: Where ``fit`` writes run folders and ``score`` reads them, unless told otherwise.
DEFAULT_RUNS_DIR = "runs"
#: The library's errors for bad input (arguments, files, data): the command line prints their one-line message and
#: exits with code 2. ``ValueError`` covers bad arguments, ``OSError`` an output that cannot be written.
USER_ERRORS = (CacheError, DatasetError, BackboneError, ImageReadError, ExtractionError, RunError, MetricError,
               FlowTrainingError, ExportError, JobError, ValueError, OSError)


def extract(dataset: str = "digits", cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR, *,
            skip_existing: bool = True, log: Callable[[str], None] = print, dist: DistContext = SINGLE,
            **options) -> list[Path]:
    """Encode every image of a dataset once and write its HDF5 cache (one per MVTec AD category with
    ``category="all"``); an existing cache of the same settings is reused (``skip_existing``).

    Args:
        dataset: one of :data:`extract.DATASETS` (``digits``: scikit-learn's 8x8 digits, no download).
        cache_dir: the folder receiving the cache.
        skip_existing: return an existing cache of the same settings instead of refusing (``overwrite=True``
            replaces it); one that holds other images than the dataset has now (a folder tree changed since) is
            refused (:class:`cache.CacheError`), not reused.
        log: where to print status lines.
        dist: a distributed job's context (torchrun), or :data:`extract.distributed.SINGLE`.
        **options: the other ``extract`` options by name (``backbone``, ``data_root``, ``patch_grid``,
            ``img_size``, ``batch_size``, ``device``, ``precision``, ``dtype``, ``download``, ...; see
            :func:`extract.run.extract_features`).

    Returns:
        The cache paths.

    Raises:
        DatasetError, BackboneError, ExtractionError, ImageReadError, CacheError, ValueError.
    """
    return extract_categories(dataset=dataset, data_root=options.pop("data_root", None),
                              category=options.pop("category", None), cache_dir=str(cache_dir),
                              skip_existing=skip_existing, log=log, dist=dist, **options)


def open_cache(path: str | os.PathLike) -> FeatureCache:
    """A cache opened read-only and checked (a context manager: ``with open_cache(p) as fc: fc.split("train")``).

    Raises:
        CacheError: missing, unfinished, damaged or of an unknown format version.
    """
    return FeatureCache(path)


def describe_cache(path: str | os.PathLike) -> list[str]:
    """The lines ``pipeline.py info`` prints: attributes, shapes and rows per class.

    Raises:
        CacheError: as :func:`open_cache`.
    """
    with FeatureCache(path) as fc:
        return fc.describe()


@dataclass
class Run:
    """A fitted run folder: one detector fitted on one normal class of one cache.

    Attributes:
        path: the run folder.
        record: its ``run.json``.
    """

    path: Path
    record: dict
    _predictors: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def method(self) -> str:
        return self.record["method"]

    @property
    def normal_name(self) -> str:
        return self.record["normal_name"]

    @property
    def calibrated(self) -> bool:
        """Whether the run holds held-out normal scores (p-values and decisions)."""
        return bool(self.record.get("calibration"))

    def predictor(self, device: str = "auto", onnx: str | os.PathLike | None = None,
                  weights: str | None = None) -> Predictor:
        """The run loaded for new images (backbone, preprocessing, transform, detector, calibration), kept for the
        next call with the same arguments.

        Raises:
            RunError, BackboneError: as :class:`flow.deploy.predict.Predictor`.
        """
        key = (device, None if onnx is None else str(onnx), weights)
        if key not in self._predictors:
            self._predictors[key] = Predictor(self.path, device=device, onnx=onnx, weights=weights, log=lambda _: None)
        return self._predictors[key]

    def predict(self, images, alpha: float = DEFAULT_ALPHA, device: str = "auto",
                onnx: str | os.PathLike | None = None, batch_size: int = 64) -> Predictions:
        """Score new images: a list of file paths, PIL images or uint8 arrays (H, W) or (H, W, C) with C 1 to 4,
        one of them alone, or a stack of arrays (N, H, W) or (N, H, W, C) (:func:`image_list`); read as files are
        (:func:`extract.encode.image_from`).

        Returns:
            :class:`~flow.deploy.predict.Predictions`: every score per image, and for a calibrated run the p-value
            and the decision at ``alpha`` (``anomalous``); an image that cannot be read has NaN scores and its
            reason in ``errors``.

        Raises:
            ValueError: a bad ``alpha``; RunError, BackboneError: the run cannot be loaded.
        """
        return self.predictor(device, onnx).predict(image_list(images), alpha=alpha, batch_size=batch_size)

    def export(self, out: str | os.PathLike, alpha: float = DEFAULT_ALPHA, **options) -> dict[str, float]:
        """Write the run as one ONNX graph (images in [0, 1] -> scores, p-value, decision) and check it against
        PyTorch with onnxruntime: :func:`flow.deploy.export.export_onnx` (options ``opset``, ``check_images``,
        ``weights``, ``log``).

        Returns:
            The largest relative difference per score between onnxruntime and PyTorch on the check images.
        """
        options.setdefault("log", lambda _: None)
        return export_onnx(self.path, out, alpha=alpha, **options)


def image_list(images) -> list:
    """``images`` as a list of single images: a path, a PIL image or an array (H, W) or (H, W, C) with C 1 to 4 (gray,
    gray and alpha, RGB, RGBA) is one image; a stack (N, H, W) or (N, H, W, C) or any other sequence is N images.

    Raises:
        ValueError: anything else (the message names what was given).
    """
    from PIL import Image

    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    if isinstance(images, np.ndarray):
        one = images.ndim == 2 or (images.ndim == 3 and images.shape[2] in CHANNELS)
        return [images] if one else list(images)
    if isinstance(images, (list, tuple)):
        return list(images)
    raise ValueError(f"images must be a path, a PIL image, an array or a list of them; got {type(images).__name__}")


def load(path: str | os.PathLike) -> Run:
    """A run folder written by :func:`fit`.

    Raises:
        RunError: not a run folder, or its ``run.json`` is damaged or of another format.
    """
    return Run(Path(path), read_run_record(path))


def fit(cache: str | os.PathLike, config: FitConfig = FitConfig(), runs_dir: str | os.PathLike = DEFAULT_RUNS_DIR,
        *, device: str = "auto", overwrite: bool = False, progress: bool = True,
        log: Callable[[str], None] = print) -> list[Run]:
    """Fit ``config.method`` on the train rows of the normal class(es) of a cache: one run folder each.

    Args:
        cache: an HDF5 cache (:func:`extract`).
        config: what to fit (:class:`~flow.experiments.config.FitConfig`).
        runs_dir: the folder receiving the run folders.
        device: ``auto``, ``cpu`` or ``cuda``.
        overwrite: replace a run folder that holds a run fitted with other settings (refused otherwise).
        progress: show progress bars.
        log: where to print status lines.

    Returns:
        One :class:`Run` per normal class.

    Raises:
        CacheError, ValueError, RunError, FlowTrainingError: see :func:`flow.experiments.fitting.fit_cache`.
    """
    if not isinstance(config, FitConfig):
        raise ValueError(f"config must be a flow.api.FitConfig (FitConfig(method=..., ...)); got "
                         f"{type(config).__name__}")
    outcomes = fit_cache(cache, config, runs_dir=runs_dir, device=device, progress=progress, log=log,
                         overwrite=overwrite)
    return [Run(o.path, o.record) for o in outcomes]


def score(runs_dir: str | os.PathLike = DEFAULT_RUNS_DIR, *, alpha: float = DEFAULT_ALPHA, batch_size: int = 256,
          device: str = "auto", log: Callable[[str], None] = print) -> list[dict]:
    """Score the test split of its cache with every run folder under ``runs_dir``; write each run's
    ``scores.csv`` and ``runs_dir``'s ``auroc.csv`` and ``auroc_by_anomaly.csv``.

    Returns:
        The AUROC rows (one per run and score; :data:`flow.experiments.scoring.AUROC_COLUMNS`).

    Raises:
        RunError, CacheError, MetricError: see :func:`flow.experiments.scoring.score_runs`.
    """
    return score_runs(runs_dir=runs_dir, batch_size=batch_size, device=device, log=log, alpha=alpha)


def predict_files(run: str | os.PathLike, paths: str | os.PathLike | Sequence[str],
                  out: str | os.PathLike | None = None, **options) -> PredictionSummary:
    """Score image files and folders (one path alone, or a sequence of them) with a run and write one CSV row per
    file (``pipeline.py predict``; options: see :func:`flow.deploy.predict.predict`)."""
    return predict(run, [paths] if isinstance(paths, (str, os.PathLike)) else list(paths), out=out, **options)


def export(run: str | os.PathLike, out: str | os.PathLike, alpha: float = DEFAULT_ALPHA, **options) -> dict[str, float]:
    """:meth:`Run.export` of the run folder ``run`` (``pipeline.py export``)."""
    return load(run).export(out, alpha=alpha, **options)


def sweep(base: FitConfig = FitConfig(), *, cache: str | os.PathLike | None = None,
          methods: Sequence[str] = ("sanf", "sanf-nocaff", "knn", "gaussian"), seeds: Sequence[int] = (0,),
          transforms: Sequence[str] = ("auto",), blocks: Sequence[int] = (4,), hidden: Sequence[int] = (1024,),
          k: int = 2, runs_dir: str | os.PathLike = DEFAULT_RUNS_DIR,
          refit: bool = False, overwrite: bool = False, alpha: float = DEFAULT_ALPHA, device: str = "auto",
          means: bool = False, log: Callable[[str], None] = print, dist: DistContext = SINGLE,
          **extract_options) -> list[dict]:
    """Extract (unless ``cache`` is given or the cache exists), fit every method x seed x transform x flow size on
    every normal class, score, and write the summary, report and plots (``pipeline.py sweep``).

    Args:
        base: the options every fit shares (normal class, held-out fraction, training length, k, ...).
        cache: an existing cache; otherwise ``extract_options`` (``dataset``, ``backbone``, ...) say what to extract.
        methods, seeds, transforms, blocks, hidden: the sweep's axes (the baselines are fitted once, seed 0).
        k: the neighbours of ``knn``.
        runs_dir: the folder receiving the run folders, ``auroc.csv`` and ``<cache>__summary.csv`` / ``__report.md``.
        refit: fit again the runs fitted before with the same settings (kept otherwise: a killed sweep resumes).
        overwrite: replace runs fitted with other settings under the same names.
        alpha: the significance level of the calibrated runs' decisions.
        device: ``auto``, ``cpu`` or ``cuda``.
        means: print each method's mean AUROC.
        log: where to print status lines.
        dist: a distributed job's context (torchrun): the chunks and the fits are shared among its ranks.

    Returns:
        The AUROC rows of every run under ``runs_dir`` (on rank 0; empty on the others).
    """
    with dist.all_succeed():  # an error every rank finds alike is printed once, by rank 0
        if (cache is None) == (extract_options.get("dataset") is None):
            raise ValueError("sweep needs either --dataset (what to extract) or --cache (an existing cache)"
                             + ("; got both: give only one" if cache is not None else ""))
        if cache is not None:
            extract_options.pop("dataset", None)
            caches = [Path(cache)]
            with FeatureCache(cache):  # a bad cache is refused before any fit
                pass
    if cache is None:
        caches = extract(extract_options.pop("dataset"), extract_options.pop("cache_dir", DEFAULT_CACHE_DIR), log=log,
                         dist=dist, device=device, **extract_options)
    fitted, kept = fit_sweep(caches, base, methods, seeds, transforms, blocks, hidden, k=k, runs_dir=str(runs_dir),
                             device=device, refit=refit, log=log, dist=dist, overwrite=overwrite)
    rows: list[dict] = []
    with dist.all_succeed():  # the other ranks wait for rank 0's scoring: its error ends the job as one
        if dist.is_main:
            if kept:
                log(f"{len(kept)} run{'s' if len(kept) != 1 else ''} fitted before with the same settings, not "
                    "fitted again (--refit fits them again)")
            rows = summarise(caches, fitted, kept, runs_dir, device=device, alpha=alpha, means=means, log=log)
    return rows


def reproduce(out: str | os.PathLike, tables: Sequence[int] = TABLES, scale: str = "quick", *,
              seeds: Sequence[int] | None = None, cache: str | os.PathLike | None = None, normal: str = "all",
              epochs: int | None = None, steps: int | None = None, device: str = "auto",
              log: Callable[[str], None] = print, progress: bool = True, dist: DistContext = SINGLE,
              fit: bool = True, keep_runs: bool = True, **extract_options) -> Reproduction:
    """The paper's tables 2, 5, 6 and 7 (``pipeline.py reproduce``): extract once (or use ``cache``), fit and score
    what each table needs, and write ``<out>/tables.md``, ``table<N>.csv`` and the ledger ``fits.csv``; resumable.

    Args:
        out: the output folder.
        tables: a subset of (2, 5, 6, 7).
        scale: ``quick`` (digits, minutes), ``cpu`` (CIFAR-10 with EfficientNet-Lite0, hours) or ``paper`` (ViT-L/16,
            a GPU; :data:`flow.experiments.reproduce.SCALES`).
        seeds: the flows' seeds (default: the scale's).
        cache: an existing cache; otherwise the scale's extraction, with ``extract_options`` (``dataset``,
            ``data_root``, ``batch_size``, ...) given here winning over the scale's.
        normal: the normal classes: ``all`` (the tables' protocol) or one class (a name or an index).
        epochs, steps: the flows' training length (default: the scale's).
        device, log, progress, dist: as :func:`sweep`.
        fit: False: fit nothing, only write the tables of what ``<out>/fits.csv`` holds.
        keep_runs: False: remove each unit's run folder once its rows are in ``fits.csv`` (what a later call reuses).

    Returns:
        A :class:`flow.experiments.reproduce.Reproduction` (files written, fits fitted and reused, wall times).

    Raises:
        ValueError: a table or scale not known; with ``cache``, extraction options. As :func:`extract` and
            :func:`fit`. Data that is absent (:class:`extract.datasets.DataAbsentError`: no such data root, or a
            dataset neither found nor downloadable) does not raise: the tables say "not run: data absent".
    """
    with dist.all_succeed():  # an error every rank finds alike is printed once, by rank 0
        if scale not in SCALES:
            raise ValueError(f"--scale must be one of {', '.join(SCALES)}; got {scale!r}")
        preset = SCALES[scale]
        if cache is not None and extract_options:
            raise ValueError(f"--{next(iter(extract_options)).replace('_', '-')} sets the extraction; with --cache "
                             "nothing is extracted")
        if extract_options.get("category") == "all":  # refused before hours of extraction, not after
            raise ValueError("--category: reproduce takes one MVTec AD category (one cache); got 'all': run it once "
                             "per --category")
        given = epochs is not None or steps is not None
        base = FitConfig(normal=normal, epochs=epochs, steps=steps if given else preset.steps)
    absent = None
    if cache is None:
        options = {**preset.extract, **extract_options}
        dataset = options.pop("dataset", preset.dataset)
        try:
            (cache,) = extract(dataset, options.pop("cache_dir", DEFAULT_CACHE_DIR), log=log, dist=dist,
                               device=device, progress=progress, **options)
        except (DataAbsentError, JobError) as err:  # every rank finds the data absent: ranks but 0 as a JobError
            cause = err if isinstance(err, DataAbsentError) else err.__cause__
            if not isinstance(cause, DataAbsentError):
                raise
            absent = str(cause)
            if dist.is_main:
                log(f"not run: data absent ({absent})")
    return reproduce_tables(cache, out, tables, scale=scale, seeds=seeds, base=base, device=device, log=log,
                            progress=progress, dist=dist, absent=absent, fit=fit, keep_runs=keep_runs)


def serve(run: str | os.PathLike, onnx: str | os.PathLike | None = None, host: str = "127.0.0.1", port: int = 8000,
          alpha: float = DEFAULT_ALPHA, max_batch: int = 32, max_upload_mb: float = 20.0, token: str | None = None,
          device: str = "auto", weights: str | None = None, log: Callable[[str], None] = print) -> None:
    """Serve a run folder over HTTP until stopped (``pipeline.py serve``): the FastAPI app of
    :func:`flow.deploy.serve.create_app` under uvicorn (docs/serving.md).

    Args:
        run: the run folder.
        onnx: serve through this ONNX graph (``export`` of ``run``) instead of PyTorch.
        host: the interface to bind (127.0.0.1: this machine only; 0.0.0.0: every interface).
        port: the TCP port.
        alpha, max_batch, max_upload_mb, token: see :class:`flow.deploy.serve.ServeConfig`.
        device: ``auto``, ``cpu`` or ``cuda``.
        weights: the backbone's weights file, if it moved since extraction.
        log: where status lines go.

    Raises:
        ValueError: a setting out of range, or the port is taken. RunError: ``run`` is not a run folder (before the
            server starts), or the run cannot be loaded (the server stops: a process manager sees it fail).
    """
    import socket

    import uvicorn

    from flow.deploy.serve import ServeConfig, create_app

    if not host.strip():  # the empty host binds every interface
        raise ValueError(f"--host must name an interface (127.0.0.1: this machine only, 0.0.0.0: every interface); "
                         f"got {host!r}")

    config = ServeConfig(alpha=alpha, max_batch=max_batch, max_upload_mb=max_upload_mb, token=token)
    read_run_record(run)  # a wrong folder is refused here, not by a server that cannot load it
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ValueError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err}); choose "
                             "another --port") from None
    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def stop(err: BaseException) -> None:
        failed.append(err)
        if server is not None:
            server.should_exit = True

    app = create_app(run, onnx=onnx, config=config, device=device, weights=weights, log=log, on_failure=stop)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    log(f"serving {run} on http://{host}:{port}/ (the page; the API at /predict, /model, /health, /docs)")
    server.run()
    if failed:
        err = failed[0]
        raise (err if isinstance(err, USER_ERRORS) else RunError(f"cannot serve {run}: {err}"))


def demo(cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR, runs_dir: str | os.PathLike = DEFAULT_RUNS_DIR,
         epochs: int | None = None, steps: int | None = None, device: str = "auto",
         log: Callable[[str], None] = print) -> list[dict]:
    """The main job on the embedded default (``pipeline.py demo``): digits, EfficientNet-Lite0 with its packaged
    ImageNet weights (no download); a flow for every digit as the normal class and the k-NN and Gaussian baselines
    on the same features, scored, with the AUROC table, each method's mean, and the sweep's report and plots.

    Returns:
        The AUROC rows.
    """
    (cache,) = extract("digits", cache_dir, backbone="tf_efficientnet_lite0", device=device, num_workers=0, log=log)
    flows = FitConfig(epochs=epochs, steps=steps)  # the paper's flow and optimiser defaults
    fitted = {cache: {o.path.name for o in fit_cache(cache, flows, runs_dir=runs_dir, device=device, log=log)}}
    for method in ("knn", "gaussian"):  # the honest comparison: the same cached features, seconds to fit
        fitted[cache] |= {o.path.name for o in fit_cache(cache, FitConfig(method=method), runs_dir=runs_dir, log=log)}
    return summarise([cache], fitted, set(), runs_dir, device=device, alpha=DEFAULT_ALPHA, means=True, log=log)


__all__ = ["DEFAULT_CACHE_DIR", "DEFAULT_RUNS_DIR", "FitConfig", "Predictions", "Run", "USER_ERRORS", "demo",
           "describe_cache", "export", "extract", "find_cache", "fit", "image_list", "load", "open_cache",
           "predict_files", "reproduce", "score", "serve", "sweep"]
