"""The extract stage: encode every image of a dataset once and write the feature cache."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import timm
import torch
from torch.utils.data import DataLoader
from torchvision import transforms
from tqdm.auto import tqdm

from cache import CacheError, ChunkStore, FeatureCache
from cache.chunks import describe_need, human_bytes, remove_finished_leftovers

from .backbone import DEFAULT_LAYER, LEGACY_SEMANTIC_VECTORS, TokenEncoder, create_backbone, parse_layer
from .datasets import DOWNLOADED, ToRGB, build_dataset, check_readable, unchecked_files
from .distributed import SINGLE, DistContext

#: The seed of the train subset drawn with ``train_per_class`` (fixed, so that a subset is named by its size alone).
TRAIN_SUBSET_SEED = 0
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExtractionError(RuntimeError):
    """The backbone produced non-finite features (the message names the sample)."""


def resolve_preprocessing(model: torch.nn.Module, img_size: int | None = None,
                          crop_pct: float | None = None) -> dict:
    """The model's pretrained data config (``timm.data.resolve_model_data_config``) with overrides.

    Returns:
        A dict with ``input_size`` (C, H, W) in pixels, ``mean``, ``std``, ``interpolation``,
        ``crop_pct`` and ``crop_mode``.
    """
    config = dict(timm.data.resolve_model_data_config(model))
    if img_size is not None:
        config["input_size"] = (3, img_size, img_size)
    if crop_pct is not None:
        config["crop_pct"] = crop_pct
    return config


def build_transform(config: dict) -> Callable:
    """PIL image -> normalised (3, H, W) tensor: grayscale to RGB, then timm's eval transform for ``config``."""
    return transforms.Compose([ToRGB(), timm.data.create_transform(**config, is_training=False)])


def cache_file_name(dataset: str, backbone: str, settings: dict) -> str:
    """``<dataset>__<backbone>__<H>px__g<G>__<hash>.h5``: one file per dataset, backbone, preprocessing and grid.

    The 8-hex hash covers every setting that changes the stored features (weights, preprocessing,
    precision, storage dtype, patch grid, layer, and the kind of semantic vector where format 1 stored
    another), so two different extractions never share a name.
    """
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    size = settings["input_size"][-1]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{dataset}__{backbone}")
    return f"{safe}__{size}px__g{settings['patch_grid_arg']}__{digest}.h5"


def non_finite_rows(cls: np.ndarray, patches: np.ndarray) -> np.ndarray:
    """(N,) bool: the images whose class token (N, D) or patch tokens (N, P, D) hold a NaN or infinite value."""
    return ~np.isfinite(cls).all(axis=1) | ~np.isfinite(patches).all(axis=(1, 2))


def _check_storage_range(stored: tuple[np.ndarray, np.ndarray], cls: np.ndarray, patches: np.ndarray, dtype: str,
                         split: str, at: int, sample_ids: list[str]) -> None:
    """Refuse a batch whose finite float32 features became infinite in the storage dtype (float16 holds
    |x| <= 65504), before its chunk is committed.

    Raises:
        ExtractionError: names the first such image, the largest magnitude, and ``--dtype float32``.
    """
    over = non_finite_rows(*stored)
    if not over.any():
        return
    first = at + int(np.flatnonzero(over)[0])
    largest = max(float(np.abs(cls).max()), float(np.abs(patches).max()))
    raise ExtractionError(f"the features of {int(over.sum())} images exceed the range of --dtype {dtype} (largest "
                          f"|value| {largest:.4g}; {dtype} holds up to {float(np.finfo(dtype).max):.6g}), first "
                          f"{sample_ids[first]!r} ({split} row {first}); use --dtype float32")


