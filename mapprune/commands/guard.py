"""``mapprune guard``: input-level backdoor detection. Each detector fitted on the defender's clean images, its
threshold set on other clean images at a false-positive rate, then measured on the run's clean and triggered test
images (AUROC, detection rate, the false-positive rate reached, cost per image beside the bare model's)."""

import argparse
from pathlib import Path

from ..errors import MapPruneError
from .common import add_common, finite, key_values, ratio

NAME = "guard"


def add_parser(subparsers) -> argparse.ArgumentParser:
    # lazy: the detectors import torch: kept out of `import mapprune.cli`, though build_parser loads them for the help
    from ..guard import INPUT_DETECTORS

    gd = subparsers.add_parser(NAME, help="flag triggered inputs at inference: STRIP, SCALE-UP, TeCo, IBD-PSC and "
                               "FMT's suspicious maps, calibrated on clean images at a false-positive rate")
    gd.add_argument("run", type=Path, help="the run folder")
    gd.add_argument("--defense", help="guard the model a defense wrote (RUN/defense/NAME; default: the run's own model)")
    gd.add_argument("--detector", nargs="+", default=["all"], metavar="NAME",
                    help=f"which detectors: {', '.join(INPUT_DETECTORS)}, or all (default %(default)s)")
    gd.add_argument("--detector-opt", action="append", default=[], metavar="NAME.KEY=VALUE",
                    help="a detector's setting, e.g. strip.overlays=50 or fmt.statistic=mean (repeatable)")
    gd.add_argument("--fpr", type=finite, default=0.05, help="the false-positive rate every threshold is calibrated "
                    "at, on held-out clean images (default %(default)s)")
    gd.add_argument("--clean-ratio", type=ratio, help="the defender's clean share of the training set (default: the "
                    "defenses' share, 0.1 on most datasets)")
    gd.add_argument("--test-images", type=int, help="measure on at most this many images of each test set, drawn "
                    "with --seed (default: all)")
    gd.add_argument("--seed", type=int, default=0, help="the clean subset, its fit/calibration split and the "
                    "detectors' random draws (default %(default)s)")
    gd.add_argument("--json", action="store_true", help="print the reports as JSON (without the per-image scores)")
    add_common(gd)
    return gd


def detector_options(pairs: list[str]) -> dict[str, dict]:
    """``NAME.KEY=VALUE`` strings -> {NAME: {KEY: VALUE}} (VALUE read as JSON where it is JSON)."""
    out: dict[str, dict] = {}
    for pair in pairs:
        head, sep, _ = pair.partition("=")
        name, dot, key = head.partition(".")
        if not sep or not dot or not name or not key:
            raise MapPruneError(f"--detector-opt takes NAME.KEY=VALUE (e.g. strip.overlays=50), got {pair!r}")
        out.setdefault(name, {}).update(key_values([pair[len(name) + 1:]], "--detector-opt"))
    return out


def run(args) -> int:
    """Fits, calibrates and measures the detectors; writes RUN/guard/VARIANT/DETECTOR.json; prints a table."""
    # lazy: the command's job imports torch; it loads only when the command runs
    from ..jobs.guard import guard
    from ..runs import json_text

    options = detector_options(args.detector_opt)
    report = guard(args.run, defense=args.defense, detectors=args.detector, options=options, fpr=args.fpr,
                   seed=args.seed, clean_ratio=args.clean_ratio, test_images=args.test_images,
                   data_dir=args.data_dir, device=args.device, log=None if args.json else print)
    if args.json:
        for r in report["detectors"].values():
            r.pop("scores")
            r.pop("clean_subset")
        report.pop("clean_subset")
        print(json_text(report, indent=1))
        return 0
    print(f"reports in {Path(args.run) / 'guard' / (args.defense or 'model')}/; TPR and FPR at the threshold "
          f"calibrated on clean training images, the FPR measured on the clean test images")
    return 0
