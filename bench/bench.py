"""Benchmark: the pipeline measured against its own limits, every claim a ratio from one run (docs/performance.md).

    python bench/bench.py --quick            # a few minutes: small sizes
    python bench/bench.py                    # full mode: the sizes reported in docs/performance.md
    python bench/bench.py --device cuda --backbone vit_base_patch16_384 --random-init --sections 1,2,3

Sections (``--sections``, default all):
  1. extraction efficiency: ``extract`` images/s / the bare backbone forward images/s on the same already decoded
     and resized batches (same precision, batch size), and where the rest goes;
  2. precision: bf16 / fp16 autocast vs fp32 forward speed, and the AUROC change on CIFAR-10 for two normal
     classes (deterministic detectors on the class tokens); fp16 vs fp32 storage: file size and AUROC change;
  3. flow training throughput for the paper's shapes (D = 768, 64 patch tokens, H = 1024, K = 4, batch 32),
     FLOPs per sample, utilisation of the measured matmul peak; fp32 eager, bf16 autocast, torch.compile;
  4. scoring throughput and the peak memory of ``fit`` and ``score`` (subprocesses) on a cache of >= 2 GB
     (full mode) against the bytes of the rows they need;
  5. scaling of extract and fit time with 1x, 2x, 4x the images / train rows;
  6. backbone forward passes of the full CIFAR-10 protocol: this pipeline vs re-encoding per normal class, computed
     and confirmed by counting forwards in a small run;
  7. a run exported to ONNX: ONNX Runtime vs PyTorch images/s on the CPU (backbone + flow + p-value, the same graph
     on the same decoded batches), and the largest relative difference of the flow's nll;
  8. ``serve``: images/s through the HTTP service (one image per request) with 1, 4 and 8 concurrent clients,
     p50 and p95 latency, against offline ``predict`` (the same Predictor, in process) on the same image files.

Real data from ../shared/data (CIFAR-10 JPEGs) when present, generated images otherwise. Writes
``<out>/bench.csv`` and ``<out>/bench.md``. This is not a test: timings are never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import io
import json
import os
import platform
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
PRECISION_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Row:
    section: str
    metric: str
    value: float | str
    unit: str = ""
    target: str = ""
    met: str = ""
    note: str = ""


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device: torch.device, precision: str):
    dtype = PRECISION_DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------


def cifar_tree(dest: Path, per_class: dict[str, int], classes: list[int] | None = None, seed: int = 0) -> Path:
    """``dest/{train,test}/<class>/*.jpg`` from the real CIFAR-10 JPEG archive (the first ``per_class[split]``
    files of each class by name; with ``classes``, the other classes get 1 train image, as a folder dataset needs
    every class in both splits), or generated images of 32 x 32 px when the archive is absent."""
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

    def count(split: str, name: str) -> int:
        if split == "train" and classes is not None and names.index(name) not in classes:
            return 1
        return per_class[split]

    chosen = {split: {n for n in names if count(split, n)} for split in per_class}
    if SHARED_CIFAR.is_file():
        wanted: dict[tuple[str, str], list] = {}
        with tarfile.open(SHARED_CIFAR) as archive:
            members = sorted((m for m in archive.getmembers() if m.isfile() and m.name.endswith(".jpg")),
                             key=lambda m: m.name)
            for member in members:
                parts = Path(member.name).parts  # cifar10/<split>/<class>/<file>
                split, name = parts[-3], parts[-2]
                if split in per_class and name in chosen[split]:
                    bucket = wanted.setdefault((split, name), [])
                    if len(bucket) < count(split, name):
                        bucket.append(member)
            for (split, name), bucket in wanted.items():
                folder = dest / split / name
                folder.mkdir(parents=True, exist_ok=True)
                for member in bucket:
                    (folder / Path(member.name).name).write_bytes(archive.extractfile(member).read())
        return dest
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in per_class:
        for k, name in enumerate(names):
            if name not in chosen[split]:
                continue
            folder = dest / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count(split, name)):
                base = np.zeros((32, 32, 3)) + 40 * (k % 5)
                base[..., k % 3] += 120
                pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=75)
    return dest


def data_kind() -> str:
    return "CIFAR-10 JPEGs (../shared/data)" if SHARED_CIFAR.is_file() else "generated 32 x 32 JPEGs"


# ----------------------------------------------------------------------------------------------------------------
# backbone helpers
# ----------------------------------------------------------------------------------------------------------------


def load_backbone(args):
    from extract.backbone import TokenEncoder, create_backbone
    from extract.run import build_transform, resolve_preprocessing

    model, loaded = create_backbone(args.backbone, weights="auto", random_init=args.random_init, img_size=args.img_size)
    config = resolve_preprocessing(model, args.img_size)
    encoder = TokenEncoder(model, patch_grid=args.patch_grid).to(args.dev)
    return model, encoder, build_transform(config), loaded


def decoded_batches(tree: Path, transform, batch_size: int) -> tuple[list[torch.Tensor], float, int]:
    """Every image of ``tree`` decoded and preprocessed in this process: (batches, seconds, images)."""
    from extract.datasets import load_image

    paths = sorted(p for p in tree.rglob("*.jpg"))
    start = time.perf_counter()
    tensors = [transform(load_image(str(p))) for p in paths]
    seconds = time.perf_counter() - start
    batches = [torch.stack(tensors[i:i + batch_size]) for i in range(0, len(tensors), batch_size)]
    return batches, seconds, len(paths)


@torch.inference_mode()
def forward_rate(fn, batches: list[torch.Tensor], device: torch.device, precision: str, repeats: int = 1) -> float:
    """Images/s of ``fn`` over already decoded batches (after one warm-up batch), best of ``repeats``."""
    with autocast(device, precision):
        fn(batches[0].to(device))
    best = 0.0
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        with autocast(device, precision):
            for batch in batches:
                out = fn(batch.to(device, non_blocking=True))
                if isinstance(out, tuple):  # what extraction does with the output: copy to host memory
                    [o.float().cpu() for o in out]
                else:
                    out.float().cpu()
        sync(device)
        best = max(best, sum(len(b) for b in batches) / (time.perf_counter() - start))
    return best


def run_extract(args, tree: Path, cache_dir: Path, precision: str, dtype: str = "float16") -> tuple[Path, float]:
    from extract import extract_features

    start = time.perf_counter()
    path = extract_features(dataset="folder", data_root=str(tree), backbone=args.backbone, random_init=args.random_init,
                            patch_grid=args.patch_grid, img_size=args.img_size, batch_size=args.batch_size,
                            num_workers=args.num_workers, device=args.device, precision=precision, dtype=dtype,
                            cache_dir=str(cache_dir), progress=False, log=lambda s: None)
    return path, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------------------------


def section_extraction(args, work: Path) -> list[Row]:
    import h5py

    from cache import FeatureCache

    n = args.sizes["extract_images"]
    tree = cifar_tree(work / "s1", {"train": n // 20, "test": n // 20})
    model, encoder, transform, loaded = load_backbone(args)
    batches, decode_s, count = decoded_batches(tree, transform, args.batch_size)
    # the bare forward in the layout the encoder uses (channels-last), and in the plain NCHW layout for comparison
    channels_last = lambda b: model.forward_features(b.contiguous(memory_format=torch.channels_last))  # noqa: E731
    bare = forward_rate(channels_last, batches, args.dev, args.precision, repeats=2)
    nchw = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    bare_nchw = forward_rate(nchw.forward_features, batches, args.dev, args.precision, repeats=2)
    del nchw
    with_pool = forward_rate(encoder, batches, args.dev, args.precision, repeats=2)
    spent = {"commit": 0.0, "assemble": 0.0, "backbone": 0.0, "dataset": 0.0}
    path, wall = _timed_extract(args, tree, work / "s1cache", spent)
    with FeatureCache(path) as fc:
        loop_s = float(fc.attrs["extract_seconds"])
        arrays = {s: fc.split(s).read(slice(None)) for s in ("train", "test")}
    # HDF5 write cost: the same rows written again through h5py
    start = time.perf_counter()
    with h5py.File(work / "s1write.h5", "w") as f:
        for s, (cls, patches) in arrays.items():
            f.create_dataset(f"{s}/cls", data=cls.astype(np.float16), chunks=True)
            f.create_dataset(f"{s}/patches", data=patches.astype(np.float16), chunks=True)
    write_s = time.perf_counter() - start
    extract_rate = count / wall
    loop_rate = count / loop_s
    log(f"extraction: bare {bare:.1f}, with pooling {with_pool:.1f}, extract {extract_rate:.1f} img/s")
    target = "≥ 0.90"
    return [
        Row("1 extraction", "images", count, "", note=f"{data_kind()}, {args.backbone}, {args.precision}, "
                                                     f"batch {args.batch_size}, {args.num_workers} workers"),
        Row("1 extraction", "bare backbone forward (forward_features)", bare, "images/s",
            note="channels-last weights and input, as the encoder runs it"),
        Row("1 extraction", "bare forward, NCHW layout (before)", bare_nchw, "images/s"),
        Row("1 extraction", "channels-last / NCHW forward", bare / bare_nchw, "ratio"),
        Row("1 extraction", "encoder forward (+ token pooling)", with_pool, "images/s"),
        Row("1 extraction", "extract, whole command (wall)", extract_rate, "images/s"),
        Row("1 extraction", "extract / bare forward (wall)", extract_rate / bare, "ratio", target,
            "yes" if extract_rate / bare >= 0.9 else "no", "whole command: includes fixed costs (below) that shrink "
                                                           "with more images"),
        Row("1 extraction", "extract encode loop / bare forward", loop_rate / bare, "ratio", target,
            "yes" if loop_rate / bare >= 0.9 else "no", "steady state: the chunk loop (cache attribute "
                                                        "extract_seconds)"),
        Row("1 extraction", "decode + resize, one process", count / decode_s, "images/s",
            note=f"{decode_s / wall:.1%} of the extract wall time if not overlapped"),
        Row("1 extraction", "token pooling share of the encoder forward", 1 - with_pool / bare, "fraction"),
        Row("1 extraction", "HDF5 write of the rows (h5py, float16)", write_s / wall, "fraction of wall"),
        Row("1 extraction", "setup + commits + assembly (wall - encode loop)", (wall - loop_s) / wall,
            "fraction of wall"),
        Row("1 extraction", "  backbone creation and weights", spent["backbone"] / wall, "fraction of wall"),
        Row("1 extraction", "  dataset indexing", spent["dataset"] / wall, "fraction of wall"),
        Row("1 extraction", "  chunk commits (npz write + fsync)", spent["commit"] / wall, "fraction of wall"),
        Row("1 extraction", "  HDF5 assembly from the chunks", spent["assemble"] / wall, "fraction of wall"),
    ]


def _timed_extract(args, tree: Path, cache_dir: Path, spent: dict) -> tuple[Path, float]:
    """:func:`run_extract` with the time spent in its fixed steps added to ``spent`` (by wrapping them)."""
    import extract.run as run_module
    from cache import ChunkStore

    def timed(owner, name, key):
        original = getattr(owner, name)

        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                spent[key] += time.perf_counter() - start

        setattr(owner, name, wrapper)
        return original

    originals = [(ChunkStore, "commit", timed(ChunkStore, "commit", "commit")),
                 (ChunkStore, "assemble", timed(ChunkStore, "assemble", "assemble")),
                 (run_module, "create_backbone", timed(run_module, "create_backbone", "backbone")),
                 (run_module, "build_dataset", timed(run_module, "build_dataset", "dataset"))]
    try:
        return run_extract(args, tree, cache_dir, args.precision)
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def _detector_aurocs(path: Path, normals: list[int], dtype=None) -> dict[str, float]:
    from cache import FeatureCache
    from flow.detectors.gaussian import GaussianDetector
    from flow.detectors.knn import KNNDetector
    from flow.experiments.metrics import auroc

    out = {}
    with FeatureCache(path) as fc:
        train, test = fc.split("train"), fc.split("test")
        test_cls, _ = test.read(slice(None))
        for k in normals:
            cls, _ = train.read(train.rows_of_class(k))
            pair = (cls, test_cls) if dtype is None else (cls.astype(dtype).astype(np.float32),
                                                          test_cls.astype(dtype).astype(np.float32))
            for name, detector in (("knn", KNNDetector(k=2)), ("gaussian", GaussianDetector())):
                scores = detector.fit(pair[0]).scores(pair[1])
                for key, values in scores.items():
                    out[f"normal {k} {name}-{key}"] = auroc((test.labels != k).astype(int), values)
    return out


def section_precision(args, work: Path) -> list[Row]:
    n_train, n_test = args.sizes["auroc_train"], args.sizes["auroc_test"]
    normals = [0, 1]
    rows = []
    # speed on the same decoded batches
    tree = cifar_tree(work / "s2speed", {"train": args.sizes["extract_images"] // 20, "test": 0})
    model, encoder, transform, _ = load_backbone(args)
    batches, _, _ = decoded_batches(tree, transform, args.batch_size)
    rates = {p: forward_rate(encoder, batches, args.dev, p, repeats=2) for p in args.precisions}
    for p in args.precisions:
        rows.append(Row("2 precision", f"{p} forward", rates[p], "images/s"))
        if p != "fp32":
            rows.append(Row("2 precision", f"{p} / fp32 forward speed", rates[p] / rates["fp32"], "ratio", "≥ 2",
                            "yes" if rates[p] / rates["fp32"] >= 2 else "no"))
    # AUROC change: the same images extracted at each precision (float32 storage)
    tree = cifar_tree(work / "s2auroc", {"train": n_train, "test": n_test // 10}, classes=normals)
    caches = {p: run_extract(args, tree, work / f"s2cache-{p}", p, dtype="float32")[0] for p in args.precisions}
    base = _detector_aurocs(caches["fp32"], normals)
    note = f"normal classes {normals}, {n_train} train images each, {n_test} test images; knn (k=2) and gaussian"
    for p in args.precisions:
        if p == "fp32":
            continue
        other = _detector_aurocs(caches[p], normals)
        delta = max(abs(other[k] - base[k]) for k in base)
        rows.append(Row("2 precision", f"max |ΔAUROC| {p} vs fp32 forward", delta, "", "≤ 0.002",
                        "yes" if delta <= 0.002 else "no", note))
    half = _detector_aurocs(caches["fp32"], normals, dtype=np.float16)
    delta = max(abs(half[k] - base[k]) for k in base)
    rows.append(Row("2 precision", "max |ΔAUROC| float16 vs float32 storage", delta, "", "≤ 0.001",
                    "yes" if delta <= 0.001 else "no", note))
    sizes = {}
    for dtype in ("float32", "float16"):
        path, _ = run_extract(args, tree, work / f"s2size-{dtype}", "bf16" if "bf16" in args.precisions else "fp32",
                              dtype=dtype)
        sizes[dtype] = path.stat().st_size
    rows.append(Row("2 precision", "file size float16 / float32 storage", sizes["float16"] / sizes["float32"], "ratio"))
    for key in sorted(base):
        rows.append(Row("2 precision", f"AUROC fp32 {key}", base[key], ""))
    return rows


def _train_steps(model, optimizer, y, tokens, steps: int, precision: str, device) -> float:
    from flow.model.sanf import flow_loss

    def step():
        with autocast(device, precision):
            z, log_det = model(y, tokens)
        loss = flow_loss(z.float(), log_det.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    step()  # warm-up (and compilation)
    step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * y.shape[0] / (time.perf_counter() - start)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a square matmul (2 n^3 per product), best of ``repeats``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - start))
    return best


def _flow_equivalence(config, y, tokens, dev, steps: int = 5) -> list[Row]:
    """Do the speed-ups change results? Query-side vs as-written attention, fused vs for-loop Adam (fp32).

    ``fused=False`` on a CPU is torch's default there, the per-tensor for-loop (foreach is the default on CUDA).
    """
    from flow.model.sanf import SANFFlow, flow_loss
    from flow.model.train import TrainConfig, make_optimizer

    torch.manual_seed(0)
    model = SANFFlow(config).to(dev).eval()
    with torch.no_grad():
        _, ld = model(y, tokens)
        _, ld_written = model.set_attention_form(True)(y, tokens)
    rel_ld = float((ld - ld_written).abs().max() / ld_written.abs().max().clamp_min(1e-12))
    params = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = SANFFlow(config).to(dev).train()
        optimizer = make_optimizer(model, TrainConfig(), fused=fused)
        for _ in range(steps):
            z, log_det = model(y, tokens)
            optimizer.zero_grad(set_to_none=True)
            flow_loss(z, log_det).backward()
            optimizer.step()
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    rel_p = float((params[0] - params[1]).abs().max() / params[1].abs().max())
    return [Row("3 flow", "query-side vs as-written attention: log-det, max relative difference", rel_ld, "",
                note="fp32; float noise is ~1e-6"),
            Row("3 flow", f"fused vs unfused Adam: parameters after {steps} steps, max relative difference", rel_p, "",
                note="fp32, same initialisation and batches")]


def section_flow(args, work: Path) -> list[Row]:
    from flow.model.coupling import CAFFSubnet
    from flow.model.sanf import FlowConfig, SANFFlow, count_flops
    from flow.model.train import TrainConfig, make_optimizer

    D, P, batch = 768, 64, 32
    config = FlowConfig(dim=D, num_blocks=4, hidden=1024)
    flops = count_flops(config, P)
    dev = args.dev
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(batch, D, generator=gen).to(dev)
    tokens = torch.randn(batch, P, D, generator=gen).to(dev)
    # one subnet call per coupling per direction: count calls in a forward and an inverse
    calls = []
    hook = lambda module, inp, out: calls.append(1)  # noqa: E731
    counted = SANFFlow(config)
    handles = [m.register_forward_hook(hook) for m in counted.modules() if isinstance(m, CAFFSubnet)]
    with torch.no_grad():
        counted(y.cpu(), tokens.cpu())
        forward_calls = len(calls)
        counted.inverse(y.cpu(), tokens.cpu())
    for h in handles:
        h.remove()
    rows = [Row("3 flow", "FLOPs per sample, forward, as computed (query-side attention)", flops / 1e9, "GFLOP",
                note=f"D={D}, P={P}, H=1024, K=4 (torch.utils.flop_counter; training ≈ 3x)"),
            Row("3 flow", "subnet calls per forward / per inverse", f"{forward_calls} / {len(calls) - forward_calls}",
                "", "2K = 8 each", "yes" if forward_calls == 8 and len(calls) - forward_calls == 8 else "no",
                "the log-det comes from the same pass")]
    peaks = {"fp32": matmul_peak(dev, torch.float32)}
    if "bf16" in args.precisions:
        peaks["bf16"] = matmul_peak(dev, torch.bfloat16)
    for name, peak in peaks.items():
        rows.append(Row("3 flow", f"matmul peak {name}", peak / 1e9, "GFLOP/s", note="2048 x 2048 x 2048"))
    flops_written = count_flops(config, P, as_written=True)
    rows.append(Row("3 flow", "FLOPs per sample, forward, docs/method.md eq. (14)-(16) as written", flops_written / 1e9,
                    "GFLOP", note="keys and values of all 1 + P tokens (the form the paper counts); the default "
                                  "computes the same function from the query side"))
    # (label, precision, torch.compile, attention as written, fused Adam); the first is what `fit` runs
    variants = [("fp32 eager", "fp32", False, False, True),
                ("fp32, attention as written, fused Adam", "fp32", False, True, True),
                ("fp32, query-side attention, for-loop Adam", "fp32", False, False, False),
                ("fp32, attention as written, for-loop Adam (before)", "fp32", False, True, False)]
    if "bf16" in args.precisions:
        variants.append(("bf16 autocast", "bf16", False, False, True))
    if args.compile:
        variants.append(("fp32 torch.compile", "fp32", True, False, True))
    rates = {}
    for label, precision, compiled, as_written, fused in variants:
        torch.manual_seed(0)
        model = SANFFlow(config).set_attention_form(as_written).to(dev).train()
        optimizer = make_optimizer(model, TrainConfig(), fused=fused)  # the paper's optimiser settings
        runner = torch.compile(model) if compiled else model
        start = time.perf_counter()
        try:
            rate = _train_steps(runner, optimizer, y, tokens, args.sizes["flow_steps"], precision, dev)
        except Exception as err:  # torch.compile needs a compiler toolchain; report, do not hide
            rows.append(Row("3 flow", f"train {label}", "failed", "", note=f"{type(err).__name__}: {str(err)[:80]}"))
            continue
        rates[label] = rate
        peak = peaks.get(precision, peaks["fp32"])
        rows.append(Row("3 flow", f"train {label}", rate, "samples/s",
                        note=f"{time.perf_counter() - start:.0f} s incl. warm-up"))
        rows.append(Row("3 flow", f"utilisation {label}", 3 * (flops_written if as_written else flops) * rate / peak,
                        "of matmul peak", note="FLOPs of the form computed"))
    for label, rate in rates.items():
        if label != "fp32 eager":
            rows.append(Row("3 flow", f"{label} / fp32 eager", rate / rates["fp32 eager"], "ratio"))
    rows += _flow_equivalence(config, y, tokens, dev)
    if "bf16 autocast" in rates:  # does bf16 change the result beyond float noise?
        torch.manual_seed(0)
        model = SANFFlow(config).to(dev).eval()
        with torch.no_grad():
            z32, ld32 = model(y, tokens)
            with autocast(dev, "bf16"):
                z16, ld16 = model(y, tokens)
        rel = float((ld16.float() - ld32).abs().max() / ld32.abs().max().clamp_min(1e-12))
        rows.append(Row("3 flow", "bf16 vs fp32 log-det, max relative difference", rel, "",
                        note="float noise would be ~1e-6; larger, bf16 changes results"))
    return rows


#: Peak resident memory of this process in KiB: VmHWM of /proc/self/status (reset by exec, unlike ru_maxrss,
#: which a child started by fork + exec inherits from its parent), or ru_maxrss where /proc is absent.
PEAK_RSS_CODE = ("def peak_kib():\n"
                 "    try:\n"
                 "        for line in open('/proc/self/status'):\n"
                 "            if line.startswith('VmHWM:'):\n"
                 "                return int(line.split()[1])\n"
                 "    except OSError:\n"
                 "        pass\n"
                 "    import resource\n"
                 "    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n")


def _rss_run(argv: list[str]) -> tuple[float, float, str]:
    """Run ``pipeline.py argv`` in a fresh interpreter; (peak RSS in MB, wall seconds, output)."""
    code = (PEAK_RSS_CODE + "import runpy, sys; sys.argv = ['pipeline.py'] + sys.argv[1:]\n"
            "try:\n    runpy.run_path('pipeline.py', run_name='__main__')\n"
            "except SystemExit as e:\n    code = e.code\n"
            "print('PEAK_RSS_KB', peak_kib())\n")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak = [line for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_KB")]
    if done.returncode or not peak:
        raise RuntimeError(f"pipeline.py {' '.join(argv)} failed: {done.stderr[-500:]}")
    return int(peak[0].split()[1]) / 1024, wall, done.stdout


def big_cache(path: Path, rows: int, dim: int, patches: int, classes: int = 10, test_rows: int = 2000) -> Path:
    """A generated float16 cache (class k ~ N(e_k, I)) written in blocks: ``rows`` train + ``test_rows`` test."""
    from cache import CacheWriter

    rng = np.random.default_rng(0)
    grid = int(round(patches ** 0.5))
    with CacheWriter(path, overwrite=True) as writer:
        for split, n in (("train", rows), ("test", test_rows)):
            writer.create_split(split, n, dim, patches, "float16")
            for start in range(0, n, 2048):
                b = min(2048, n - start)
                labels = (np.arange(start, start + b) % classes).astype(np.int64)
                cls = rng.standard_normal((b, dim), dtype=np.float32) + 3 * np.eye(dim, dtype=np.float32)[labels]
                tok = cls[:, None, :] + rng.standard_normal((b, patches, dim), dtype=np.float32)
                writer.write(split, start, cls.astype(np.float16), tok.astype(np.float16), labels,
                             [f"{split}/{i}" for i in range(start, start + b)])
        return writer.finish({
            "dataset": "generated", "data_source": "bench/bench.py", "class_names": [f"c{k}" for k in range(classes)],
            "backbone": "none", "weights_source": "none", "weights_sha256": "", "semantic_vector": "class_token",
            "num_prefix_tokens": 1, "timm_version": "", "torch_version": torch.__version__, "input_size": [3, 0, 0],
            "mean": [0.0] * 3, "std": [1.0] * 3, "interpolation": "", "crop_pct": 1.0, "crop_mode": "",
            "token_grid": [grid, grid], "patch_grid": [grid, grid], "feature_dim": dim, "num_patches": patches,
            "precision": "fp32", "dtype": "float16"})


def section_memory(args, work: Path) -> list[Row]:
    from flow.model.sanf import FlowConfig, parameter_count

    rows_n, D, P = args.sizes["big_rows"], 768, 16
    path = big_cache(work / "big.h5", rows_n, D, P)
    size_gb = path.stat().st_size / 1e9
    # the fixed cost of the modules fit and score import (torch, h5py, scikit-learn, ...), before any work
    # the runtime floor: the modules fit imports, with torch's CPU kernels and thread pools initialised by a few
    # steps of a tiny flow (fixed costs that no cache or model size changes)
    floor_code = ("import pipeline, flow.experiments.fitting, flow.experiments.scoring, flow.experiments.report, "
                  "cache, torch\n"
                  "from flow.model.sanf import FlowConfig\nfrom flow.model.train import TrainConfig, fit_flow\n"
                  "fit_flow(torch.randn(64, 8), torch.randn(64, 4, 8), FlowConfig(dim=8, hidden=8), "
                  "TrainConfig(epochs=1), progress=False)\nprint(peak_kib())")
    import_floor = subprocess.run([sys.executable, "-c", PEAK_RSS_CODE + floor_code], capture_output=True, text=True,
                                  cwd=ROOT)
    floor = int(import_floor.stdout.strip()) / 1024
    runs = work / "big-runs"
    fit_peak, fit_wall, _ = _rss_run(["fit", "--cache", str(path), "--normal", "0", "--epochs", "1", "--runs-dir",
                                      str(runs), "--device", args.device])
    n_normal = rows_n // 10
    row_mb = n_normal * (D + P * D) * 4 / 2**20  # float32 in memory
    params = parameter_count(FlowConfig(dim=D))
    model_mb = params * 4 * 4 / 2**20  # weights, gradients, two Adam moments
    score_peak, score_wall, _ = _rss_run(["score", "--runs-dir", str(runs), "--device", args.device])
    # the same normal-class rows in a cache a fifth of the size: fit's peak must not depend on the cache's size
    small = big_cache(work / "small.h5", rows_n // 5, D, P, classes=2)
    small_peak, _, _ = _rss_run(["fit", "--cache", str(small), "--normal", "0", "--epochs", "1", "--runs-dir",
                                 str(work / "small-runs"), "--device", args.device])
    small_gb = small.stat().st_size / 1e9
    test_rows = 2000
    over = fit_peak - row_mb - model_mb
    return [
        Row("4 memory", "cache size", size_gb, "GB", note=f"{rows_n} train + {test_rows} test rows, D={D}, P={P}, "
                                                         "float16, generated"),
        Row("4 memory", "runtime floor (imports + torch initialised by a tiny fit)", floor, "MB"),
        Row("4 memory", "fit peak RSS", fit_peak, "MB", note=f"normal rows {row_mb:.0f} MB (float32) + model with "
                                                            f"gradients and Adam {model_mb:.0f} MB"),
        Row("4 memory", "fit peak - runtime floor - rows - model", over - floor, "MB", "≤ 300",
            "yes" if over - floor <= 300 else "no", "the working memory beyond the rows and the model"),
        Row("4 memory", "fit peak - rows - model (runtime floor included)", over, "MB", "", "",
            "the floor is the size of torch's libraries in memory, not data"),
        Row("4 memory", f"fit peak RSS, same normal rows in a {small_gb:.2f} GB cache", small_peak, "MB",
            note=f"difference {fit_peak - small_peak:+.0f} MB for {size_gb / small_gb:.1f}x the cache"),
        Row("4 memory", "score peak RSS", score_peak, "MB", note="test split read in blocks of 2048 rows"),
        Row("4 memory", "score throughput (whole command)", test_rows / score_wall, "samples/s",
            note="includes interpreter start, model load and the CSV writes"),
        Row("4 memory", "fit command wall, 1 epoch", fit_wall, "s",
            note=f"{n_normal} rows; includes interpreter start, imports and reading the rows"),
    ]


def section_scaling(args, work: Path) -> list[Row]:
    from flow.model.sanf import FlowConfig
    from flow.model.train import TrainConfig, fit_flow

    rows = []
    base = args.sizes["scale_images"]
    times = []
    for factor in (1, 2, 4):
        tree = cifar_tree(work / f"s5-{factor}", {"train": base * factor // 10, "test": 1})
        _, wall = run_extract(args, tree, work / f"s5cache-{factor}", args.precision)
        times.append(wall)
    n = [base * f + 10 for f in (1, 2, 4)]
    slope = (times[2] - times[0]) / (n[2] - n[0])
    rows.append(Row("5 scaling", "extract seconds at 1x / 2x / 4x images", " / ".join(f"{t:.1f}" for t in times), "s",
                    note=f"{n[0]} / {n[1]} / {n[2]} images"))
    rows.append(Row("5 scaling", "extract slope", slope * 1000, "ms/image",
                    note=f"time(4x) / time(1x) = {times[2] / times[0]:.2f} (4 if linear with no fixed cost)"))
    rows_base = args.sizes["scale_rows"]
    fit_times = []
    config = FlowConfig(dim=768, hidden=1024)
    for factor in (1, 2, 4):
        m = rows_base * factor
        gen = torch.Generator().manual_seed(0)
        _, result = fit_flow(torch.randn(m, 768, generator=gen), torch.randn(m, 16, 768, generator=gen), config,
                             TrainConfig(epochs=1), device=args.dev, progress=False)
        fit_times.append(result.wall_time_s)
    rows.append(Row("5 scaling", "fit seconds at 1x / 2x / 4x rows", " / ".join(f"{t:.1f}" for t in fit_times), "s",
                    note=f"{rows_base} / {2 * rows_base} / {4 * rows_base} rows, 1 epoch, D=768, P=16"))
    rows.append(Row("5 scaling", "fit slope", (fit_times[2] - fit_times[0]) / (3 * rows_base) * 1000, "ms/row",
                    note=f"time(4x) / time(1x) = {fit_times[2] / fit_times[0]:.2f}"))
    return rows


def section_forwards(args, work: Path) -> list[Row]:
    from extract.backbone import TokenEncoder
    from flow.experiments.config import FitConfig
    from flow.experiments.fitting import fit_cache

    protocol = 10 * 5000 + 10000  # each image once
    reference = 10 * (5000 + 10000)  # per normal class: its train images + the whole test set
    counter = {"images": 0}
    original = TokenEncoder.forward

    def counting(self, images):
        counter["images"] += len(images)
        return original(self, images)

    per = args.sizes["count_images"]
    tree = cifar_tree(work / "s6", {"train": per, "test": per})
    TokenEncoder.forward = counting
    try:
        path, _ = run_extract(args, tree, work / "s6cache", args.precision)

        fit_cache(path, FitConfig(normal="all", method="knn"), runs_dir=work / "s6runs", log=lambda s: None)
        fit_cache(path, FitConfig(normal="0", epochs=1, hidden=16), runs_dir=work / "s6runs", device=args.device,
                  log=lambda s: None, progress=False)
    finally:
        TokenEncoder.forward = original
    n_images = 20 * per
    expected_ref = 10 * (per + 10 * per)
    return [
        Row("6 forwards", "full CIFAR-10 protocol: this pipeline", protocol, "forwards"),
        Row("6 forwards", "full CIFAR-10 protocol: re-encode per normal class", reference, "forwards"),
        Row("6 forwards", "saving", reference / protocol, "ratio"),
        Row("6 forwards", "counted in a run (extract + fit all classes)", counter["images"], "forwards",
            f"= {n_images} images + 1", "yes" if counter["images"] == n_images + 1 else "no",
            f"{per} train + {per} test per class, and one blank image: the disk-space check's shape probe; "
            f"re-encoding would need {expected_ref}"),
    ]


def section_onnx(args, work: Path) -> list[Row]:
    """ONNX Runtime vs PyTorch images/s (CPU) for one exported run: backbone + flow on the same decoded batches."""
    import onnxruntime as ort

    from extract.encode import preprocessing_only, rebuild_encoder
    from flow.deploy.export import ScoringGraph, export_onnx
    from flow.deploy.runtime import run_features
    from flow.experiments.config import FitConfig
    from flow.experiments.fitting import fit_cache
    from flow.store.run_folder import load_scorer, read_run_record

    per = args.sizes["onnx_images"]
    tree = cifar_tree(work / "s7", {"train": per // 10, "test": per // 10})
    path, _ = run_extract(args, tree, work / "s7cache", "fp32")
    (outcome,) = fit_cache(path, FitConfig(normal="0", epochs=1, val_fraction=0.25), runs_dir=work / "s7runs",
                           device="cpu", log=lambda s: None, progress=False)
    model_path = work / "s7.onnx"
    diffs = export_onnx(outcome.path, model_path, log=lambda s: None)
    record = read_run_record(outcome.path)
    features = run_features(outcome.path, record)
    encoder = rebuild_encoder(features, torch.device("cpu"), log=lambda s: None)
    graph = ScoringGraph(encoder.encoder, load_scorer(outcome.path, calibrated=True, alpha=0.05), features).eval()
    transform = preprocessing_only(features).transform(normalise=False)
    batches, _, n = decoded_batches(tree, transform, args.batch_size)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    torch_rate = forward_rate(graph, batches, torch.device("cpu"), "fp32", repeats=2)
    session.run(None, {"images": batches[0].numpy()})
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        for batch in batches:
            session.run(None, {"images": batch.numpy()})
        best = max(best, n / (time.perf_counter() - start))
    note = (f"{args.backbone} + sanf (K=4, H=1024), {n} CIFAR-10 images decoded beforehand, batch {args.batch_size}, "
            f"fp32, {torch.get_num_threads()} threads, onnxruntime {ort.__version__}")
    return [
        Row("7 onnx", "PyTorch (images -> scores, p-value)", torch_rate, "images/s", note=note),
        Row("7 onnx", "ONNX Runtime, same graph", best, "images/s", note=note),
        Row("7 onnx", "ONNX Runtime / PyTorch", best / torch_rate, "ratio"),
        Row("7 onnx", "largest relative difference of nll (2 photographs)", diffs["nll"], "", "<= 1e-4",
            "yes" if diffs["nll"] <= 1e-4 else "no"),
    ]


MULTIPART = "multipart/form-data; boundary=sanf-ad-bench-boundary"


def _multipart(name: str, data: bytes) -> bytes:
    """A multipart/form-data body holding one file in the field ``files``."""
    head = (f'--sanf-ad-bench-boundary\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + b"\r\n--sanf-ad-bench-boundary--\r\n"


def section_serve(args, work: Path) -> list[Row]:
    """images/s through ``pipeline.py serve`` with 1, 4, 8 clients (one image per request) vs offline predict."""
    import concurrent.futures
    import http.client
    import socket
    import threading

    import httpx

    from flow.deploy.predict import Predictor
    from flow.experiments.config import FitConfig
    from flow.experiments.fitting import fit_cache

    per = args.sizes["serve_images"]
    tree = cifar_tree(work / "s8", {"train": per // 10, "test": per // 10})
    path, _ = run_extract(args, tree, work / "s8cache", "fp32")
    (outcome,) = fit_cache(path, FitConfig(normal="0", epochs=1, val_fraction=0.25), runs_dir=work / "s8runs",
                           device="cpu", log=lambda s: None, progress=False)
    images = sorted(str(p) for p in (tree / "test").rglob("*.*"))
    predictor = Predictor(outcome.path, device="cpu", log=lambda s: None)
    predictor.predict(images[:8], batch_size=32)
    offline = 0.0
    for _ in range(2):  # the better of two passes
        start = time.perf_counter()
        predictor.predict(images, batch_size=32, num_workers=0)
        offline = max(offline, len(images) / (time.perf_counter() - start))
    del predictor
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, str(ROOT / "pipeline.py"), "serve", str(outcome.path), "--port",
                               str(port), "--device", "cpu", "--max-batch", "32"], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    note = (f"{args.backbone} + sanf (K=4, H=1024), {len(images)} CIFAR-10 test images as files, one per request, "
            "--max-batch 32; offline: Predictor.predict (the code of predict) in process, batch 32, the better of 2 "
            "passes; clients: threads of http.client in the same process, bodies built beforehand")
    rows = [Row("8 serve", "offline predict", offline, "images/s", note=note)]
    try:
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the server did not get ready")
            time.sleep(0.2)
        bodies = [_multipart(Path(p).name, Path(p).read_bytes()) for p in images]
        local = threading.local()

        def one(i: int) -> float:  # a light client (http.client, a body built beforehand): the server is measured
            if not hasattr(local, "conn"):
                local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            began = time.perf_counter()
            local.conn.request("POST", "/predict", body=bodies[i], headers={"Content-Type": MULTIPART})
            response = local.conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"/predict answered {response.status}")
            return time.perf_counter() - began

        one(0)
        for clients in (1, 4, 8):
            before = httpx.get(f"{url}/health").json()["forwards"]
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                latencies = sorted(pool.map(one, range(len(bodies))))
            rate = len(bodies) / (time.perf_counter() - start)
            forwards = httpx.get(f"{url}/health").json()["forwards"] - before
            p50, p95 = (latencies[int(q * (len(latencies) - 1))] * 1000 for q in (0.5, 0.95))
            rows += [Row("8 serve", f"serve, {clients} client{'s' if clients > 1 else ''}", rate, "images/s",
                         note=f"p50 {p50:.0f} ms, p95 {p95:.0f} ms, {len(bodies) / forwards:.1f} images per forward"),
                     Row("8 serve", f"serve / offline predict, {clients} client{'s' if clients > 1 else ''}",
                         rate / offline, "ratio", ">= 0.9 at 8 clients" if clients == 8 else "",
                         ("yes" if rate / offline >= 0.9 else "no") if clients == 8 else "")]
    finally:
        server.terminate()
        server.wait(30)
    return rows


SECTIONS = {"1": section_extraction, "2": section_precision, "3": section_flow, "4": section_memory,
            "5": section_scaling, "6": section_forwards, "7": section_onnx, "8": section_serve}

SIZES = {
    "quick": {"extract_images": 320, "auroc_train": 100, "auroc_test": 400, "flow_steps": 5, "big_rows": 4000,
              "scale_images": 80, "scale_rows": 128, "count_images": 4,
              "onnx_images": 160, "serve_images": 160},
    "full": {"extract_images": 2000, "auroc_train": 1000, "auroc_test": 2000, "flow_steps": 30, "big_rows": 82000,
             "scale_images": 400, "scale_rows": 1024, "count_images": 20,
             "onnx_images": 640, "serve_images": 640},
}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)"
            f"{gpu}, Python {platform.python_version()}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a few minutes")
    parser.add_argument("--sections", default="1,2,3,4,5,6,7,8", help="comma-separated section numbers")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0", help="timm model name (default: the packaged "
                        "ImageNet EfficientNet-Lite0, which needs no download)")
    parser.add_argument("--random-init", action="store_true", help="random backbone weights (ViTs on the GPU machine)")
    parser.add_argument("--img-size", type=int, default=None, help="input size in pixels (default: the model's)")
    parser.add_argument("--patch-grid", type=int, default=4, help="pool the token grid to G x G (extract --patch-grid)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader decoding processes")
    parser.add_argument("--precision", default="bf16", choices=list(PRECISION_DTYPES),
                        help="forward precision of sections 1, 5, 6")
    parser.add_argument("--precisions", default="fp32,bf16", help="compared in sections 2 and 3")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile in section 3")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for bench.csv and bench.md")
    args = parser.parse_args(argv)
    args.sizes = SIZES["quick" if args.quick else "full"]
    args.dev = torch.device(args.device)
    args.precisions = [p.strip() for p in args.precisions.split(",")]
    if "fp32" not in args.precisions:
        args.precisions.insert(0, "fp32")
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"--sections must be among {', '.join(SECTIONS)}; got {', '.join(unknown)}")
    random.seed(0)
    torch.manual_seed(0)
    rows: list[Row] = []
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sanf-bench-") as tmp:
        for key in chosen:
            log(f"section {key}: {SECTIONS[key].__name__}")
            section_start = time.perf_counter()
            try:
                rows += SECTIONS[key](args, Path(tmp) / f"s{key}")
            except Exception as err:  # report the failure in the table and go on with the other sections
                import traceback

                traceback.print_exc()
                rows.append(Row(f"{key} failed", SECTIONS[key].__name__, "failed", "",
                                note=f"{type(err).__name__}: {str(err)[:120]}"))
            log(f"section {key} done in {time.perf_counter() - section_start:.0f} s")
            lines = write_outputs(out, rows, args, time.perf_counter() - started)  # after every section
    print("\n".join(lines))
    print(f"\nwrote {out / 'bench.csv'} and {out / 'bench.md'}")
    return 0


def write_outputs(out: Path, rows: list[Row], args, seconds: float) -> list[str]:
    """Write ``bench.csv``, ``bench.md`` and ``bench.json``; return the markdown lines."""
    header = (f"mode {'quick' if args.quick else 'full'}; {machine()}; device {args.device}; backbone {args.backbone}"
              f"{' (random init)' if args.random_init else ''}; {seconds:.0f} s")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["section", "metric", "value", "unit", "target", "met", "note"])
    for r in rows:
        writer.writerow([r.section, r.metric, fmt(r.value), r.unit, r.target, r.met, r.note])
    (out / "bench.csv").write_text(buffer.getvalue())
    lines = [f"Benchmark: {header}", "", "| section | metric | value | unit | target | met | note |",
             "|---|---|---|---|---|---|---|"]
    cell = lambda v: fmt(v).replace("|", "\\|")  # noqa: E731 (|ΔAUROC| would split a markdown cell)
    lines += [f"| {cell(r.section)} | {cell(r.metric)} | {cell(r.value)} | {cell(r.unit)} | {cell(r.target)} | "
              f"{cell(r.met)} | {cell(r.note)} |" for r in rows]
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    (out / "bench.json").write_text(json.dumps({"header": header, "rows": [r.__dict__ for r in rows]}, default=str,
                                               indent=1))
    return lines


if __name__ == "__main__":
    sys.exit(main())
