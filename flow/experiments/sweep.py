"""The fits of ``run``: every (cache, method, seed, feature transform, flow setting) asked for, fitted in one
process or shared among the ranks of a distributed job (each normal class a unit of work)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from cache import FeatureCache
from extract.distributed import SINGLE, DistContext
from flow.detectors.registry import FLOW_METHODS
from flow.detectors.transforms import AUTO, resolve_features
from flow.experiments.config import FitConfig
from flow.experiments.fitting import check_fit, fit_cache, flow_setting, normal_classes

#: The flow setting of the baselines' single row (they ignore it).
_BASELINE_SIZE = (4, 1024)


@dataclass(frozen=True)
class SweepFit:
    """One :func:`flow.experiments.fitting.fit_cache` call of a sweep: ``normal`` may be ``all`` (one call fits every
    class)."""

    cache: Path
    method: str
    seed: int
    features: str
    num_blocks: int
    hidden: int
    setting: str
    normal: str


def sweep_fits(caches: Sequence[Path], normal: str, methods: Sequence[str], seeds: Sequence[int],
               features: Sequence[str], blocks: Sequence[int], hidden: Sequence[int]) -> list[SweepFit]:
    """The fits of a sweep in the order one process fits them: cache, method, then seed x transform x setting
    (the baselines once, seed 0, without a setting). A setting label (``K<K>-H<H>``) only when several
    sizes are swept. ``auto`` is resolved for each cache (:func:`flow.detectors.transforms.resolve_features`) and a
    transform asked for twice that way is fitted once.

    Raises:
        CacheError: a cache cannot be read.
    """
    fits = []
    for cache in caches:
        transforms = list(dict.fromkeys(features))
        if AUTO in transforms:  # resolved per cache, so that auto,ssqrt-l2 is not one setting fitted twice
            with FeatureCache(cache) as fc:
                transforms = list(dict.fromkeys(resolve_features(f, fc.attrs) for f in transforms))
        for method in methods:
            sizes = [(k, h) for k in blocks for h in hidden] if method in FLOW_METHODS else [_BASELINE_SIZE]
            for seed, transform, (num_blocks, width) in itertools.product(
                    seeds if method in FLOW_METHODS else [0], transforms, sizes):
                fits.append(SweepFit(Path(cache), method, seed, transform, num_blocks, width,
                                     flow_setting(num_blocks, width) if len(sizes) > 1 else "", normal))
    return fits


def per_class(fits: Sequence[SweepFit]) -> list[SweepFit]:
    """Each fit split into one per normal class it covers (named by its class name, which ``--normal`` matches
    first), in the order of ``fits`` and then of the classes.

    Raises:
        CacheError: a cache cannot be read.
        ValueError: a bad ``normal`` (see :func:`flow.experiments.fitting.normal_classes`).
    """
    classes: dict[tuple[Path, str], list[str]] = {}
    out = []
    for fit in fits:
        if (fit.cache, fit.normal) not in classes:
            with FeatureCache(fit.cache) as fc:
                classes[fit.cache, fit.normal] = [fc.class_names[k] for k in normal_classes(fc, fit.normal)]
        out.extend(replace(fit, normal=name) for name in classes[fit.cache, fit.normal])
    return out


def fit_config(fit: SweepFit, base: FitConfig, k: int = 2) -> FitConfig:
    """The :class:`~flow.experiments.config.FitConfig` of one fit of a sweep: ``base`` (the options given once) with
    the fit's method, seed, transform, normal class and flow size (reset for a baseline, which has none), and ``k``
    for knn."""
    config = replace(base.for_method(fit.method, k=k), seed=fit.seed, transform=fit.features, normal=fit.normal)
    return replace(config, blocks=fit.num_blocks, hidden=fit.hidden) if config.is_flow else config


def fit_sweep(caches: Sequence[Path], base: FitConfig, methods: Sequence[str], seeds: Sequence[int],
              transforms: Sequence[str], blocks: Sequence[int], hidden: Sequence[int], runs_dir: str, device: str,
              refit: bool, k: int = 2, log: Callable[[str], None] = print, dist: DistContext = SINGLE,
              overwrite: bool = False) -> tuple[dict[Path, set[str]], set[str]]:
    """Fit every run of a sweep (see :func:`sweep_fits`); a run already fitted with the same cache, method, seed
    and settings is kept unless ``refit``. ``base.val_fraction`` > 0 holds out that share of each normal class's
    train rows in every run, flows and baselines alike, calibrating it (:func:`flow.experiments.fitting.fit_cache`).

    In a distributed job the fits are split per normal class (:func:`per_class`) and fit ``i`` goes to rank
    ``i mod world size``, on the rank's device; each flow is seeded alone, so the runs are those of one
    process up to float rounding. One progress bar on rank 0 counts the fits of every rank.

    Args:
        caches: the feature caches (one per MVTec AD category with ``--category all``).
        base: the options every fit shares (normal class, held-out fraction, training, k, ...).
        methods, seeds, transforms, blocks, hidden: the sweep's axes (the baselines: seed 0 and no flow size).
        k: the neighbours of ``knn``.
        runs_dir: where the run folders go.
        device: ``auto``, ``cpu`` or ``cuda``.
        refit: fit again what was fitted before with the same settings (replacing it).
        overwrite: replace runs fitted with other settings under the same names (refused otherwise).
        log: where to print status lines.
        dist: the distributed job, or :data:`extract.distributed.SINGLE`.

    Returns:
        ``(fitted, kept)`` on every rank: the run folder names fitted or kept, per cache, and the names of those
        kept (fitted before; their ``run.json`` holds the earlier fit's ``wall_time_s``).

    Raises:
        As :func:`flow.experiments.fitting.fit_cache`; in a distributed job :class:`extract.distributed.JobError`
        as described by :meth:`extract.distributed.DistContext.all_succeed`.
    """
    fitted: dict[Path, set[str]] = {}
    kept: set[str] = set()
    with dist.all_succeed():
        fits = sweep_fits(caches, base.normal, methods, seeds, transforms, blocks, hidden)
        for fit in fits:  # every fit's input checks before the first fit, not after hours of them
            check_fit(fit.cache, fit_config(fit, base, k), runs_dir, fit.setting, overwrite=overwrite)
        if dist.distributed:
            fits = per_class(fits)
            device = str(dist.device(device))
    mine = dist.share(fits)
    with dist.all_succeed(), dist.progress(len(fits), "fit", "fit") as step:
        for fit in mine:
            outcomes = fit_cache(fit.cache, fit_config(fit, base, k), runs_dir=runs_dir, device=device, log=log,
                                 setting=fit.setting, keep_existing=not refit, overwrite=overwrite,
                                 progress=not dist.distributed)
            fitted.setdefault(fit.cache, set()).update(o.path.name for o in outcomes)
            kept.update(o.path.name for o in outcomes if o.kept)
            step()
    if not dist.distributed:
        return fitted, kept
    merged_fitted: dict[Path, set[str]] = {}
    merged_kept: set[str] = set()
    for rank_fitted, rank_kept in dist.gather((fitted, kept)):
        for cache, names in rank_fitted.items():
            merged_fitted.setdefault(cache, set()).update(names)
        merged_kept.update(rank_kept)
    return merged_fitted, merged_kept
