#!/usr/bin/env python
"""SANF-AD command line: a thin layer over the public Python API (:mod:`flow.api`), one call per command.

Options are parsed here and handed to the API under the same names (``fit``'s are the fields of
:class:`flow.experiments.config.FitConfig`); the library's errors (:data:`flow.api.USER_ERRORS`) become one
``Error: ...`` line and exit code 2. The library is imported inside the commands, so ``--help`` needs no torch.
"""

from __future__ import annotations

import os

import click

from flow.cli import (
    ArgumentError,
    FiniteFloat,
    Group,
    InputError,
    NonEmptyPath,
    checked,
    comma_list,
    command,
    old_spellings,
    options,
    run,
)

#: extract.DATASETS, repeated so that --help does not import torch (a test checks they agree)
DATASET_CHOICES = ["cifar10", "cifar100", "stl10", "mnist", "svhn", "fashion-mnist", "cats-vs-dogs", "mvtec", "digits",
                   "folder"]
#: flow.detectors.transforms.FEATURE_CHOICES and the default, repeated for the same reason (a test checks they agree)
FEATURES_CHOICES = ["auto", "raw", "l2", "ssqrt-l2", "standardize", "pca-whiten"]
DEFAULT_FEATURES = "auto"
METHODS = ["sanf", "sanf-nocaff", "knn", "gaussian"]
#: flow.api.DEFAULT_CACHE_DIR / DEFAULT_RUNS_DIR (a test checks they agree)
DEFAULT_CACHE_DIR = "caches"
DEFAULT_RUNS_DIR = "runs"
_TRANSFORM_HELP = ("Feature transform of class and patch tokens before the detector: auto (ssqrt-l2 on a CNN's final "
                   "features, raw otherwise), raw (the paper's), l2, ssqrt-l2, standardize, pca-whiten (statistics "
                   "from the normal train rows; docs/results.md says what each does)")


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def cli() -> None:
    """SANF-AD: semantics-aware normalizing flow anomaly detection (Ma, Lan et al., ICME 2023)."""


_opt = click.option


FOLDER = NonEmptyPath(file_okay=False, path_type=str)
DEVICE = _opt("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", help="auto = CUDA if present.")
ALPHA = _opt("--alpha", type=FiniteFloat(0, 1, min_open=True, max_open=True), default=0.05,
             help="Significance level of calibrated runs: anomalous when the conformal p-value is <= alpha, so on "
                  "average (over the draw of the held-out rows) at most this share of normal images is flagged.")
VAL_FRACTION = _opt("--val-fraction", type=FiniteFloat(0, 1, max_open=True), default=0.0,
                    help="Hold out this share of the normal class's train rows (chosen by the seed): their scores "
                         "calibrate p-values and decisions; the flows log their loss on them per epoch.")
EARLY_STOP = _opt("--early-stop", is_flag=True, help="Flows: stop after the first epoch whose train loss is below "
                  "the held-out loss (needs --val-fraction; --epochs/--steps are then the most).")
EPOCHS = _opt("--epochs", type=click.IntRange(min=1), default=None, help="Flows: passes over the train rows "
              "[default: 16 unless --steps].")
STEPS = _opt("--steps", type=click.IntRange(min=1), default=None, help="Flows: exactly this many optimiser steps "
             "instead of --epochs (docs/results.md, 'Training length').")
K = _opt("--k", type=click.IntRange(1, 1000), default=2, help="Neighbours averaged by knn (PANDA: 2).")
FEATURES = _opt("--features", default=None, hidden=True, help="Old spelling of --transform.")
NORMAL = _opt("--normal", default="all", help="Normal class: a class name, 'all', or an index (a name wins).")
CACHE = _opt("--cache", type=NonEmptyPath(dir_okay=False, path_type=str), default=None,
             help="Cache file; default: the only *.h5 in --cache-dir.")
