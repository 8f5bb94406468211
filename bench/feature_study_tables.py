"""Markdown tables of the feature study (docs/results.md) from the AUROC files that ``bench/feature_study.sh`` and
``pipeline.py score`` wrote: one row per (layer, transform), the mean AUROC over the normal classes of each
method's primary score, per dataset.

    python bench/feature_study_tables.py OUT/runs            # baselines: OUT/runs/<dataset>__<layer>/auroc.csv
    python bench/feature_study_tables.py OUT/runs_flow --per-class   # flows: OUT/runs_flow/<dataset>/auroc.csv
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

TRANSFORMS = ["raw", "l2", "ssqrt-l2", "standardize", "pca-whiten"]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flow.store.run_folder import PRIMARY_SCORES as PRIMARY  # noqa: E402 (after sys.path is extended)


def read(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("*/auroc.csv")):
        dataset, _, layer = path.parent.name.partition("__")
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                if PRIMARY.get(row["method"]) == row["score"]:
                    layer_here = layer or "final"
                    # the transform is the setting label (empty = raw)
                    rows.append({**row, "study_dataset": dataset, "layer": layer_here,
                                 "transform": row["setting"] or "raw"})
    return rows


def _order(key: tuple[str, str]) -> tuple:
    layer, transform = key
    return (layer != "final", layer != "pre-activation", layer,
            TRANSFORMS.index(transform) if transform in TRANSFORMS else len(TRANSFORMS), transform)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--per-class", action="store_true", help="one column per normal class")
    args = parser.parse_args()
    rows = read(args.folder)
    methods = [m for m in PRIMARY if any(r["method"] == m for r in rows)]
    for dataset in sorted({r["study_dataset"] for r in rows}):
        mine = [r for r in rows if r["study_dataset"] == dataset]
        cell = defaultdict(list)
        for r in mine:
            cell[(r["layer"], r["transform"], r["method"], r["normal_name"])].append(float(r["auroc"]))
        classes = sorted({r["normal_name"] for r in mine})
        print(f"\n{dataset}: mean AUROC over {len(classes)} normal classes (primary score of each method)\n")
        if args.per_class:
            print("| layer | transform | method | " + " | ".join(classes) + " | mean |")
            print("|---" * (len(classes) + 4) + "|")
            for layer, transform in sorted({(r["layer"], r["transform"]) for r in mine}, key=_order):
                for m in methods:
                    values = [cell.get((layer, transform, m, c)) for c in classes]
                    if not any(values):
                        continue
                    means = [sum(v) / len(v) for v in values if v]
                    print(f"| {layer} | {transform} | {m} | " + " | ".join(
                        f"{sum(v) / len(v):.3f}" if v else "-" for v in values) + f" | {sum(means) / len(means):.3f} |")
            continue
        print("| layer | transform | " + " | ".join(f"{m} {PRIMARY[m]}" for m in methods) + " |")
        print("|---" * (len(methods) + 2) + "|")
        for layer, transform in sorted({(r["layer"], r["transform"]) for r in mine}, key=_order):
            out = []
            for m in methods:
                per_class = [cell[(layer, transform, m, c)] for c in classes if cell.get((layer, transform, m, c))]
                out.append(f"{sum(sum(v) / len(v) for v in per_class) / len(per_class):.4f}" if per_class else "-")
            print(f"| {layer} | {transform} | " + " | ".join(out) + " |")


if __name__ == "__main__":
    main()
