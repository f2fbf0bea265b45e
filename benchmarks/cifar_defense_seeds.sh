#!/usr/bin/env bash
# The three-seed FT vs FMT table of docs/results.md (issue 4): FT and FMT-rank (paper defaults) with every seed
# in $SEEDS (default "0 1 2") on each run, then the mean, sd and range over seeds of every defense variant.
# Usage: [SEEDS="0 1 2"] [THREADS=1] bash benchmarks/cifar_defense_seeds.sh RUN [RUN...]
# Expects attack runs such as
#   mapprune attack ATTACK --dataset cifar10 --preset cpu --data-dir ../shared/data --out runs/cifar10-ATTACK
# A seed's results go to RUN/defense/ft-seedN and fmt-seedN (seed 0: ft, fmt); finished ones are kept, so an
# interrupted sweep resumes where it stopped.
set -euo pipefail
seeds=${SEEDS:-0 1 2}
for run in "$@"; do
  for seed in $seeds; do
    for defense in ft fmt; do
      folder="$run/defense/$defense$([ "$seed" = 0 ] || echo "-seed$seed")"
      if [ -f "$folder/result.json" ]; then
        echo "kept $folder"
      else
        mapprune defend "$defense" "$run" --seed "$seed" --threads "${THREADS:-1}" --no-progress
      fi
    done
  done
done
mapprune report "$@" --seeds