DATASET = _opt("--dataset", type=click.Choice(DATASET_CHOICES), help="Dataset and protocol (docs/datasets.md).")
EXTRACT = [  # the options of extract; sweep takes all but --overwrite, and --dataset only without --cache
    _opt("--dataset", required=True, type=click.Choice(DATASET_CHOICES), help="Dataset and protocol "
         "(docs/datasets.md)."),
    _opt("--category", default=None, help="MVTec AD category, or 'all' for one cache each (--dataset mvtec)."),
    _opt("--layout", type=click.Choice(["classes", "good-defect"]), default="classes",
         help="--dataset folder: class folders, or train/good, test/good, test/<defect>."),
    _opt("--data-root", type=FOLDER, default=None, help="Folder holding the data (required for folder)."),
    _opt("--no-download", is_flag=True, help="Never download; fail if the data is not under --data-root."),
    _opt("--backbone", default="vit_base_patch16_384", help="Any timm model name."),
    _opt("--weights", default="auto", help="'auto' (packaged weights for tf_efficientnet_lite0, else timm's hub), "
         "'timm', or a state-dict file (.safetensors/.pth)."),
    _opt("--random-init", is_flag=True, help="A randomly initialised backbone (tests only)."),
    _opt("--patch-grid", type=click.IntRange(min=0), default=8, help="Pool the token grid to at most G x G; 0 keeps "
         "every token."),
    _opt("--layer", default="final", help="final (the paper's), pre-activation (EfficientNets) or block-N (timm's "
         "feature_info entry N)."),
    _opt("--img-size", type=click.IntRange(min=1), default=None, help="Input size override (pixels)."),
    _opt("--train-per-class", type=click.IntRange(min=1), default=None, help="Keep a fixed subset of this many "
         "train images per class (seed 0, recorded in the cache) instead of all."),
    _opt("--crop-pct", type=FiniteFloat(0, 1, min_open=True), default=None, help="Centre-crop fraction override."),
    _opt("--batch-size", type=click.IntRange(min=1), default=64, help="Images per forward pass."),
    _opt("--num-workers", type=click.IntRange(min=0), default=2, help="DataLoader decoding processes."),
    DEVICE,
    _opt("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", help="Backbone precision."),
    _opt("--dtype", type=click.Choice(["float32", "float16"]), default="float16", help="Cache storage dtype."),
    _opt("--cache-dir", type=FOLDER, default=DEFAULT_CACHE_DIR, help="Folder of the cache files."),
    _opt("--overwrite", is_flag=True, help="Replace an existing cache of the same settings (and its interrupted "
         "extraction)."),
    _opt("--commit-every", type=click.IntRange(min=1), default=16, help="Batches per committed chunk (resume "
         "point)."),
]


@cli.command()
@options(*EXTRACT)
@command(job=True)
def extract(dataset, no_download, job, **opts) -> None:
    """Encode every image of a dataset once; write class tokens and patch tokens to HDF5 (resumable; under
    torchrun the chunks are shared among the ranks)."""
    from flow.api import extract as extract_caches

    extract_caches(dataset, opts.pop("cache_dir"), download=not no_download, log=job.log(print), dist=job,
                   skip_existing=False, **opts)


@cli.command()
@click.argument("cache", type=NonEmptyPath(dir_okay=False, path_type=str))
@command
def info(cache: str) -> None:
    """Print the attributes, per-split shapes and class counts of the cache file CACHE (.h5)."""
    from flow.api import describe_cache

    click.echo("\n".join(describe_cache(cache)))


