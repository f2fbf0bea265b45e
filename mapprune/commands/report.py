"""``mapprune report``: a markdown table (or JSON) of runs and their defenses."""

import argparse
import json
from pathlib import Path

NAME = "report"


def add_parser(subparsers) -> argparse.ArgumentParser:
    rp = subparsers.add_parser(NAME, help="print a markdown table of runs and their defenses")
    rp.add_argument("runs", type=Path, nargs="+")
    rp.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    rp.add_argument("--compare", nargs="?", const="", metavar="D1,D2,...",
                    help="attacks as rows, defense variants as columns (ACC / ASR / RA, means over seeds), in the "
                         "order given (default: none, ft, fmt, then the rest)")
    rp.add_argument("--seeds", action="store_true",
                    help="one row per defense variant: mean ± sd over its seeds (folders NAME, NAME-seedN)")
    return rp


def run(args) -> int:
    """Prints the runs' rows: per run and defense, per variant over seeds (--seeds), or attacks x variants
    (--compare); markdown, or JSON with --json."""
    # lazy: mapprune.results imports torch; it loads only when the command runs
    from ..results import collect_rows, comparison_table, markdown_seed_table, markdown_table, seed_summary

    rows = collect_rows(args.runs)
    if args.compare is not None:
        groups = seed_summary(rows)
        chosen = [d for d in args.compare.split(",") if d] or None
        print(json.dumps(groups) if args.json else comparison_table(groups, chosen))
    elif args.seeds:
        groups = seed_summary(rows)
        print(json.dumps(groups) if args.json else markdown_seed_table(groups))
    else:
        print(json.dumps(rows) if args.json else markdown_table(rows))
    return 0
