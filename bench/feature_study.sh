#!/usr/bin/env bash
# The feature study of docs/results.md ("Which features: layer x transform"): the k-NN and Gaussian baselines on
# all 10 normal classes of CIFAR-10 and Fashion-MNIST for each layer and feature transform, on identical cached
# tensors (one cache per dataset and layer, every transform applied at fit time).
#
#   bash bench/feature_study.sh DATA OUT
#
# DATA holds c10_sub/ and fm_sub/, built by bench/make_subset.py (all test images, 1,000 random train images per
# class); OUT receives cache/<dataset>/ and runs/<dataset>__<layer>/. Extraction: EfficientNet-Lite0 with its
# packaged ImageNet weights, 224 px, bf16 forward, float16 storage, P = 16 (a cache of 20,000 images takes 8-9
# minutes on 2 cores). Existing caches and runs are kept (run resumes), so the script can be re-run after a stop.
set -euo pipefail
DATA=${1:?DATA folder}; OUT=${2:?OUT folder}
LAYERS=${LAYERS:-"final pre-activation block-4"}
FEATURES=${FEATURES:-"raw,l2,ssqrt-l2,standardize,pca-whiten"}
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python}
for ds in ${DATASETS:-c10_sub fm_sub}; do
  for layer in $LAYERS; do
    "$py" "$here/pipeline.py" run --dataset folder --data-root "$DATA/$ds" --backbone tf_efficientnet_lite0 \
      --layer "$layer" --precision bf16 --dtype float16 --patch-grid 4 --num-workers 1 \
      --cache-dir "$OUT/cache/$ds" --methods knn,gaussian --features "$FEATURES" \
      --runs-dir "$OUT/runs/${ds}__$layer" 2>&1 | grep -v "^fitted \|^kept \|^run .*false-alarm"
  done
done