@cli.command()
@options(CACHE, _opt("--cache-dir", type=FOLDER, default=DEFAULT_CACHE_DIR, help="Folder searched without --cache."),
         NORMAL, _opt("--runs-dir", type=FOLDER, default=DEFAULT_RUNS_DIR, help="Folder receiving the run folders."),
         _opt("--method", type=click.Choice(METHODS), default=None, help="The CAFF flow (default), its MLP-only "
              "ablation, or a baseline on the class tokens: k-NN (L2, cosine) or Ledoit-Wolf Mahalanobis."),
         _opt("--transform", type=click.Choice(FEATURES_CHOICES), default=None, help=_TRANSFORM_HELP + " [default: "
              "auto]."), FEATURES, VAL_FRACTION,
         _opt("--seed", type=click.IntRange(0, 2**32 - 1), default=0, help="Initialisation, batch order, held-out "
              "rows."),
         _opt("--blocks", type=click.IntRange(1, 256), default=4, help="K, flow layers."),
         _opt("--hidden", type=click.IntRange(1, 65536), default=1024, help="H, subnet width."),
         _opt("--heads", type=click.IntRange(1, 1024), default=4, help="Class-attention heads."),
         _opt("--clamp", type=FiniteFloat(min=0, min_open=True), default=3.0, help="Bound c of the soft clamp of the "
              "log-scales (docs/method.md eq. (8); the paper's alpha)."),
         EPOCHS, STEPS, EARLY_STOP,
         _opt("--batch-size", type=click.IntRange(min=1), default=32, help="Rows per step (paper: 32)."),
         _opt("--lr", type=FiniteFloat(min=0, min_open=True), default=5e-5, help="Adam learning rate."),
         _opt("--beta1", type=FiniteFloat(0, 1, max_open=True), default=0.8, help="Adam beta1."),
         _opt("--beta2", type=FiniteFloat(0, 1, max_open=True), default=0.8, help="Adam beta2."),
         _opt("--adam-eps", type=FiniteFloat(min=0, min_open=True), default=1e-4, help="Adam epsilon."),
         _opt("--weight-decay", type=FiniteFloat(min=0), default=1e-5, help="Adam weight decay."), K,
         _opt("--no-caff", is_flag=True, hidden=True, help="Old spelling of --method sanf-nocaff."),
         _opt("--overwrite", is_flag=True, help="Replace run folders that hold runs fitted with other settings."),
         DEVICE)
@command
def fit(cache, cache_dir, runs_dir, transform, features, no_caff, method, overwrite, device, **fields) -> None:
    """Fit the CAFF flow (or a baseline) on the cached train rows of one normal class (or of each)."""
    from flow.api import find_cache
    from flow.api import fit as fit_runs

    transform, method = old_spellings(transform, features, no_caff, method)
    from flow.experiments.config import FitConfig

    config = checked(FitConfig, transform=transform or DEFAULT_FEATURES, method=method, **fields)
    fit_runs(find_cache(cache, cache_dir), config, runs_dir, device=device, overwrite=overwrite, log=click.echo)


@cli.command()
@options(_opt("--runs-dir", type=FOLDER, default=DEFAULT_RUNS_DIR, help="Folder of run folders; gets auroc.csv."),
         _opt("--batch-size", type=click.IntRange(min=1), default=256, help="Rows per forward pass."), DEVICE, ALPHA)
@command
def score(runs_dir: str, batch_size: int, device: str, alpha: float) -> None:
    """Score the test split with every run folder: scores.csv per run, auroc.csv and auroc_by_anomaly.csv (normal
    against each anomalous class); calibrated runs add p-values, decisions and the realised false-alarm rate."""
    from flow.api import score as score_runs
    from flow.experiments.report import auroc_table

    click.echo(auroc_table(score_runs(runs_dir, alpha=alpha, batch_size=batch_size, device=device, log=click.echo)))
    click.echo(f"wrote {os.path.join(runs_dir, 'auroc.csv')} and {os.path.join(runs_dir, 'auroc_by_anomaly.csv')} "
               "(per anomalous class)")


WEIGHTS = _opt("--weights", default=None, type=NonEmptyPath(dir_okay=False, path_type=str),
               help="The backbone's weights file, if it moved since extraction (sha256 checked).")


