#!/usr/bin/env python
"""SANF-AD command line: ``extract`` features once, ``fit`` flows on the cache, ``score`` the test split.

Each subcommand is a thin layer over one library function whose keyword names match its options:
``extract`` -> :func:`extract.extract_features`, ``fit`` -> :func:`flow.experiments.fitting.fit_cache`,
``score`` -> :func:`flow.experiments.scoring.score_runs`. ``demo`` chains the three on the embedded default (digits,
EfficientNet-Lite0 with its packaged ImageNet weights). Bad input exits with code 2 and a one-line error.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import click

from flow.model.train import TrainConfig

#: extract.datasets.DATASETS, repeated here so that --help does not import torch (a test checks they agree)
DATASET_CHOICES = ["cifar10", "cifar100", "stl10", "mnist", "svhn", "fashion-mnist", "cats-vs-dogs", "mvtec", "digits",
                   "folder"]
#: flow.detectors.transforms.FEATURE_CHOICES and DEFAULT_FEATURES, repeated for the same reason (a test checks they agree)
FEATURES_CHOICES = ["auto", "raw", "l2", "ssqrt-l2", "standardize", "pca-whiten"]
DEFAULT_FEATURES = "auto"
_FEATURES_HELP = ("Feature transform applied to class and patch tokens before the detector: auto (ssqrt-l2 on a "
                  "CNN's final features, raw otherwise: the measured choice), raw (the paper's), l2, "
                  "ssqrt-l2 (signed square root, then l2), standardize, pca-whiten (statistics from the normal "
                  "train rows; see docs/results.md for what each does on which features).")
DEFAULT_CACHE_DIR = "cache"
DEFAULT_RUNS_DIR = "runs"


class FiniteFloat(click.FloatRange):
    """A float within bounds that is neither NaN nor infinite."""

    def convert(self, value, param, ctx):
        import math

        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


class NonEmptyPath(click.Path):
    """``click.Path`` that refuses the empty string (which would silently mean the current folder)."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("an empty path is not allowed.", param, ctx)
        return super().convert(value, param, ctx)


class InputError(click.ClickException):
    """A one-line ``Error: ...`` and exit code 2 (bad input: argument, file, data)."""

    exit_code = 2


class ArgumentError(InputError):
    """An :class:`InputError` found from the command line alone, so every rank of a torchrun job finds it at the
    same point: rank 0 reports it, the other ranks exit 2 without repeating it."""


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    if "Original Traceback" in text:  # an exception re-raised from a DataLoader worker
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text.splitlines()[0] if text else type(err).__name__


