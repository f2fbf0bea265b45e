"""Which class does the stimulation test (``mapprune/probes/stimulation.py``) suspect in each run, and how
anomalous is it, at each level? One markdown row per run and level.

    python benchmarks/analysis/stimulation_table.py RUN [RUN ...] [--levels 4] [--seed 0] [--threads 1] [--data-dir DIR]

Uses exactly what ``mapprune scan RUN`` uses: the run's clean subset (10%, seed 0), FMT's stimulation at the given
level(s) on 30 class-balanced images of it. The run's manifest is read only to print the real target beside the
suspected one (a run trained with poison ratio 0 is a clean model: "none").
"""

import argparse
import time
from pathlib import Path

import torch

from mapprune.data import clean_subset
from mapprune.defenses import FMT
from mapprune.probes import ANOMALY_THRESHOLD
from mapprune.runs import load_run, read_manifest


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--levels", default="4", help="comma-separated levels in clean standard deviations")
    p.add_argument("--seed", type=int, default=0, help="the clean subset's and the test's seed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", help="dataset folder (default: $MAPPRUNE_DATA)")
    a = p.parse_args(argv)
    try:
        levels = [float(v) for v in a.levels.split(",")]
    except ValueError:
        p.error(f"--levels takes comma-separated numbers, got {a.levels!r}")
    if any(level <= 0 for level in levels):
        p.error(f"stimulation levels must be > 0, got {a.levels}")
    for folder in a.runs:
        if not (Path(folder) / "manifest.json").is_file():
            p.error(f"{folder} is not a run folder (no manifest.json)")
    if a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    torch.set_num_threads(a.threads)
    print("| model | real target | level | suspected (pull) | anomaly index | over the threshold "
          f"({ANOMALY_THRESHOLD:g}) | s |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for folder in a.runs:
        attack = read_manifest(folder)["attack"]
        real = "none" if attack.get("poison_ratio") == 0 else attack.get("target")
        run = load_run(folder, data_dir=a.data_dir)
        idx = clean_subset(run.dataset.y_train, 0.1, a.seed)
        x, y = run.dataset.x_train[idx], run.dataset.y_train[idx]
        for level in levels:
            t0 = time.perf_counter()
            st = FMT(stimulate=level, seed=a.seed).stimulation(run.model, x, y)
            seconds = time.perf_counter() - t0
            over = "yes" if st["anomaly_index"] > ANOMALY_THRESHOLD else "no"
            print(f"| {folder} | {real} | {level:g} | {st['target']} ({max(st['class_pull']):.2f}) | "
                  f"{st['anomaly_index']:.2f} | {over} | {seconds:.1f} |", flush=True)
            rows.append({"run": folder, "level": level, **st})
    return rows


if __name__ == "__main__":
    main()