@cli.command()
@click.argument("run_dir", metavar="RUN", type=NonEmptyPath(file_okay=False, exists=True, path_type=str))
@click.argument("paths", metavar="PATH...", nargs=-1, required=True, type=NonEmptyPath(exists=True, path_type=str))
@options(_opt("--out", type=NonEmptyPath(dir_okay=False, path_type=str), default=None,
              help="CSV to write; default: RUN/predictions.csv."), ALPHA,
         _opt("--onnx", type=NonEmptyPath(dir_okay=False, exists=True, path_type=str), default=None,
              help="Predict through this ONNX graph (from 'export' of RUN) with onnxruntime."), WEIGHTS,
         _opt("--batch-size", type=click.IntRange(min=1), default=64, help="Images per forward pass."),
         _opt("--num-workers", type=click.IntRange(min=0), default=2, help="DataLoader decoding processes."), DEVICE)
@command
def predict(run_dir, paths, **opts) -> None:
    """Score new images with the run folder RUN: one CSV row per image file (folders searched recursively): path,
    score (the primary score), every score, p_value and anomalous (calibrated runs), error."""
    from flow.api import predict_files

    click.echo(predict_files(run_dir, list(paths), log=click.echo, **opts).line())


@cli.command()
@click.argument("run_dir", metavar="RUN", type=NonEmptyPath(file_okay=False, exists=True, path_type=str))
@options(_opt("--out", type=NonEmptyPath(dir_okay=False, path_type=str), required=True, help="The .onnx file."),
         ALPHA, _opt("--opset", type=click.IntRange(14, 21), default=17, help="ONNX opset version."),
         _opt("--check-images", multiple=True, type=NonEmptyPath(exists=True, path_type=str),
              help="Images (files or folders; up to 8 used) to check onnxruntime against PyTorch on; default: "
                   "scikit-learn's two sample photographs. Repeatable."), WEIGHTS)
@command
def export(run_dir, out, check_images, **opts) -> None:
    """Write the run folder RUN as one ONNX graph: float32 images (B, 3, H, W) in [0, 1] -> every score, and
    p_value / anomalous for a calibrated run; checked with onnxruntime against PyTorch."""
    from flow.api import export as export_run

    export_run(run_dir, out, check_images=list(check_images) or None, log=click.echo, **opts)
    click.echo(f"wrote {out}")


@cli.command()
@options(DATASET, *EXTRACT[1:-2], EXTRACT[-1], CACHE, NORMAL,
         _opt("--methods", default=",".join(METHODS), callback=comma_list(METHODS), help="Comma-separated."),
         _opt("--seeds", default="0", callback=comma_list(low=0, high=2**32 - 1),
              help="Flows' seeds (the baselines: once, seed 0)."),
         EPOCHS, STEPS,
         _opt("--blocks", default="4", callback=comma_list(low=1, high=256),
              help="K; several (2,4,6,8: Table 7) sweep."),
         _opt("--hidden", default="1024", callback=comma_list(low=1, high=65536), help="H; several sweep."), K,
         _opt("--transform", default=None, callback=comma_list(FEATURES_CHOICES),
              help=_TRANSFORM_HELP + "; several sweep [default: auto]."), FEATURES,
         _opt("--runs-dir", type=FOLDER, default=DEFAULT_RUNS_DIR, help="Run folders, auroc.csv, summary, report."),
         _opt("--refit", is_flag=True, help="Fit again what was fitted with the same settings (kept otherwise)."),
         _opt("--overwrite", is_flag=True, help="Replace runs fitted with other settings under the same names."),
         VAL_FRACTION, EARLY_STOP, ALPHA)
