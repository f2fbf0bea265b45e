"""Which class do FMT's field probes (warp, smooth) suspect under each null (`--opt field_null=sign|field`)? From one
testing pass per model: the probes' stepped images are the same, only the null their pull is measured against
differs (`sign`: every pixel +-eps, the size read as an intensity; `field`: a random field of the probe's own kind
and size). The suspected class picks the maps whose candidate triggers FMT unlearns. The real target (from the
run's manifest) is printed to judge the nulls, never used by them.

    python benchmarks/analysis/field_null.py RUN [RUN ...] [--data-dir ../shared/data] [--threads 1]
"""

import argparse
import dataclasses
from pathlib import Path

import torch

from mapprune.data import clean_subset
from mapprune.defenses.fmt import FMT
from mapprune.images import as_unit
from mapprune.probes import estimate_target, null_images, random_start
from mapprune.runs import load_run


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders")
    ap.add_argument("--data-dir", help="dataset folder (default: $MAPPRUNE_DATA)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    for path in args.runs:
        if not (Path(path) / "manifest.json").is_file():
            ap.error(f"{path} is not a run folder (no manifest.json)")
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    print("| model | target | probe | sign: suspected (anomaly) | field: suspected (anomaly) | pull to target: sign / field |")
    print("|---|---|---|---|---|---|")
    for path in args.runs:
        r = load_run(path, data_dir=args.data_dir)
        fmt = FMT(hflip=r.dataset.hflip)
        idx = clean_subset(r.dataset.y_train, 0.1, fmt.seed)  # the defenders' subset, as `mapprune defend` draws it
        data = fmt.split(r.dataset.x_train[idx], r.dataset.y_train[idx])
        x, y = data.x, data.y
        model = r.model.eval()
        fields = {"warp": fmt.unlearn_warp, "smooth": fmt.unlearn_smooth}
        judged = {o: fmt.field_images for o in fields}
        tests = fmt.probes(model, x, y, {fmt.objective: fmt.eps, **fields}, judged)
        xt, yt = fmt.test_images(x, y)
        x0 = random_start(as_unit(xt, yt), fmt.alpha, fmt.seed)
        targets = sorted({p.target for p in getattr(r.attack, "parts", [r.attack])})
        for objective, eps in fields.items():
            old = tests[objective]
            with torch.inference_mode():
                null = model(null_images(objective, x0, eps, fmt.seed + 1, "field")[: len(old.labels)]).float()
            new = dataclasses.replace(old, null_probs=null.softmax(1).cpu())
            a, b = estimate_target(old), estimate_target(new)
            pulls = " ; ".join(f"{a['class_pull'][t]:+.2f} / {b['class_pull'][t]:+.2f}" for t in targets)
            print(f"| {path} | {','.join(map(str, targets))} | {objective} | {a['target']} ({a['anomaly_index']:.1f}) | "
                  f"{b['target']} ({b['anomaly_index']:.1f}) | {pulls} |", flush=True)


if __name__ == "__main__":
    main()
