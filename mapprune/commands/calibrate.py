"""``mapprune calibrate``: scan a population of models and set the scan's rule on it, with held-out error rates."""

import argparse
from pathlib import Path

from .common import add_common, finite

NAME = "calibrate"


def add_parser(subparsers) -> argparse.ArgumentParser:
    cal = subparsers.add_parser(NAME, help="scan a population of models (run or bench folders) and calibrate the "
                                "scan's rule on it, with held-out error rates")
    cal.add_argument("paths", nargs="+", type=Path, help="run folders, bench folders holding runs/, or calibration "
                     "JSONs whose recorded models join the population (a run folder of the same name replaces one)")
    cal.add_argument("--out", type=Path, required=True, help="the calibration JSON to write (and a .md beside it)")
    cal.add_argument("--fpr", type=finite, default=0.05, help="the false-positive rate the threshold is set at "
                     "on the clean models (default %(default)s)")
    cal.add_argument("--no-nc", action="store_true", help="do not run Neural Cleanse (a baseline) in the scans")
    cal.add_argument("--no-mmbd", action="store_true", help="do not run MM-BD (a baseline) in the scans")
    cal.add_argument("--no-scan", action="store_true", help="use only the scans already made; scan nothing")
    cal.add_argument("--rule", default="fmt", help="the signals the rule reads: fmt (FMT's own, the default) or "
                     "fmt+mmbd (with MM-BD's score among them; scans then run MM-BD too)")
    add_common(cal)
    return cal


def run(args) -> int:
    """Calibrates, prints the calibration as markdown and how to use the file."""
    # lazy: the command's job imports torch; it loads only when the command runs
    from ..jobs.calibrate import calibrate, markdown

    cal = calibrate(args.paths, args.out, fpr=args.fpr, nc=not args.no_nc, mmbd=not args.no_mmbd,
                    scan_missing=not args.no_scan, rule=args.rule, data_dir=args.data_dir, device=args.device,
                    progress=not args.no_progress)
    print(markdown(cal))
    if cal["rule"] is None:
        print(f"population record: {args.out} (calibrate again with it and more models: mapprune calibrate "
              f"{args.out} MORE_RUNS --out NEW.json)")
    else:
        print(f"calibration: {args.out} (use it: mapprune scan MODEL --calibration {args.out})")
    return 0