@command(job=True)
def sweep(dataset, no_download, cache, normal, methods, seeds, epochs, steps, blocks, hidden, k, transform, features,
          runs_dir, refit, overwrite, val_fraction, early_stop, alpha, device, job, **extract_options) -> None:
    """Extract (unless --cache is given or the cache exists), fit every method x seed x transform x flow size on
    every normal class, score, and write <runs-dir>/<cache>__summary.csv (mean ± std over seeds), __report.md and
    __plots/. Resumable: runs fitted before with the same settings are kept. Under torchrun the chunks and then the
    fits are shared among the ranks; rank 0 scores and writes."""
    from flow.api import sweep as run_sweep
    from flow.experiments.config import sweep_base

    given = [name for name in extract_options if click.get_current_context().get_parameter_source(name)
             is click.core.ParameterSource.COMMANDLINE] + (["no_download"] if no_download else [])
    if cache is not None and given:  # nothing is extracted from an existing cache
        raise ArgumentError(f"--{given[0].replace('_', '-')} sets the extraction; with --cache nothing is extracted")
    transform, _ = old_spellings(transform, features and comma_list(FEATURES_CHOICES)(None, None, features))
    base = checked(sweep_base, methods, k, seeds, blocks, hidden, normal=normal, val_fraction=val_fraction,
                   epochs=epochs, steps=steps, early_stop=early_stop)
    run_sweep(base, cache=cache, methods=methods, seeds=seeds, transforms=transform or [DEFAULT_FEATURES], k=k,
              blocks=blocks, hidden=hidden, runs_dir=runs_dir, refit=refit, overwrite=overwrite, alpha=alpha,
              device=device, log=job.log(click.echo), dist=job, dataset=dataset, download=not no_download,
              **extract_options)


@cli.command()
@click.argument("run_dir", metavar="RUN", type=NonEmptyPath(file_okay=False, exists=True, path_type=str))
@options(_opt("--onnx", type=NonEmptyPath(dir_okay=False, exists=True, path_type=str), default=None,
              help="Serve through this ONNX graph (from 'export' of RUN) with onnxruntime."),
         _opt("--host", default="127.0.0.1", help="Interface to bind; 0.0.0.0 for every interface."),
         _opt("--port", type=click.IntRange(1, 65535), default=8000, help="TCP port."), ALPHA,
         _opt("--max-batch", type=click.IntRange(1, 4096), default=32, help="Images gathered into one forward."),
         _opt("--max-upload-mb", type=FiniteFloat(min=0, min_open=True), default=20.0, help="Largest file, MiB."),
         _opt("--token", default=None, envvar="SANF_AD_TOKEN", show_envvar=True,
              help="Require 'Authorization: Bearer TOKEN' on /predict and /model."), WEIGHTS, DEVICE)
@command
def serve(run_dir, **opts) -> None:
    """Serve the run folder RUN over HTTP: POST /predict (images -> the fields of predict's rows), GET /health,
    /model, / (a page to drop images on) and /docs (docs/serving.md)."""
    from flow.api import serve as serve_run

    if opts["token"] is None and "SANF_AD_TOKEN" in os.environ:  # click reads an empty variable as unset
        raise ArgumentError("--token must not be empty; got SANF_AD_TOKEN='' (unset it to serve without a token)")
    serve_run(run_dir, log=click.echo, **opts)


_OTHER_DATASETS = "Tables 3 and 4 are Table 2 on other datasets: --dataset cifar100, cats-vs-dogs, stl10 or mvtec"


@cli.command()
@options(_opt("--tables", default="2,5,6,7", callback=comma_list(["2", "5", "6", "7"], hints={
              "3": _OTHER_DATASETS, "4": _OTHER_DATASETS}), help=f"Comma-separated. {_OTHER_DATASETS}."),
         _opt("--scale", type=click.Choice(["quick", "cpu", "paper"]), default="quick", help="quick: digits, minutes; "
              "cpu: CIFAR-10 with EfficientNet-Lite0, hours; paper: ViT-L/16, a GPU (docs/paper_tables.md)."),
         _opt("--seeds", default=None, callback=comma_list(low=0, high=2**32 - 1),
              help="The flows' seeds [default: the scale's: quick 0,1; cpu and paper 0,1,2]."),
         _opt("--out", type=FOLDER, required=True, help="Folder of tables.md, table<N>.csv and fits.csv (resumed)."),
         DATASET, *EXTRACT[1:-2], CACHE, NORMAL, EPOCHS, STEPS,
         _opt("--tables-only", is_flag=True, help="Fit nothing: write the tables of what <out>/fits.csv holds."),
         _opt("--keep-runs/--no-keep-runs", default=True, show_default=True,
              help="Keep each fit's run folder (0.1-0.5 GB per flow); --no-keep-runs removes it once its AUROCs are "
                   "in fits.csv."))
