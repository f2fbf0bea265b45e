"""What an adaptive attack changed inside a model: per trigger, the largest per-map trigger response (a
z-score of the shift between triggered and clean test images, `mapprune diagnose`'s measure), how many maps
respond above z = 2 and 3. The real trigger is used here to describe the model, never inside a defense. (What
FMT's probe saw, its suspected target and per-class pull, is in each FMT result.json: `suspected_target`.)

    python benchmarks/analysis/trigger_spread.py RUN [RUN ...] [--data-dir ../shared/data] [--images 500]
"""

import argparse

import torch

from mapprune.jobs.diagnose import trigger_response
from mapprune.runs import load_run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--data-dir")
    ap.add_argument("--images", type=int, default=500, help="clean test images per trigger (default 500)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| model | trigger | largest response (z) | maps z > 2 | maps z > 3 |")
    print("|---|---|---|---|---|")
    for path in args.runs:
        r = load_run(path, data_dir=args.data_dir)
        d = r.dataset
        parts = getattr(r.attack, "parts", [r.attack])
        for a in parts:
            xc = d.x_test[d.y_test != a.target][: args.images]
            z = torch.cat(list(trigger_response(r.model, xc, a.apply(xc)).values()))
            print(f"| {path} | {a.name} -> {a.target} | {z.max():.2f} | {int((z > 2).sum())} | {int((z > 3).sum())} |",
                  flush=True)


if __name__ == "__main__":
    main()
