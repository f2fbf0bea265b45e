#!/usr/bin/env bash
# The comparison table of docs/results.md: attack runs on CIFAR-10 (CPU preset), then every defense variant
# with the paper's defaults on the same clean 10% subset. Usage: bash benchmarks/cifar_defenses.sh RUN [RUN...]
# Expects the runs made by:
#   mapprune attack badnets --dataset cifar10 --preset cpu --data-dir ../shared/data --out runs/cifar10-badnets
#   mapprune attack blended --dataset cifar10 --preset cpu --data-dir ../shared/data --out runs/cifar10-blended
set -euo pipefail
for run in "$@"; do
  mapprune defend ft "$run" --no-progress --overwrite
  mapprune defend fmt "$run" --no-progress --overwrite
  mapprune defend fmt "$run" --mask --no-progress --overwrite
  mapprune defend fmt "$run" --selection outlier --no-progress --overwrite
done
mapprune report "$@"
