"""``mapprune import-backdoorbench``: a BackdoorBench attack result as a mapprune run folder."""

import argparse
from pathlib import Path

from .common import add_common, key_values

NAME = "import-backdoorbench"


def add_parser(subparsers) -> argparse.ArgumentParser:
    ib = subparsers.add_parser(NAME, help="a BackdoorBench attack result as a mapprune run folder")
    ib.add_argument("path", type=Path, help="BackdoorBench's attack_result.pt, or the record folder holding it")
    ib.add_argument("--out", required=True, type=Path, help="run folder to write")
    ib.add_argument("--attack", required=True,
                    help="BackdoorBench's attack (its name is not in the file): badnet, blended (with --pattern), sig, "
                         "wanet (grids from the file, state_dict.pt beside it, or --attack-opt grids=FILE)")
    ib.add_argument("--pattern", type=Path, metavar="IMG", help="blended: the blend image the attack used")
    ib.add_argument("--target", type=int, default=0,
                    help="the attack's target label (default %(default)s, BackdoorBench's)")
    ib.add_argument("--attack-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="an attack setting, e.g. --attack-opt alpha=0.2 (repeatable)")
    ib.add_argument("--overwrite", action="store_true", help="replace a run already at --out")
    add_common(ib)
    return ib


def run(args) -> int:
    """Imports the result and prints the run's ACC, ASR, RA and its number of poisoned training images."""
    # lazy: the command's job imports torch; it loads only when the command runs
    from ..jobs.import_backdoorbench import import_backdoorbench

    kw = key_values(args.attack_opt)
    if args.pattern is not None:
        kw["pattern"] = str(args.pattern)
    m = import_backdoorbench(args.path, args.out, attack=args.attack, attack_kw=kw, target=args.target,
                             data_dir=args.data_dir, overwrite=args.overwrite, device=args.device)
    r = m["metrics"]
    print(f"{args.out}: ACC {100 * r['acc']:.2f}%  ASR {100 * r['asr']:.2f}%  RA {100 * r['ra']:.2f}%  "
          f"({m['poison']['count']} poisoned training images)")
    return 0
