"""How long to train the flow: held-out normal loss and test AUROC against optimiser steps, at several train sizes
(docs/results.md, "Training length").

For each train size n (a seeded random subset of the normal class's train rows), the flow is trained with the
paper's optimiser for up to ``--max-steps`` steps. A fraction of the n rows is held out (``--val-fraction``, as
``fit --val-fraction`` chooses them) and their loss is recorded after every epoch; at log-spaced step counts the
test AUROC of both scores is recorded too, on a seeded subset of the test split. The test AUROC is recorded to
*measure* a rule (fixed epochs, fixed steps, stop at the held-out minimum), never to choose a run's model.

    python bench/train_length.py --cache CACHE.h5 --normal automobile --train-rows 250,1000,4000 \\
        --max-steps 2000 --out train_length.csv

One CSV row per (n, epoch): n, epoch, step, train loss (nats/dim, docs/method.md eq. (23)), held-out loss (same unit,
without the constant), and, at the checkpoints, AUROC of nll and z2. Rows are appended and flushed as they come, so a
killed run keeps what it measured.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache.reader import FeatureCache  # noqa: E402
from flow.detectors.transforms import FeatureTransform
from flow.experiments.fitting import resolve_normal, split_holdout
from flow.experiments.metrics import auroc
from flow.model.sanf import FlowConfig, SANFFlow
from flow.model.train import TrainConfig, fit_flow, score_batches

COLUMNS = ["dataset", "normal", "method", "features", "n", "n_fit", "n_val", "epoch", "step", "train_loss",
           "val_loss", "auroc_nll", "auroc_z2", "seconds", "rule"]


def checkpoints(max_steps: int, first: int = 16) -> list[int]:
    """Step counts at which the test AUROC is recorded: first, 2 first, 4 first, ... and max_steps."""
    out, s = [], first
    while s < max_steps:
        out.append(s)
        s *= 2
    return out + [max_steps]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--normal", required=True)
    ap.add_argument("--train-rows", default="all", help="comma-separated train sizes n, or 'all'")
    ap.add_argument("--max-steps", type=int, default=2000)
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--test-rows", type=int, default=2000, help="test rows scored at checkpoints (seeded subset)")
    ap.add_argument("--method", choices=["sanf", "sanf-nocaff"], default="sanf")
    ap.add_argument("--features", default="raw")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--early-stop", action="store_true",
                    help="train with fit --early-stop's rule (at most --max-steps) and add a row 'early-stop' for "
                         "the model it keeps")
    ap.add_argument("--label", default="", help="dataset label of the rows (default: the cache's dataset)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    with FeatureCache(args.cache) as fc:
        k = resolve_normal(args.normal, fc.class_names)[0]
        train, test = fc.split("train"), fc.split("test")
        rows = train.rows_of_class(k)
        cls_all, patches_all = train.read(rows)
        rng = np.random.default_rng(args.seed)
        test_rows = np.arange(test.num_rows)
        if args.test_rows < test.num_rows:
            test_rows = np.sort(rng.choice(test.num_rows, args.test_rows, replace=False))
        test_cls, test_patches = test.read(test_rows)
        is_anomaly = (test.labels[test_rows] != k).astype(np.int64)
        label = args.label or fc.attrs["dataset"]
        dim = int(fc.attrs["feature_dim"])
    sizes = [len(rows)] if args.train_rows == "all" else [int(v) for v in args.train_rows.split(",")]
    use_caff = args.method == "sanf"
    out = Path(args.out)
    new = not out.exists()
    with out.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        if new:
            writer.writeheader()
        for n in sizes:
            if n > len(rows):
                sys.exit(f"--train-rows {n}: the normal class has {len(rows)} train rows")
            pick = np.sort(np.random.default_rng(args.seed + n).choice(len(rows), n, replace=False))
            fit_idx, val_idx = (i.numpy() for i in split_holdout(n, args.val_fraction, args.seed))
            cls_fit, cls_val = cls_all[pick][fit_idx], cls_all[pick][val_idx]
            transform = FeatureTransform(args.features).fit(cls_fit)
            tensors = [torch.from_numpy(transform(a)) if a is not None else None for a in (
                cls_fit, patches_all[pick][fit_idx] if use_caff else None, cls_val,
                patches_all[pick][val_idx] if use_caff else None, test_cls, test_patches if use_caff else None)]
            steps_per_epoch = TrainConfig().steps_per_epoch(len(fit_idx))
            epochs = math.ceil(args.max_steps / steps_per_epoch)
            marks = checkpoints(epochs * steps_per_epoch, first=min(16, steps_per_epoch * 2))
            start = time.perf_counter()
            head = {"dataset": label, "normal": args.normal, "method": args.method, "features": args.features,
                    "n": n, "n_fit": len(fit_idx), "n_val": len(val_idx)}

            def write(model, epoch, step, result=None, rule="", score=True, head=head, start=start, tensors=tensors):
                """One CSV row: the losses so far and, when ``score``, the test AUROC of ``model``."""
                row = {**head, "epoch": epoch, "step": step, "rule": rule,
                       "seconds": f"{time.perf_counter() - start:.1f}" if result is not None else "0.0"}
                if result is not None:
                    row["train_loss"] = f"{result.epoch_losses[-1]:.4f}"
                    row["val_loss"] = f"{result.val_losses[-1]:.4f}" if result.val_losses else ""
                if score:
                    scores = score_batches(model, tensors[4], tensors[5])
                    row["auroc_nll"] = f"{auroc(is_anomaly, scores['nll']):.4f}"
                    row["auroc_z2"] = f"{auroc(is_anomaly, scores['z2']):.4f}"
                writer.writerow(row)
                handle.flush()

            def on_epoch(epoch, model, result, marks=marks, write=write, steps_per_epoch=steps_per_epoch):
                step = epoch * steps_per_epoch
                write(model, epoch, step, result, score=any(step >= m > step - steps_per_epoch for m in marks))

            config = FlowConfig(dim=dim, use_caff=use_caff)
            torch.manual_seed(args.seed)  # the initialisation fit_flow starts from (step 0)
            write(SANFFlow(config), 0, 0)
            train_config = TrainConfig(epochs=epochs, early_stop=args.early_stop)
            model, result = fit_flow(tensors[0], tensors[1], config, train_config,
                                     seed=args.seed, device="cpu", progress=False, val_cls=tensors[2],
                                     val_patches=tensors[3], on_epoch=on_epoch)
            if args.early_stop:
                write(model, len(result.epoch_losses), result.num_steps, result,
                      rule="early-stop" if result.stopped_early else "early-stop (not triggered)")
            print(f"{label} {args.normal} n={n}: {epochs} epochs of {steps_per_epoch} steps, "
                  f"{time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
