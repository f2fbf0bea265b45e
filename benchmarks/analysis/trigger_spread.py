"""How widely does a model's backdoor spread over its feature maps (what an adaptive attack changed inside it)? Per
trigger, the largest per-map trigger response (a z-score of the shift between triggered and clean test images,
`mapprune diagnose`'s measure) and how many maps respond above z = 2 and 3. The real trigger is used here to
describe the model, never inside a defense. (What FMT's probe saw, its suspected target and per-class pull, is in
each FMT result.json: `suspected_target`.)

    python benchmarks/analysis/trigger_spread.py RUN [RUN ...] [--data-dir ../shared/data] [--images 500] [--threads 1]
"""

import argparse
from pathlib import Path

import torch

from mapprune.jobs.diagnose import trigger_response
from mapprune.runs import load_run


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders")
    ap.add_argument("--data-dir", help="dataset folder (default: $MAPPRUNE_DATA)")
    ap.add_argument("--images", type=int, default=500, help="clean test images per trigger (default 500)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    for path in args.runs:
        if not (Path(path) / "manifest.json").is_file():
            ap.error(f"{path} is not a run folder (no manifest.json)")
    if args.images < 2 or args.threads < 1:
        ap.error(f"--images must be >= 2 and --threads >= 1, got {args.images} and {args.threads}")
    torch.set_num_threads(args.threads)
    print("| model | trigger | largest response (z) | maps z > 2 | maps z > 3 |")
    print("|---|---|---|---|---|")
    rows = []
    for path in args.runs:
        r = load_run(path, data_dir=args.data_dir)
        d = r.dataset
        parts = getattr(r.attack, "parts", [r.attack])
        for a in parts:
            xc = d.x_test[d.y_test != a.target][: args.images]
            z = torch.cat(list(trigger_response(r.model, xc, a.apply(xc)).values()))
            print(f"| {path} | {a.name} -> {a.target} | {z.max():.2f} | {int((z > 2).sum())} | {int((z > 3).sum())} |",
                  flush=True)
            rows.append({"run": path, "trigger": a.name, "target": a.target, "z": z})
    return rows


if __name__ == "__main__":
    main()