def user_errors(fn):
    """Turn the library's input errors into :class:`InputError` (exit 2, no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from cache import CacheError
        from extract import BackboneError, DatasetError, ExtractionError, ImageReadError
        from extract.distributed import JobError
        from flow.deploy.export import ExportError
        from flow.experiments.metrics import MetricError
        from flow.model.train import FlowTrainingError
        from flow.store.run_folder import RunError

        try:
            return fn(*args, **kwargs)
        except JobError as err:  # a distributed job: rank 0 says what failed where, the other ranks nothing
            if err.silent:
                raise click.exceptions.Exit(2) from None
            raise InputError(f"[rank {err.rank}] {_one_line(err)}") from None
        except (CacheError, DatasetError, BackboneError, ImageReadError, ExtractionError, RunError, MetricError,
                FlowTrainingError, ExportError, ValueError, OSError) as err:  # OSError: an unwritable output path
            raise InputError(_one_line(err)) from None
        except RuntimeError as err:
            if "ImageReadError" in str(err):
                raise InputError(_one_line(err)) from None
            raise

    return wrapper


def job_command(fn):
    """:func:`user_errors` for a command that may run as a distributed job under torchrun: ``fn`` receives the
    job's :class:`extract.distributed.DistContext` as ``job``. In a distributed job the error line is printed
    before the ranks part (see :func:`extract.distributed.session`)."""
    checked = user_errors(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from extract.distributed import from_env, session

        device = kwargs.get("device", "auto")
        try:
            env = from_env()
            if env.distributed:
                env.backend(device)
        except ValueError as err:  # malformed RANK / WORLD_SIZE / LOCAL_RANK, or too few GPUs for the ranks
            # before the ranks are connected; the ranks of a node fail alike: its local rank 0 says so, once
            rank = os.environ.get("RANK", "0")
            if os.environ.get("LOCAL_RANK", "0") != "0":
                time.sleep(1.0)  # let the node's local rank 0 print before torchrun stops the job
                raise click.exceptions.Exit(InputError.exit_code) from None
            raise InputError(("" if rank == "0" else f"[rank {rank}] ") + _one_line(err)) from None
        with session(device) as job:
            try:
                return checked(*args, job=job, **kwargs)
            except click.ClickException as err:
                if not job.distributed:
                    raise
                if isinstance(err, ArgumentError):
                    job._state["failed"] = True  # every rank is here: meet at the end, after rank 0 has printed
                    if not job.is_main:
                        raise click.exceptions.Exit(err.exit_code) from None
                err.show()
                raise click.exceptions.Exit(err.exit_code) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def cli() -> None:
    """SANF-AD: semantics-aware normalizing flow anomaly detection (Ma, Lan et al., ICME 2023)."""


def _alpha_option(fn):
    return click.option("--alpha", type=FiniteFloat(0, 1, min_open=True, max_open=True), default=0.05,
                        help="Significance level of calibrated runs: an image is anomalous when its conformal "
                             "p-value is <= alpha, so on average (over the draw of the held-out rows) at most this "
                             "share of normal images is flagged.")(fn)


def _val_fraction_option(chosen_by: str):
    return click.option("--val-fraction", type=FiniteFloat(0, 1, max_open=True), default=0.0,
                        help=f"Hold out this fraction of the normal class's train rows (chosen by {chosen_by}): their "
                             "scores calibrate the run's p-values and decisions (predict, score), and the flows "
                             "log their loss per epoch (to choose --epochs without the test split).")


def _early_stop_option(fn):
    return click.option("--early-stop", is_flag=True,
                        help="Flows: stop after the first epoch whose mean train loss is below the held-out loss "
                             "(needs --val-fraction; --epochs/--steps are then the most). The held-out rows also "
                             "calibrate the run, so they took part in choosing its length; docs/results.md, "
                             "'Training length'.")(fn)


def _device_option(fn):
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                        help="Where to run; auto = CUDA when available.")(fn)


#: The options of ``extract``, by name; ``run`` takes all but ``--overwrite`` (it reuses an existing cache).
EXTRACT_OPTIONS = {
    "dataset": click.option("--dataset", required=True,
                            type=click.Choice(DATASET_CHOICES),
                            help="Dataset and protocol (see README)."),
    "category": click.option("--category", default=None,
                             help="MVTec AD category (a sub-folder of --data-root), or 'all' for one cache per "
                                  "category; --dataset mvtec only."),
    "layout": click.option("--layout", type=click.Choice(["classes", "good-defect"]), default="classes",
                           help="--dataset folder: class folders (one normal, the rest anomalous), or MVTec-style "
                                "train/good, test/good, test/<defect>."),
    "data-root": click.option("--data-root", type=NonEmptyPath(file_okay=False, path_type=str), default=None,
                              help="Folder holding the data; required for 'folder'; torchvision datasets default "
                                   "to ./data."),
    "no-download": click.option("--no-download", is_flag=True,
                                help="Never download; fail if the data is not under --data-root."),
    "backbone": click.option("--backbone", default="vit_base_patch16_384", help="Any timm model name."),
    "weights": click.option("--weights", default="auto",
                            help="'auto' (packaged weights for tf_efficientnet_lite0, else timm's hub), 'timm', or a "
                                 "state-dict file (.safetensors/.pth)."),
    "random-init": click.option("--random-init", is_flag=True,
                                help="Use a randomly initialised backbone (tests only)."),
    "patch-grid": click.option("--patch-grid", type=click.IntRange(min=0), default=8,
                               help="Average-pool the token grid to at most G x G; 0 keeps every token."),
    "layer": click.option("--layer", default="final",
                          help="Which layer the tokens come from: final (the model's final features, the paper's), "
                               "pre-activation (EfficientNets: the final features before their last activation) or "
                               "block-N (timm's feature_info entry N: a ViT's block N through the final norm, a "
                               "CNN's stage N)."),
    "img-size": click.option("--img-size", type=click.IntRange(min=1), default=None,
                             help="Input size override (pixels)."),
    "crop-pct": click.option("--crop-pct", type=FiniteFloat(0, 1, min_open=True), default=None,
                             help="Centre-crop fraction override (default: the model's pretrained config)."),
    "batch-size": click.option("--batch-size", type=click.IntRange(min=1), default=64,
                               help="Images per forward pass."),
    "num-workers": click.option("--num-workers", type=click.IntRange(min=0), default=2,
                                help="DataLoader decoding processes."),
    "device": _device_option,
    "precision": click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
                              help="Backbone forward precision (autocast)."),
    "dtype": click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float16",
                          help="Storage dtype of the cached features."),
    "cache-dir": click.option("--cache-dir", type=NonEmptyPath(file_okay=False, path_type=str),
                              default=DEFAULT_CACHE_DIR, help="Folder receiving the cache file."),
    "overwrite": click.option("--overwrite", is_flag=True,
                              help="Replace an existing cache of the same settings; discard an interrupted "
                                   "extraction of it."),
    "commit-every": click.option("--commit-every", type=click.IntRange(min=1), default=16,
                                 help="Batches per committed chunk: a killed run resumes from the last committed "
                                      "chunk."),
}


def _options(*names: str, exclude: tuple[str, ...] = ()):
    """Apply the named EXTRACT_OPTIONS (all when none are named) in order."""
    chosen = [v for k, v in EXTRACT_OPTIONS.items() if (not names or k in names) and k not in exclude]

    def apply(fn):
        for option in reversed(chosen):
            fn = option(fn)
        return fn

    return apply


@cli.command()
@_options()
@job_command
def extract(no_download: bool, job, **options) -> None:
    """Encode every image of a dataset once; write class tokens and patch tokens to HDF5.

    Work is committed in chunks; running the same command after an interruption resumes it. Under torchrun the
    chunks are shared among the ranks (see README, "Many GPUs, many nodes").
    """
    from extract.run import extract_categories

    extract_categories(download=not no_download, log=job.log(print), dist=job, **options)


@cli.command()
@click.argument("cache", type=NonEmptyPath(dir_okay=False, path_type=str))
@user_errors
def info(cache: str) -> None:
    """Print the attributes, per-split shapes and class counts of the cache file CACHE (.h5)."""
    from cache import FeatureCache

    with FeatureCache(cache) as fc:
        for key in sorted(fc.attrs):
            value = fc.attrs[key]
            click.echo(f"{key}: {json.dumps(value) if isinstance(value, (list, dict)) else value}")
        for split in ("train", "test"):
            group = fc.file[split]
            click.echo(f"[{split}] cls {group['cls'].shape}  patches {group['patches'].shape}  "
                       f"label {group['label'].shape}")
            counts = fc.class_counts(split)
            click.echo("  " + ", ".join(f"{name}: {n}" for name, n in counts.items()))
            fine = fc.split(split).fine_labels
            if fine is not None:
                used = len(set(fine.tolist()))
                click.echo(f"  fine labels: {used} of {len(fc.fine_class_names)} fine classes present")


_knn_k_option = click.option("--k", "knn_k", type=click.IntRange(1, 1000), default=2,
                             help="Neighbours averaged by the knn baseline (PANDA: 2).")


_steps_option = click.option(
    "--steps", type=click.IntRange(min=1), default=None,
    help="Train the flows for exactly this many optimiser steps instead of --epochs (the same amount of training "
         "whatever the number of train rows; docs/results.md, 'Training length').")


def _train_length(epochs: int, steps: int | None) -> dict:
    """TrainConfig's ``epochs``/``steps`` from the options; both given explicitly is refused (one would be ignored)."""
    ctx = click.get_current_context()
    if steps is not None and ctx.get_parameter_source("epochs") is not click.core.ParameterSource.DEFAULT:
        raise ArgumentError(f"--epochs and --steps exclude each other (a fit has one length); got --epochs {epochs} "
                         f"and --steps {steps}")
    return {"epochs": epochs, "steps": steps}


