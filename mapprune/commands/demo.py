"""``mapprune demo``: backdoor a small CNN on the embedded digits, repair it with FMT, print the table."""

import argparse
from pathlib import Path

from .common import add_common

NAME = "demo"


def add_parser(subparsers) -> argparse.ArgumentParser:
    d = subparsers.add_parser(NAME, help="backdoor a model on the embedded digits and measure it (about a minute)")
    d.add_argument("--out", type=Path, help="keep the run folder here (default: a temporary folder)")
    add_common(d)
    return d


def run(args) -> int:
    """Runs the demo (it prints its own steps and table)."""
    # lazy: the command's job imports torch; it loads only when the command runs
    from ..jobs.demo import demo

    demo(out=args.out, device=args.device, progress=not args.no_progress)
    return 0
