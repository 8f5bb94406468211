"""Extraction throughput of a torchrun job against one process, as ratios measured in one run (
docs/performance.md, "Many ranks").

    python bench/scaleout.py                              # CPU: 2 ranks x 1 thread against 1 process x 2 threads
    python bench/scaleout.py --device cuda --ranks 2      # several GPUs: 2 ranks (one GPU each) against 1 process

Both configurations extract the same dataset (default: scikit-learn's 1,797 digits, nothing downloaded) into a
fresh cache folder, alternately, ``--repeats`` times each; the best of each is reported. The encoding rate is the
command's ``encoded N images in S s`` line (rank 0's encoding wall time, waiting for the slowest rank included;
process start, backbone creation and HDF5 assembly excluded); the whole command's wall time is reported too
(for torchrun: its start, the rendezvous and the process group included). On a CPU the ranks share the same
cores as the threads of the single process, so the ratio says how well chunks over processes use the cores
against intra-op threads, not how a job scales over devices. The caches are compared (largest feature
difference) so that a fast wrong result cannot pass unnoticed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ENCODED = re.compile(r"encoded (\d+) images in ([0-9.]+) s")


def extract_command(args, cache_dir: Path, ranks: int) -> list[str]:
    options = ["extract", "--dataset", args.dataset, "--backbone", args.backbone, "--batch-size", str(args.batch_size),
               "--commit-every", str(args.commit_every), "--num-workers", str(args.num_workers), "--device",
               args.device, "--precision", args.precision, "--cache-dir", str(cache_dir)]
    if args.img_size:
        options += ["--img-size", str(args.img_size)]
    if args.random_init:
        options.append("--random-init")
    if ranks == 1:
        return [sys.executable, "pipeline.py", *options]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
            "pipeline.py", *options]


def measure(args, work: Path, ranks: int, threads: int, repeat: int) -> dict:
    """One extraction: ``ranks`` processes with ``threads`` intra-op threads each."""
    cache_dir = work / f"r{ranks}-{repeat}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(extract_command(args, cache_dir, ranks), cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"extraction with {ranks} rank(s) failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    images, seconds = ENCODED.search(done.stdout).groups()
    (cache,) = cache_dir.glob("*.h5")
    return {"ranks": ranks, "threads": threads, "images": int(images), "encode_s": float(seconds),
            "images_per_s": int(images) / float(seconds), "wall_s": wall, "cache": str(cache)}


def largest_difference(a: str, b: str) -> float:
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        for split in ("train", "test"):
            for name in ("label", "sample_id"):
                if not np.array_equal(fa[split][name][:], fb[split][name][:]):
                    raise SystemExit(f"{split}/{name} differ between {a} and {b}")
        return max(float(np.abs(fa[s][n][:].astype(np.float64) - fb[s][n][:]).max())
                   for s in ("train", "test") for n in ("cls", "patches"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2, help="processes of the torchrun job")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads in all (CPU): the single process gets them all, each rank its share; "
                             "default: the number of CPUs")
    parser.add_argument("--repeats", type=int, default=2, help="extractions per configuration, alternating")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0", help="default: the packaged ImageNet weights")
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--commit-every", type=int, default=2, help="batches per chunk (the unit shared out)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader decoding processes per rank")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for scaleout.json")
    args = parser.parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    per_rank = max(1, threads // args.ranks)
    results = []
    with tempfile.TemporaryDirectory(prefix="scaleout-") as tmp:
        for repeat in range(args.repeats):
            for ranks, t in ((1, threads), (args.ranks, per_rank)):
                results.append(measure(args, Path(tmp), ranks, t, repeat))
                r = results[-1]
                print(f"{ranks} rank(s) x {t} thread(s): {r['images_per_s']:.1f} images/s encoding, "
                      f"{r['wall_s']:.1f} s whole command", flush=True)
        best = {ranks: max((r for r in results if r["ranks"] == ranks), key=lambda r: r["images_per_s"])
                for ranks in (1, args.ranks)}
        fastest_wall = {ranks: min(r["wall_s"] for r in results if r["ranks"] == ranks) for ranks in (1, args.ranks)}
        difference = largest_difference(best[1]["cache"], best[args.ranks]["cache"])
    one, many = best[1], best[args.ranks]
    summary = {
        "machine": f"{os.cpu_count()} CPUs", "load_average_1min": os.getloadavg()[0], "device": args.device,
        "backbone": args.backbone, "dataset": args.dataset, "precision": args.precision, "batch_size": args.batch_size,
        "commit_every": args.commit_every, "num_workers": args.num_workers, "repeats": args.repeats,
        "single": {"threads": threads, "images_per_s": one["images_per_s"], "wall_s": fastest_wall[1]},
        "job": {"ranks": args.ranks, "threads_per_rank": per_rank, "images_per_s": many["images_per_s"],
                "wall_s": fastest_wall[args.ranks]},
        "encode_ratio": many["images_per_s"] / one["images_per_s"],
        "wall_ratio": fastest_wall[1] / fastest_wall[args.ranks],
        "largest_feature_difference": difference,
        "runs": [{k: v for k, v in r.items() if k != "cache"} for r in results],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaleout.json").write_text(json.dumps(summary, indent=1))
    print(f"| configuration | encoding images/s | whole command s |\n|---|---|---|\n"
          f"| 1 process x {threads} threads | {one['images_per_s']:.1f} | {fastest_wall[1]:.1f} |\n"
          f"| {args.ranks} ranks x {per_rank} thread(s) | {many['images_per_s']:.1f} | "
          f"{fastest_wall[args.ranks]:.1f} |\n"
          f"encoding ratio {summary['encode_ratio']:.3f}, whole-command speed ratio {summary['wall_ratio']:.3f}, "
          f"largest feature difference {difference:.2e}; wrote {out / 'scaleout.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