def extract_features(dataset: str = "digits", data_root: str | None = None, download: bool = True,
                     backbone: str = "vit_base_patch16_384", weights: str = "auto", random_init: bool = False,
                     patch_grid: int = 8, img_size: int | None = None, crop_pct: float | None = None,
                     batch_size: int = 64, num_workers: int = 2, device: str = "auto", precision: str = "fp32",
                     dtype: str = "float16", cache_dir: str = "cache", overwrite: bool = False,
                     skip_existing: bool = False, commit_every: int = 16, progress: bool = True,
                     category: str | None = None, layout: str = "classes", layer: str = DEFAULT_LAYER,
                     train_per_class: int | None = None, log: Callable[[str], None] = print,
                     dist: DistContext = SINGLE) -> Path:
    """Encode every train and test image of a dataset once and write one HDF5 cache (docs/method.md section 2).

    In a distributed job (``dist``, see :mod:`extract.distributed`) every rank builds the same dataset, backbone
    and plan; rank 0 alone locks the cache and lists the chunks still to encode, chunk ``i`` of that list is
    encoded and committed by rank ``i mod world size``, and rank 0 assembles the cache once every rank is done.
    An error on any rank stops every rank (the committed chunks stay for a resume, at any world size); rank 0
    raises it, the others raise a silent :class:`extract.distributed.JobError`.

    Args:
        dataset: one of :data:`extract.datasets.DATASETS`.
        data_root: folder holding the data (see :func:`extract.datasets.build_dataset`).
        download: let torchvision download missing data.
        backbone: timm model name.
        weights: ``auto``, ``timm`` or a state-dict file (see :func:`extract.backbone.create_backbone`).
        random_init: randomly initialised backbone (tests only).
        patch_grid: pool the token grid to at most G x G; 0 keeps all tokens.
        img_size: input size override in pixels.
        crop_pct: centre-crop fraction override (timm's ``crop_pct``).
        batch_size: images per forward pass.
        num_workers: DataLoader worker processes decoding images.
        device: ``auto``, ``cpu`` or ``cuda``.
        precision: backbone forward precision, ``fp32``, ``bf16`` or ``fp16`` (autocast).
        dtype: storage dtype, ``float32`` or ``float16``.
        cache_dir: folder receiving the cache file.
        overwrite: replace an existing cache of the same settings.
        skip_existing: if a complete cache of the same settings exists, return it without encoding.
        commit_every: batches per committed chunk; a killed run loses at most this many batches, and a
            chunk is held in memory until committed. A resumed run must use the same value and batch size.
        progress: show progress bars.
        category: the MVTec AD category (``dataset="mvtec"``; see :func:`extract_categories` for ``all``).
        layout: ``classes`` or ``good-defect`` (``dataset="folder"``).
        layer: which layer the tokens come from: ``final`` (the paper's), ``pre-activation`` or ``block-N``
            (see :class:`extract.backbone.TokenEncoder`); recorded as the attribute ``layer`` and in the name's hash.
        train_per_class: keep a fixed subset of this many train images per class, drawn with seed
            :data:`TRAIN_SUBSET_SEED` (:meth:`extract.datasets.DatasetSource.take_train_subset`); recorded as the
            attributes ``train_per_class`` and ``train_subset_seed`` and in the name's hash. None: every image.
        log: where to print status lines (rank 0 alone prints them).
        dist: this process's place in a distributed job; default one process.

    Returns:
        Path of the finished cache (on every rank). Its ``extract_seconds`` sums the encoding time of every
        chunk, so over several ranks it is device-seconds, and ``images_per_second`` is per device.

    Raises:
        DatasetError, BackboneError, CacheError: bad input (see those types); CacheError also when another
            process is extracting the same cache or an interrupted extraction of it used other settings, when
            ``cache_dir`` has less free space than the rest of the extraction needs (checked by rank 0 before
            any image is encoded: about twice the cache's size, chunks plus assembly), and when the disk fills
            all the same (the committed chunks are kept: the same call resumes).
        ExtractionError: non-finite backbone output.
        ImageReadError: an image file cannot be decoded: found before encoding for image-folder trees (every
            unreadable file of the chunks to encode is named), else when it is reached.
        JobError: in a distributed job, on ranks other than 0, or on rank 0 for another rank's error.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    say = log if dist.is_main else _quiet  # the setup lines, once per job
    finished: Path | None = None
    todo: list[tuple[str, int, int]] = []  # (split, start, stop) of every chunk to encode, from rank 0
    if dist.distributed and download and dataset in DOWNLOADED:
        # the ranks share --data-root: rank 0 downloads what is missing, alone, while the others wait (several
        # downloads into one folder corrupt it); an error of it comes again below, on every rank
        if dist.is_main:
            with contextlib.suppress(Exception):
                build_dataset(dataset, data_root, True, transform=None, category=category, layout=layout)
        dist.gather(None)
    with contextlib.ExitStack() as stack:
        with dist.all_succeed():  # every rank sets up alike; rank 0 alone locks the cache and reads its state
            dev = dist.device(device)
            parse_layer(layer)  # a malformed value before the data is indexed
            source = build_dataset(dataset, data_root, download, transform=None, category=category,
                                   layout=layout)  # data errors before the backbone
            if train_per_class is not None:
                source.take_train_subset(train_per_class, TRAIN_SUBSET_SEED)
            dataset = source.name  # mvtec-<category>: one cache per category
            model, loaded = create_backbone(backbone, weights=weights, random_init=random_init, img_size=img_size)
            encoder = TokenEncoder(model, patch_grid=patch_grid, layer=layer).to(dev)
            config = resolve_preprocessing(model, img_size, crop_pct)
            source.set_transform(build_transform(config))
            say(f"dataset {dataset}: {source.description}; "
                + ", ".join(f"{s} {len(v.sample_ids)} images" for s, v in source.splits.items()))
            if source.skipped_files:
                shown = ", ".join(source.skipped_files[:5]) + (", ..." if len(source.skipped_files) > 5 else "")
                say(f"skipped {len(source.skipped_files)} files that are not readable images: {shown}")
            say(f"backbone {backbone} ({'final features' if layer == DEFAULT_LAYER else 'layer ' + layer}): "
                f"weights {loaded.source}; input {config['input_size'][1]}x{config['input_size'][2]} px, "
                f"{config['interpolation']}, crop_pct {config['crop_pct']}; {precision} forward, {dtype} storage, "
                f"{dev}" + (f" on rank 0 of {dist.world_size} ranks" if dist.distributed else ""))
            settings = {
                "weights": loaded.source, "weights_sha256": loaded.sha256, "input_size": list(config["input_size"]),
                "mean": list(config["mean"]), "std": list(config["std"]), "interpolation": config["interpolation"],
                "crop_pct": config["crop_pct"], "crop_mode": config.get("crop_mode", "center"),
                "precision": precision, "dtype": dtype, "patch_grid_arg": patch_grid,
                "data_source": source.description,
            }
            if layer != DEFAULT_LAYER:  # in the hash only when not the default: older caches keep their name
                settings["layer"] = layer
            if train_per_class is not None:  # likewise
                settings["train_per_class"] = train_per_class
                settings["train_subset_seed"] = TRAIN_SUBSET_SEED
            if encoder.semantic_vector not in LEGACY_SEMANTIC_VECTORS:  # a kind format 1 did not store
                settings["semantic_vector"] = encoder.semantic_vector
            path = Path(cache_dir) / cache_file_name(dataset, backbone, settings)
            if dist.is_main and skip_existing and not overwrite and path.exists():
                _check_same_images(path, source)
                say(f"using the existing cache {path}")
                finished = path
            else:
                autocast = (torch.autocast(device_type=dev.type, dtype=PRECISIONS[precision])
                            if PRECISIONS[precision] is not None else contextlib.nullcontext())
                for split, part in source.splits.items():
                    if not part.sample_ids:
                        raise ExtractionError(f"split {split} of {dataset} holds no images")
                # no world size in the plan: a job resumes at any number of ranks
                plan = {
                    "dataset": dataset, "backbone": backbone, "settings": settings, "batch_size": batch_size,
                    "chunk_rows": batch_size * commit_every,
                    "splits": {split: {"num_rows": len(part.sample_ids),
                                       "sample_ids_sha256": hashlib.sha256(
                                           "\n".join(part.sample_ids).encode()).hexdigest()}
                               for split, part in source.splits.items()},
                }
                if dist.is_main and not overwrite and remove_finished_leftovers(path, plan):
                    say(f"the cache {path} is complete: an earlier run of this command finished it (its leftover "
                        "work folder was removed)")
                    finished = path
                elif dist.is_main:
                    store = stack.enter_context(ChunkStore(path, plan, overwrite=overwrite, log=log))
                    # listed once, here: a rank listing the folder itself could see another rank's fresh commits
                    todo = [(split, a, b) for split in source.splits for a, b in store.pending(split)]
                    # rank 0 alone, before the work is shared: a refusal here stops every rank before any encoding
                    _check_free_space(cache_dir, store, source, encoder, config, dev, dtype)
        finished, todo = dist.broadcast((finished, todo))
        if finished is not None:
            return finished
        with dist.all_succeed():  # after rank 0 made the work folder: the others join it
            if not dist.is_main:
                store = stack.enter_context(ChunkStore(path, plan, overwrite=overwrite, log=log, follower=True))
        total, start = 0, time.perf_counter()
        mine = dist.share(todo)  # chunk i of the list -> rank i mod world size
        with dist.all_succeed():  # each rank decodes the images it is to encode before any is encoded
            _check_images(source, store, todo, mine, progress=progress and not dist.distributed)
        with dist.all_succeed(), dist.progress(len(todo), "extract", "chunk", enabled=progress) as step:
            for split, part in source.splits.items():
                total += _encode_chunks(store, split, part, [(a, b) for s, a, b in mine if s == split], encoder,
                                        dev, autocast, dtype, batch_size, num_workers,
                                        progress=progress and not dist.distributed, on_commit=step)
        total = sum(dist.gather(total))
        final = None
        with dist.all_succeed():
            if dist.is_main:
                elapsed = time.perf_counter() - start
                final = _assemble(store, source, encoder, loaded, config, dataset, backbone, layer, precision, dtype,
                                  train_per_class)
        final = dist.broadcast(final)
    if dist.is_main:
        log(f"encoded {total} images in {elapsed:.1f} s ({total / max(elapsed, 1e-9):.1f} images/s) -> {final}")
    return final


def _check_images(source, store: ChunkStore, todo: list[tuple[str, int, int]], mine: list[tuple[str, int, int]],
                  progress: bool) -> None:
    """Decode the image files of this rank's chunks (``mine``, of the job's ``todo``) before encoding any (see
    :func:`extract.datasets.check_readable`), so that every unreadable one is named at once, not one per run.

    Raises:
        ImageReadError: an image file cannot be read.
    """
    files = {split: unchecked_files(part.dataset) for split, part in source.splits.items()}
    resumed = len(todo) < sum(len(store.chunks(split)) for split in store.splits)
    check_readable([path for split, a, b in mine for path in files[split][a:b]], progress=progress, resumed=resumed)


def _feature_shapes(encoder: TokenEncoder, input_size: tuple[int, int, int] | list[int],
                   dev: torch.device) -> tuple[int, int]:
    """``(D, P)``: channels and pooled patch tokens per image that ``encoder`` gives, from one blank image.

    Args:
        encoder: the extraction's encoder (on ``dev``).
        input_size: (3, H, W) in pixels, the preprocessed image size.
        dev: the encoder's device.
    """
    with torch.inference_mode():
        cls, patches = encoder(torch.zeros(1, *input_size, device=dev))
    return int(cls.shape[1]), int(patches.shape[1])


def _check_free_space(cache_dir: str, store: ChunkStore, source, encoder: TokenEncoder, config: dict,
                      dev: torch.device, dtype: str) -> None:
    """Refuse to encode when the cache's folder lacks the free space the rest of the extraction needs: the
    chunks still to commit plus the assembled cache (:meth:`cache.ChunkStore.space_needed`), about twice the
    cache's size for a fresh run. The sizes come from the encoder's output shapes (:func:`_feature_shapes`), the
    storage dtype and the sample ids of both splits.

    Raises:
        CacheError: names ``--cache-dir``, the space needed (remaining chunks, assembly) and the space free.
    """
    feature_dim, num_patches = _feature_shapes(encoder, config["input_size"], dev)
    id_chars = max(len(i) for part in source.splits.values() for i in part.sample_ids)
    chunks, assembly = store.space_needed(feature_dim, num_patches, dtype, id_chars)
    free = shutil.disk_usage(store.path.parent).free
    if chunks + assembly <= free:
        return
    committed = sum(len(store.chunks(split)) - len(store.pending(split)) for split in store.splits)
    advice = (f"free space and run the same command again to resume (the {committed} committed "
              f"chunk{'s are' if committed > 1 else ' is'} kept in {store.work})" if committed
              else "free space or choose another --cache-dir")
    raise CacheError(f"--cache-dir {cache_dir}: extracting needs {describe_need(chunks, assembly)}, "
                     f"{human_bytes(free)} is free; {advice}")


def _quiet(line: str) -> None:
    """A log that prints nothing (the setup lines of ranks other than 0)."""


def _encode_chunks(store: ChunkStore, split: str, part, chunks: list[tuple[int, int]], encoder: TokenEncoder,
                   dev: torch.device, autocast, dtype: str, batch_size: int, num_workers: int, progress: bool,
                   on_commit: Callable[[], None]) -> int:
    """Encode and commit the given chunks of one split, in the batches of an uninterrupted run.

    Args:
        store: the work folder.
        split: the split.
        part: the split's dataset part (``dataset``, ``labels``, ``sample_ids``).
        chunks: ``(start, stop)`` row ranges, chunks of ``store``, in row order.
        on_commit: called after each committed chunk.

    Returns:
        The number of images encoded.

    Raises:
        ExtractionError: non-finite backbone output, or the loader's labels differ from the sample index.
    """
    # the batches of an uninterrupted run, restricted to the chunks still to do
    batches = [list(range(b, min(b + batch_size, stop))) for a, stop in chunks for b in range(a, stop, batch_size)]
    if not batches:
        return 0
    loader = DataLoader(part.dataset, batch_sampler=batches, num_workers=num_workers,
                        pin_memory=dev.type == "cuda", persistent_workers=False)
    loader_iter = iter(loader)
    chunk_iter = iter(chunks)
    chunk_start, chunk_stop = next(chunk_iter)
    held: list[tuple[np.ndarray, np.ndarray]] = []
    at = chunk_start
    total = 0
    chunk_began = time.perf_counter()
    try:
        for images, labels in tqdm(loader_iter, total=len(batches), desc=f"extract {split}", unit="batch",
                                   disable=not progress, leave=False):
            with torch.inference_mode(), autocast:
                cls, patches = encoder(images.to(dev, non_blocking=True))
            cls = cls.float().cpu().numpy()
            patches = patches.float().cpu().numpy()
            bad = non_finite_rows(cls, patches)
            if bad.any():
                first = at + int(np.flatnonzero(bad)[0])
                raise ExtractionError(f"the backbone gave non-finite features for {int(bad.sum())} images, "
                                      f"first {part.sample_ids[first]!r} ({split} row {first})"
                                      + ("; try --precision fp32" if isinstance(autocast, torch.autocast) else
                                         " in an fp32 forward; check the backbone and its weights"))
            if not np.array_equal(labels.numpy(), part.labels[at:at + len(labels)]):
                raise ExtractionError(f"{split} rows {at}..{at + len(labels) - 1}: the loader's labels differ "
                                      "from the sample index")
            stored = (cls.astype(dtype), patches.astype(dtype))
            _check_storage_range(stored, cls, patches, dtype, split, at, part.sample_ids)
            held.append(stored)
            at += len(labels)
            total += len(labels)
            if at == chunk_stop:
                store.commit(split, chunk_start, np.concatenate([c for c, _ in held]),
                             np.concatenate([p for _, p in held]), part.labels[chunk_start:chunk_stop],
                             part.sample_ids[chunk_start:chunk_stop], encoder.token_grid,
                             seconds=time.perf_counter() - chunk_began)
                on_commit()
                chunk_began = time.perf_counter()
                held = []
                chunk_start, chunk_stop = next(chunk_iter, (None, None))
                at = chunk_start
    finally:
        # An error mid-split leaves the iterator referenced by the traceback; end its worker processes
        # now rather than when the traceback is collected (torch's DataLoader iterator method).
        shutdown = getattr(loader_iter, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
    return total


def _assemble(store: ChunkStore, source, encoder: TokenEncoder, loaded, config: dict, dataset: str, backbone: str,
              layer: str, precision: str, dtype: str, train_per_class: int | None = None) -> Path:
    """The cache's attributes, from the extraction's settings and its committed chunks; then
    :meth:`ChunkStore.assemble`. Returns the final path."""
    encoded, encode_seconds = store.timing()  # every run's chunks, when the extraction was resumed
    geometry = store.geometry()  # from the chunks: a resumed run may have encoded nothing itself
    h, w = geometry["token_grid"]
    gh, gw = encoder.pooled_grid(h, w)
    attrs = {
        "dataset": dataset,
        "data_source": source.description,
        "class_names": source.class_names,
        "backbone": backbone,
        "weights_source": loaded.source,
        "weights_sha256": loaded.sha256,
        "semantic_vector": encoder.semantic_vector,
        "layer": layer,
        "num_prefix_tokens": encoder.num_prefix_tokens,
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
        "input_size": list(config["input_size"]),
        "mean": list(config["mean"]),
        "std": list(config["std"]),
        "interpolation": config["interpolation"],
        "crop_pct": float(config["crop_pct"]),
        "crop_mode": config.get("crop_mode", "center"),
        "token_grid": [h, w],
        "patch_grid": [gh, gw],
        "feature_dim": geometry["feature_dim"],
        "num_patches": gh * gw,
        "precision": precision,
        "dtype": dtype,
        "extract_seconds": round(encode_seconds, 3),
        "images_per_second": round(encoded / encode_seconds, 3) if encode_seconds > 0 else 0.0,
    }
    fine_labels = None
    if source.fine_class_names is not None:
        attrs["fine_class_names"] = source.fine_class_names
        fine_labels = {split: part.fine_labels for split, part in source.splits.items()}
    if source.skipped_files is not None:
        attrs["skipped_files"] = source.skipped_files
    if source.normal_classes is not None:
        attrs["normal_classes"] = source.normal_classes
    if train_per_class is not None:
        attrs["train_per_class"] = train_per_class
        attrs["train_subset_seed"] = TRAIN_SUBSET_SEED
    return store.assemble(attrs, fine_labels=fine_labels)


def _check_same_images(path: Path, source) -> None:
    """Refuse to reuse the cache at ``path`` when its images are not the dataset's now (images added to or removed
    from a folder tree since: the cache's name says what was extracted, not from which files).

    Raises:
        CacheError: names the cache, the first split that differs, and how to extract again.
    """
    with FeatureCache(path) as fc:
        for split, part in source.splits.items():
            stored = fc.split(split).sample_ids
            if list(stored) != list(part.sample_ids):
                raise CacheError(f"the cache {path} holds other {split} images than the dataset has now ({len(stored)} "
                                 f"in the cache, {len(part.sample_ids)} now): run 'extract' with --overwrite to "
                                 "extract them again, or move the cache away")


def extract_categories(dataset: str, data_root: str | None, category: str | None, **options) -> list[Path]:
    """:func:`extract_features` for each category asked for: every MVTec AD category under ``data_root`` when
    ``category`` is ``all`` (one cache each), else the one dataset (or category) given.

    Returns:
        The cache paths, in category order.

    Raises:
        DatasetError: ``all`` with no category under ``data_root``; otherwise as :func:`extract_features`.
    """
    from .datasets import DatasetError, mvtec_categories

    if dataset == "mvtec" and category == "all":
        with options.get("dist", SINGLE).all_succeed():  # an error every rank finds alike is printed once
            if data_root is None or not Path(data_root).is_dir():
                raise DatasetError("--dataset mvtec needs --data-root DIR holding DIR/<category>/train/good/ ...; "
                                   f"got {data_root!r}")
            categories = mvtec_categories(Path(data_root))
            if not categories:
                hint = (f"; it is one category itself: pass its parent folder (and --category "
                        f"{Path(data_root).name})" if (Path(data_root) / "train" / "good").is_dir() else "")
                raise DatasetError(f"--data-root {data_root}: no MVTec AD category (<category>/train/good/) "
                                   f"found{hint}")
            for c in categories:  # every category's layout is checked before any image is encoded
                build_dataset(dataset, data_root, False, transform=None, category=c)
        return [extract_features(dataset, data_root, category=c, **options) for c in categories]
    return [extract_features(dataset, data_root, category=category, **options)]
