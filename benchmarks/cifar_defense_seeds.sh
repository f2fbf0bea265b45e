#!/usr/bin/env bash
# The three-seed defense table of docs/results.md: every defense variant in $VARIANTS (default: FMT and FT with
# the recommended recipe, and both with the paper's recipe) with every seed in $SEEDS (default "0 1 2") on each
# run, then the mean, sd and range over seeds of every variant.
# Usage: [SEEDS="0 1 2"] [VARIANTS="fmt ft fmt:paper ft:paper"] [THREADS=1] bash benchmarks/cifar_defense_seeds.sh RUN...
# A variant is DEFENSE or DEFENSE:RECIPE. Expects attack runs such as
#   mapprune attack ATTACK --dataset cifar10 --preset cpu --data-dir ../shared/data --out runs/cifar10-ATTACK
# Results go to RUN/defense/<variant>[-seedN] (fmt, fmt-paper, ft-seed1, ...); finished ones are kept, so an
# interrupted sweep resumes where it stopped.
set -euo pipefail
seeds=${SEEDS:-0 1 2}
variants=${VARIANTS:-fmt ft fmt:paper ft:paper}
for run in "$@"; do
  for seed in $seeds; do
    for variant in $variants; do
      defense=${variant%%:*}
      recipe=recommended
      [ "$variant" = "$defense" ] || recipe=${variant#*:}
      name=$defense$([ "$recipe" = recommended ] || echo "-$recipe")
      folder="$run/defense/$name$([ "$seed" = 0 ] || echo "-seed$seed")"
      if [ -f "$folder/result.json" ]; then
        echo "kept $folder"
      else
        mapprune defend "$defense" "$run" --recipe "$recipe" --seed "$seed" --threads "${THREADS:-1}" --no-progress
      fi
    done
  done
done
mapprune report "$@" --seeds