@command(job=True)
def reproduce(tables, scale, seeds, out, cache, normal, epochs, steps, tables_only, keep_runs, device, job,
              **extract_options) -> None:
    """The paper's tables 2 (per class), 5 (CAFF ablation), 6 (size) and 7 (coupling blocks): extract once (unless
    --cache), fit and score what each needs, write <out>/tables.md and table<N>.csv beside the paper's numbers.
    Killed, the same command resumes: finished fits are reused, never fitted again."""
    from flow.api import reproduce as reproduce_tables
    from flow.experiments.config import FitConfig

    source = click.get_current_context().get_parameter_source
    given = {name: value for name, value in extract_options.items() if name != "no_download"
             and source(name) is click.core.ParameterSource.COMMANDLINE}
    if extract_options["no_download"]:
        given["download"] = False
    if cache is not None and given:
        option = {"download": "no-download"}.get(next(iter(given)), next(iter(given))).replace("_", "-")
        raise ArgumentError(f"--{option} sets the extraction; with --cache nothing is extracted")
    checked(FitConfig, epochs=epochs, steps=steps)
    done = reproduce_tables(out, [int(t) for t in tables], scale, seeds=seeds, cache=cache, normal=normal,
                            epochs=epochs, steps=steps, device=device, log=job.log(click.echo), dist=job,
                            fit=not tables_only, keep_runs=keep_runs, **given)
    with job.all_succeed():  # failed fits: rank 0 says so, every rank exits 2
        if job.is_main:
            click.echo(f"{done.fitted} fits fitted, {done.reused} reused; wall time: "
                       + ", ".join(f"{k} {v:.0f} s" for k, v in done.seconds.items()))
            click.echo("wrote " + ", ".join(str(p) for p in done.files))
            if done.failed:
                raise InputError(f"{len(done.failed)} fits failed and are left out of the tables (first: "
                                 f"{done.failed[0]}); the same command tries them again")


#: the extraction options each --scale sets (flow.experiments.reproduce.SCALES; a test checks they agree): their
#: defaults in reproduce --help are the scale's, not extract's
SCALE_SET = ("dataset", "backbone", "weights", "patch_grid", "train_per_class", "num_workers")
for _param in reproduce.params:
    if _param.name in SCALE_SET:
        _param.show_default = False
        _param.help += " [default: the --scale's, docs/paper_tables.md 'Scales']"


@cli.command()
@options(_opt("--cache-dir", type=FOLDER, default=DEFAULT_CACHE_DIR, help="Folder of the digits cache."),
         _opt("--runs-dir", type=FOLDER, default=DEFAULT_RUNS_DIR, help="Folder receiving the run folders."),
         EPOCHS, STEPS, DEVICE)
@command
def demo(cache_dir: str, runs_dir: str, epochs: int | None, steps: int | None, device: str) -> None:
    """The main job on the embedded default: digits, EfficientNet-Lite0 (packaged ImageNet weights, no download):
    a flow per digit as normal class and the k-NN and Gaussian baselines on the same features, scored, the AUROC
    table with each method's mean, and the sweep's summary, report and plots."""
    from flow.api import demo as run_demo
    from flow.experiments.config import FitConfig

    checked(FitConfig, epochs=epochs, steps=steps)  # refused here, before the extraction
    run_demo(cache_dir, runs_dir, epochs=epochs, steps=steps, device=device, log=click.echo)


def main() -> None:
    """The ``sanf-ad`` command (also ``python pipeline.py``)."""
    run(cli)


if __name__ == "__main__":
    main()
