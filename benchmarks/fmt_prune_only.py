"""What FMT's pruning alone does (no fine-tune), for one defense seed, with both rankings of the probe's maps.

    python benchmarks/fmt_prune_only.py RUN SEED

Probes the run's model as the recommended FMT does with that seed (its clean subset, 32 images, patch probe),
prints the suspected target, then the full-test-set ACC / ASR / RA after pruning the 25-map budget ranked by
accuracy (the recipe's) and by the pull towards the suspected target.
"""

import copy
import sys

import torch

from mapprune.data import clean_subset
from mapprune.defenses import FMT
from mapprune.defenses.pruning import prune
from mapprune.metrics import evaluate
from mapprune.probes import estimate_target, suspicion
from mapprune.runs import load_run


def main(run: str, seed: int) -> None:
    torch.set_num_threads(1)
    r = load_run(run)
    idx = clean_subset(r.dataset.y_train, 0.1, seed)
    x, y = r.dataset.x_train[idx], r.dataset.y_train[idx]
    tests = r.test_sets()
    d = FMT(seed=seed)
    test = d.probe(r.model, x, y)
    est = estimate_target(test)
    print("suspected target", est["target"], "anomaly", round(est["anomaly_index"], 1), "pull", max(est["class_pull"]))
    for scorer in ("accuracy", "target"):
        ranked = test.acc if scorer == "accuracy" else {
            k: -v for k, v in suspicion(test, "target", est["target"]).items()}
        m = copy.deepcopy(r.model)
        prune(m, d.choose(ranked), x[:1].float() / 255)
        print(scorer, {k: round(100 * v, 2) for k, v in evaluate(m, tests).items()}, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