def _fit_options(fn):
    options = [
        click.option("--cache", type=NonEmptyPath(dir_okay=False, path_type=str), default=None,
                     help="Cache file; default: the only *.h5 in --cache-dir."),
        click.option("--cache-dir", type=NonEmptyPath(file_okay=False, path_type=str), default=DEFAULT_CACHE_DIR,
                     help="Folder searched for the cache when --cache is not given."),
        click.option("--normal", default="all",
                     help="Normal class: a class name, 'all', or an index (a class name wins)."),
        click.option("--runs-dir", type=NonEmptyPath(file_okay=False, path_type=str), default=DEFAULT_RUNS_DIR,
                     help="Folder receiving one run folder per fitted flow."),
        click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0,
                     help="Initialisation and batch-order seed."),
        click.option("--epochs", type=click.IntRange(min=1), default=TrainConfig.epochs,
                     help="Passes over the normal class's train rows."),
        _steps_option,
        _early_stop_option,
        click.option("--batch-size", type=click.IntRange(min=1), default=32, help="Samples per step (paper: 32)."),
        click.option("--lr", type=FiniteFloat(min=0, min_open=True), default=5e-5,
                     help="Adam learning rate (paper: 5e-5)."),
        click.option("--beta1", type=FiniteFloat(0, 1, max_open=True), default=0.8, help="Adam beta1 (paper: 0.8)."),
        click.option("--beta2", type=FiniteFloat(0, 1, max_open=True), default=0.8, help="Adam beta2 (paper: 0.8)."),
        click.option("--adam-eps", type=FiniteFloat(min=0, min_open=True), default=1e-4,
                     help="Adam epsilon (reference code: 1e-4)."),
        click.option("--weight-decay", type=FiniteFloat(min=0), default=1e-5,
                     help="Adam weight decay (paper: 1e-5)."),
        click.option("--blocks", type=click.IntRange(1, 256), default=4, help="K, flow layers."),
        click.option("--hidden", type=click.IntRange(1, 65536), default=1024, help="H, subnet width."),
        click.option("--heads", type=click.IntRange(1, 1024), default=4, help="Class-attention heads."),
        click.option("--clamp", type=FiniteFloat(min=0, min_open=True), default=3.0,
                     help="Bound c of the arctan soft clamp of the log-scales (docs/method.md eq. (8); the paper's alpha)."),
        click.option("--no-caff", is_flag=True,
                     help="MLP-only subnets (paper Table 5 ablation); the same as --method sanf-nocaff."),
        click.option("--method", type=click.Choice(["sanf", "sanf-nocaff", "knn", "gaussian"]), default=None,
                     help="Detector: the CAFF flow (default), its MLP-only ablation, or a baseline on the class "
                          "tokens: k-NN distance (L2 and cosine) or Ledoit-Wolf Mahalanobis distance."),
        _knn_k_option,
        click.option("--features", type=click.Choice(FEATURES_CHOICES), default=DEFAULT_FEATURES, help=_FEATURES_HELP),
        _val_fraction_option("--seed"),
        _device_option,
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@cli.command()
@_fit_options
@user_errors
def fit(cache, cache_dir, normal, runs_dir, seed, epochs, steps, early_stop, batch_size, lr, beta1, beta2, adam_eps,
        weight_decay, blocks, hidden, heads, clamp, no_caff, method, knn_k, features, device, val_fraction) -> None:
    """Train the CAFF flow (or a baseline) on the cached train rows of one normal class (or of each)."""
    from flow.experiments.fitting import find_cache, fit_cache

    train_config = TrainConfig(**_train_length(epochs, steps), early_stop=early_stop, batch_size=batch_size, lr=lr,
                               betas=(beta1, beta2), eps=adam_eps, weight_decay=weight_decay)
    flow_config = {"num_blocks": blocks, "hidden": hidden, "num_heads": heads, "alpha": clamp}
    if no_caff and method not in (None, "sanf-nocaff"):
        raise InputError(f"--no-caff means --method sanf-nocaff; got --method {method}")
    method = method or ("sanf-nocaff" if no_caff else "sanf")
    fit_cache(find_cache(cache, cache_dir), normal=normal, runs_dir=runs_dir, seed=seed, flow_config=flow_config,
              train_config=train_config, device=device, val_fraction=val_fraction, log=click.echo, method=method,
              baseline_params={"k": knn_k} if method == "knn" else {}, features=features)


