#!/bin/bash
# Regenerate the data of tests/data/old_runs with the code of commit d73c3ab: run from the root of a checkout of
# d73c3ab, e.g.  PY=/path/to/python tests/data/old_runs/make.sh /tmp/old_runs  (see README.md there).
# OUTDIR must not exist yet; copy its cache/, runs/, images/ and expected/ over those of tests/data/old_runs.
set -euo pipefail
OUT=${1:?usage: make.sh OUTDIR}
PY=${PY:-python}
if [ -e "$OUT" ]; then echo "$OUT exists; give a new folder" >&2; exit 2; fi
mkdir -p "$OUT"
$PY - "$OUT" <<'PYEOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
sys.path.insert(0, "tests")
from conftest import make_image_tree
out = Path(sys.argv[1])
make_image_tree(out / "data", per_split={"train": 16, "test": 8})
# images for predict: five of the test split, and two that need other preprocessing (grayscale, 20 x 16 RGB)
pred = out / "images"
pred.mkdir()
for name in ("blue/000.png", "blue/001.png", "blue/002.png", "blue/003.png", "red/000.png"):
    (pred / name.replace("/", "_")).write_bytes((out / "data" / "test" / name).read_bytes())
rng = np.random.default_rng(3)
Image.fromarray(rng.integers(0, 255, (20, 16, 3), dtype=np.uint8)).save(pred / "rgb_20x16.png")
Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(pred / "gray.png")
PYEOF
$PY pipeline.py extract --dataset folder --data-root "$OUT/data" --backbone test_vit --random-init --img-size 32 \
    --patch-grid 2 --num-workers 0 --device cpu --cache-dir "$OUT/cache"
CACHE=$(ls "$OUT"/cache/*.h5)
COMMON=(--cache "$CACHE" --runs-dir "$OUT/runs" --normal blue --val-fraction 0.25 --device cpu)
$PY pipeline.py fit "${COMMON[@]}" --method sanf --hidden 8 --blocks 2 --epochs 1
$PY pipeline.py fit "${COMMON[@]}" --method sanf-nocaff --hidden 8 --blocks 2 --epochs 1 --features standardize
$PY pipeline.py fit "${COMMON[@]}" --method knn --features pca-whiten
$PY pipeline.py fit "${COMMON[@]}" --method gaussian
$PY pipeline.py score --runs-dir "$OUT/runs" --device cpu --alpha 0.5
mkdir -p "$OUT/expected"
for run in "$OUT"/runs/*/; do
    name=$(basename "$run")
    $PY pipeline.py predict "$run" "$OUT/images" --out "$OUT/expected/$name.predictions.csv" --alpha 0.5 \
        --num-workers 0 --device cpu
    mv "$run/scores.csv" "$OUT/expected/$name.scores.csv"
done
mv "$OUT/runs/auroc.csv" "$OUT/runs/auroc_by_anomaly.csv" "$OUT/expected/"
rm -rf "$OUT/data"
