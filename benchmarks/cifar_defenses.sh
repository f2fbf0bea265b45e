#!/usr/bin/env bash
# The single-seed comparison table of docs/results.md: FT and FMT with both recipes, plus the paper recipe's
# variants (mask, outlier rule), on the same clean 10% subset. Usage: bash benchmarks/cifar_defenses.sh RUN...
# Expects attack runs such as
#   mapprune attack badnets --dataset cifar10 --preset cpu --data-dir ../shared/data --out runs/cifar10-badnets
set -euo pipefail
for run in "$@"; do
  mapprune defend ft "$run" --no-progress --overwrite
  mapprune defend fmt "$run" --no-progress --overwrite
  mapprune defend ft "$run" --recipe paper --no-progress --overwrite
  mapprune defend fmt "$run" --recipe paper --no-progress --overwrite
  mapprune defend fmt "$run" --recipe paper --mask --no-progress --overwrite
  mapprune defend fmt "$run" --recipe paper --selection outlier --no-progress --overwrite
done
mapprune report "$@"