@cli.command()
@click.option("--runs-dir", type=NonEmptyPath(file_okay=False, path_type=str), default=DEFAULT_RUNS_DIR,
              help="Folder of fitted runs; receives auroc.csv.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, help="Samples per forward pass.")
@_device_option
@_alpha_option
@user_errors
def score(runs_dir: str, batch_size: int, device: str, alpha: float) -> None:
    """Score the test split with every fitted run; write per-sample scores, <runs-dir>/auroc.csv and
    <runs-dir>/auroc_by_anomaly.csv (normal against each anomalous class, e.g. each MVTec AD defect type).

    For runs fitted with --val-fraction (calibrated), scores.csv also holds the conformal p-value and the
    decision at --alpha, and auroc.csv the realised false-alarm and detection rates on the test split."""
    from flow.experiments.report import auroc_table
    from flow.experiments.scoring import score_runs

    rows = score_runs(runs_dir=runs_dir, batch_size=batch_size, device=device, log=click.echo, alpha=alpha)
    click.echo(auroc_table(rows))
    click.echo(f"wrote {Path(runs_dir) / 'auroc.csv'} and {Path(runs_dir) / 'auroc_by_anomaly.csv'} (per anomalous "
               "class)")


@cli.command()
@click.argument("run_dir", metavar="RUN", type=NonEmptyPath(file_okay=False, exists=True, path_type=str))
@click.argument("paths", metavar="PATH...", nargs=-1, required=True, type=NonEmptyPath(exists=True, path_type=str))
@click.option("--out", type=NonEmptyPath(dir_okay=False, path_type=str), default=None,
              help="CSV to write; default: RUN/predictions.csv.")
@_alpha_option
@click.option("--onnx", "onnx_model", type=NonEmptyPath(dir_okay=False, exists=True, path_type=str), default=None,
              help="Run the prediction through this ONNX graph (from 'export' of RUN) with onnxruntime.")
@click.option("--weights", default=None, type=NonEmptyPath(dir_okay=False, path_type=str),
              help="The backbone's weights file, if it moved since extraction (its sha256 must match).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, help="Images per forward pass.")
@click.option("--num-workers", type=click.IntRange(min=0), default=2, help="DataLoader workers decoding images.")
@_device_option
@user_errors
def predict(run_dir, paths, out, alpha, onnx_model, weights, batch_size, num_workers, device) -> None:
    """Score new images with the fitted run RUN: one CSV row per image file (folders are searched recursively).

    Columns: path, score (the method's primary score: nll for the flows, cosine for knn, mahalanobis for
    gaussian), every score of the method, p_value and anomalous (runs fitted with --val-fraction: conformal
    p-value, and p_value <= --alpha), error (why a file could not be scored)."""
    from flow.deploy.predict import predict as predict_images

    summary = predict_images(run_dir, list(paths), out=out, alpha=alpha, batch_size=batch_size,
                             num_workers=num_workers, device=device, onnx=onnx_model, weights=weights, log=click.echo)
    click.echo(summary.line())


@cli.command()
@click.argument("run_dir", metavar="RUN", type=NonEmptyPath(file_okay=False, exists=True, path_type=str))
@click.option("--out", type=NonEmptyPath(dir_okay=False, path_type=str), required=True, help="The .onnx file to write.")
@_alpha_option
@click.option("--opset", type=click.IntRange(14, 21), default=17, help="ONNX opset version.")
@click.option("--check-images", multiple=True, type=NonEmptyPath(exists=True, path_type=str),
              help="Images (files or folders; up to 8 files used) to check onnxruntime against PyTorch on; "
                   "default: scikit-learn's two sample photographs. Repeatable.")
@click.option("--weights", default=None, type=NonEmptyPath(dir_okay=False, path_type=str),
              help="The backbone's weights file, if it moved since extraction (its sha256 must match).")
@user_errors
def export(run_dir, out, alpha, opset, check_images, weights) -> None:
    """Write the fitted run RUN as one ONNX graph: float32 images (B, 3, H, W) in [0, 1], resized and cropped to
    the run's input size -> every score, and p_value / anomalous for a calibrated run. Checked with onnxruntime
    against PyTorch right after export."""
    from flow.deploy.export import export_onnx

    export_onnx(run_dir, out, alpha=alpha, opset=opset, check_images=list(check_images) or None, weights=weights,
                log=click.echo)
    click.echo(f"wrote {out}")


def _comma_list(kind):
    """A click callback turning ``"a,b"`` into a list of ``kind`` (each checked), refusing an empty list."""

    def convert(ctx, param, value):
        items = [v.strip() for v in str(value).split(",") if v.strip()]
        if not items:
            raise click.BadParameter("give at least one value", ctx, param)
        out = []
        for item in items:
            try:
                out.append(kind(item))
            except ValueError as err:
                raise click.BadParameter(str(err), ctx, param) from None
        return list(dict.fromkeys(out))

    return convert


def _method(name: str) -> str:
    from flow.store.run_folder import METHODS

    if name not in METHODS:
        raise ValueError(f"{name!r} is not one of {', '.join(METHODS)}")
    return name


def _features(name: str) -> str:
    if name not in FEATURES_CHOICES:
        raise ValueError(f"{name!r} is not one of {', '.join(FEATURES_CHOICES)}")
    return name


def _bounded_int(low: int, high: int):
    def convert(text: str) -> int:
        if not text.isascii() or not text.isdigit() or not low <= int(text) <= high:
            raise ValueError(f"{text!r} is not an integer in {low}..{high}")
        return int(text)

    return convert


@cli.command()
@_options(exclude=("overwrite",))
@click.option("--normal", default="all", help="Normal class: a class name, 'all', or an index.")
@click.option("--methods", default="sanf,sanf-nocaff,knn,gaussian", callback=_comma_list(_method),
              help="Comma-separated methods (sanf, sanf-nocaff, knn, gaussian).")
@click.option("--seeds", default="0", callback=_comma_list(_bounded_int(0, 2**32 - 1)),
              help="Comma-separated seeds for the flows (the baselines are deterministic: fitted once, seed 0).")
@click.option("--epochs", type=click.IntRange(min=1), default=TrainConfig.epochs,
              help="Passes over the normal class's train rows (flows).")
@_steps_option
@click.option("--blocks", default="4", callback=_comma_list(_bounded_int(1, 256)),
              help="K, flow layers; several (e.g. 2,4,6,8: paper Table 7) sweep, each a row labelled K<K>-H<H>.")
@click.option("--hidden", default="1024", callback=_comma_list(_bounded_int(1, 65536)),
              help="H, subnet width; several sweep, each a labelled row.")
@_knn_k_option
@click.option("--features", default=DEFAULT_FEATURES, callback=_comma_list(_features),
              help=_FEATURES_HELP[:-1] + "; several (e.g. raw,ssqrt-l2) sweep, each a labelled row.")
@click.option("--runs-dir", type=NonEmptyPath(file_okay=False, path_type=str), default=DEFAULT_RUNS_DIR,
              help="Folder receiving the runs, auroc.csv, and <cache>__summary.csv / __report.md.")
@click.option("--refit", is_flag=True,
              help="Fit every run again; by default a run already fitted with the same cache, method, seed and "
                   "settings is kept, so an interrupted run resumes.")
@_val_fraction_option("each run's seed: the flows' --seeds, 0 for the baselines")
@_early_stop_option
@_alpha_option
@job_command
def run(no_download, normal, methods, seeds, epochs, steps, blocks, hidden, knn_k, features, runs_dir, refit,
        val_fraction, early_stop, alpha, job, **options) -> None:
    """Extract (only if the cache is missing), fit every method on every normal class, score, summarise.

    Writes <runs-dir>/<cache>__summary.csv (one row per method and score, one column per normal class,
    mean ± std over seeds), <runs-dir>/<cache>__report.md and <runs-dir>/<cache>__plots/. The flows use the
    paper's architecture and optimiser and this project's default epoch count. With --val-fraction every run is
    calibrated: p-values and decisions at --alpha in scores.csv, false-alarm and detection rates in auroc.csv, the
    decision threshold in the histograms. Under torchrun the extraction's chunks and then the fits are shared among
    the ranks; rank 0 scores and writes.
    """
    from extract.run import extract_categories
    from flow.experiments.sweep import fit_sweep

    train_config = TrainConfig(**_train_length(epochs, steps), early_stop=early_stop)
    try:  # before the extraction, which may take an hour
        train_config.check_held_out(val_fraction > 0)
    except ValueError as err:
        raise ArgumentError(str(err)) from None
    echo = job.log(click.echo)
    # one cache per MVTec AD category with --category all, else one
    caches = extract_categories(download=not no_download, skip_existing=True, log=echo, dist=job, **options)
    fitted, kept = fit_sweep(caches, normal=normal, methods=methods, seeds=seeds, features=features, blocks=blocks,
                              hidden=hidden, runs_dir=runs_dir, train_config=train_config, knn_k=knn_k,
                              device=options["device"], refit=refit, log=echo, dist=job, val_fraction=val_fraction)
    if job.is_main:
        _summarise(caches, fitted, kept, runs_dir, options["device"], alpha)


def _summarise(caches: list[Path], fitted: dict[Path, set[str]], kept: set[str], runs_dir: str,
               device: str, alpha: float, means: bool = False) -> None:
    """``run``'s and ``demo``'s last step: score every run under ``runs_dir``, write the summary, report and plots
    of the runs fitted or kept (``kept``: their names), print the AUROC table (and with ``means`` each method's mean)
    and the fit times (those of the report); ``alpha``: the significance level of the calibrated runs' decisions and
    histogram thresholds."""
    from flow.experiments.report import (
        KEPT,
        any_kept,
        auroc_table,
        fit_times,
        method_means,
        write_plots,
        write_report,
        write_summary_csv,
    )
    from flow.experiments.scoring import score_runs
    from flow.store.run_folder import read_run_record

    # score refreshes every run under --runs-dir (auroc.csv stays complete); the summaries are of this run's fits
    all_rows = score_runs(runs_dir=runs_dir, device=device, log=click.echo, alpha=alpha)
    written, records = [], []
    for cache in caches:
        rows = [r for r in all_rows if r["run"] in fitted.get(cache, set())]
        scored = [(Path(runs_dir) / name, {**read_run_record(Path(runs_dir) / name), KEPT: name in kept})
                  for name in dict.fromkeys(r["run"] for r in rows)]
        records += [r for _, r in scored]
        stem = Path(runs_dir) / Path(cache).stem
        summary = write_summary_csv(stem.with_name(stem.name + "__summary.csv"), rows)
        plots = write_plots(stem.with_name(stem.name + "__plots"), scored, alpha=alpha)
        report = write_report(stem.with_name(stem.name + "__report.md"), rows, [r for _, r in scored],
                              f"{rows[0]['dataset']} / {rows[0]['backbone']}" if rows else str(cache), plots)
        click.echo(auroc_table(rows))
        if means:
            click.echo(method_means(rows))
        written.append(f"{summary}, {report} ({len(plots)} plots)")
    times = fit_times(records)
    click.echo("fit wall time per method, the sum of its runs' training"
               + (" (kept: fitted before, their recorded time)" if any_kept(times) else "")
               + ": " + ", ".join(f"{m} {t.text()}" for m, t in times.items()))
    click.echo(f"wrote {'; '.join(written)} and {Path(runs_dir) / 'auroc.csv'}")


@cli.command()
@click.option("--cache-dir", type=NonEmptyPath(file_okay=False, path_type=str), default=DEFAULT_CACHE_DIR,
              help="Folder receiving (or holding) the digits cache.")
@click.option("--runs-dir", type=NonEmptyPath(file_okay=False, path_type=str), default=DEFAULT_RUNS_DIR,
              help="Folder receiving the fitted runs and auroc.csv.")
@click.option("--epochs", type=click.IntRange(min=1), default=TrainConfig.epochs,
              help="Passes over each digit's train rows.")
@_steps_option
@_device_option
@user_errors
def demo(cache_dir: str, runs_dir: str, epochs: int, steps: int | None, device: str) -> None:
    """The main job on the embedded default: digits, EfficientNet-Lite0 (packaged ImageNet weights).

    Extracts (unless the cache exists), fits a flow for every digit as normal class and the k-NN and Gaussian
    baselines on the same features (seconds), scores, prints the AUROC table with the mean of each method, and
    writes the summary, report and plots of ``run``. Needs no download.
    """
    from extract import extract_features
    from flow.detectors.calibration import DEFAULT_ALPHA
    from flow.experiments.fitting import fit_cache

    train_config = TrainConfig(**_train_length(epochs, steps))
    cache = extract_features(dataset="digits", backbone="tf_efficientnet_lite0", cache_dir=cache_dir,
                             device=device, num_workers=0, skip_existing=True, log=click.echo)
    outcomes = fit_cache(cache, normal="all", runs_dir=runs_dir, seed=0, train_config=train_config,
                         device=device, log=click.echo)  # the paper's flow and optimiser defaults
    for method in ("knn", "gaussian"):  # the honest comparison: the same cached features, seconds to fit
        outcomes += fit_cache(cache, normal="all", runs_dir=runs_dir, method=method, log=click.echo)
    _summarise([cache], {cache: {o.path.name for o in outcomes}}, set(), runs_dir, device, DEFAULT_ALPHA,
               means=True)


def main() -> None:
    """The command line. On the ranks other than 0 of a torchrun job, a usage error (the same command line on every
    rank) is left to rank 0 to print."""
    name = os.path.basename(sys.argv[0])
    if os.environ.get("RANK", "0") == "0" or os.environ.get("WORLD_SIZE", "1") == "1":
        cli(prog_name=name)
        return
    try:
        code = cli.main(prog_name=name, standalone_mode=False)
    except click.UsageError as err:
        time.sleep(1.0)  # let rank 0 print it before torchrun stops the job
        sys.exit(err.exit_code)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
