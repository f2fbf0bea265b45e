"""Adaptive attacks on the embedded digits (seconds per model): the adaptive attacks and a two-trigger model against FMT
(recommended recipe, the demo's digits settings) and FT, with what each regulariser changes (the largest per-map
trigger response, FMT's largest target pull and its suspected target). The CIFAR-10 grid is
benchmarks/grids/cifar10-adaptive.toml.

    python benchmarks/adaptive_digits.py [--out /tmp/adaptive-digits]
"""

import argparse
import tempfile
from pathlib import Path

import torch

from mapprune.data import clean_subset
from mapprune.defenses import create_defense
from mapprune.defenses.fmt import FMT
from mapprune.jobs.attack import attack_run
from mapprune.jobs.diagnose import trigger_response
from mapprune.metrics import evaluate
from mapprune.probes import class_pull, estimate_target
from mapprune.runs import load_run

PATCH2 = {"base_opts": {"patch_size": 2}}  # BadNets' default on 8x8 digits is a single pixel
MODELS = [("badnets", {"patch_size": 2}), ("distributed", PATCH2), ("fmt-evasive", PATCH2),
          ("multi", {"triggers": "badnets:0:patch_size=2,blended:5:alpha=0.3"})]
DIGITS = {"hflip": False, "batch_size": 32, "fraction": 1 / 8, "distill": 0.0}  # the demo's settings


def pct(m: dict) -> str:
    per = "".join(f" [{k}: {100 * v['asr']:.1f}]" for k, v in m.get("triggers", {}).items())
    return f"{100 * m['acc']:.2f} / {100 * m['asr']:.2f} / {100 * m['ra']:.2f}{per}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp())
    print("| model | ACC / ASR / RA | largest trigger response (z) | FMT target pull, suspected | FMT | FT |")
    print("|---|---|---|---|---|---|")
    for name, kw in MODELS:
        run = out / name
        if not (run / "manifest.json").is_file():
            attack_run(name, run, dataset="digits", preset="demo", progress=False, attack_kw=kw)
        r = load_run(run)
        x, y = r.dataset.x_test, r.dataset.y_test
        xc = x[y != r.attack.target][:200]
        shift = max(float(v.max()) for v in trigger_response(r.model, xc, r.attack.apply(xc)).values())
        test = FMT(fraction=0.125).probe(r.model, r.dataset.x_train[:500], r.dataset.y_train[:500])
        pull = float(class_pull(test)[:, r.attack.target].max())
        guess = estimate_target(test)
        idx = clean_subset(r.dataset.y_train, 0.1, 0)
        xs, ys = r.dataset.x_train[idx], r.dataset.y_train[idx]
        fmt = evaluate(FMT(**DIGITS).repair(r.model, xs, ys).model, r.test_sets())
        ft = evaluate(create_defense("ft", hflip=False, batch_size=32, distill=0.0).repair(r.model, xs, ys).model,
                      r.test_sets())
        print(f"| {name} | {pct(evaluate(r.model, r.test_sets()))} | {shift:.2f} | {pull:.3f}, class "
              f"{guess['target']} ({guess['anomaly_index']:.1f}) | {pct(fmt)} | {pct(ft)} |", flush=True)


if __name__ == "__main__":
    main()
