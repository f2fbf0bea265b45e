"""``mapprune bench``: run an attack x defense x seed grid into a folder, resumably and in parallel."""

import argparse
import os
import sys
from pathlib import Path

from .common import add_common

NAME = "bench"


def add_parser(subparsers) -> argparse.ArgumentParser:
    bn = subparsers.add_parser(NAME, help="run an attack x defense x seed grid (TOML) into DIR: resumable, parallel")
    bn.add_argument("grid", type=Path, help="grid file, e.g. benchmarks/grids/digits-tiny.toml")
    bn.add_argument("--out", type=Path, required=True, help="the grid's folder (runs, results.csv, table.md)")
    bn.add_argument("--jobs", type=int, default=1, help="cells run at once (default %(default)s)")
    bn.add_argument("--backend", choices=["local", "ray"], default="local",
                    help="local worker processes or Ray tasks (pip install 'mapprune[ray]'); default %(default)s")
    bn.add_argument("--address", help="ray: the cluster address (default: a local Ray instance)")
    bn.add_argument("--retry-failed", action="store_true", help="rerun the cells recorded as failed")
    bn.add_argument("--update", action="store_true",
                    help="accept a DIR made by another version of the grid (its unchanged cells are kept)")
    bn.add_argument("--adopt-only", action="store_true",
                    help="compute nothing: adopt the grid's runs and their matching finished defense results "
                         "(adopt_defenses = true) and write the table of what is done")
    bn.add_argument("--only", nargs="+", metavar="LABEL",
                    help="run only the cells of these attacks (their labels in the grid) and their defenses; the "
                         "results cover every cell of the grid that is done")
    add_common(bn)
    return bn


def run(args) -> int:
    """Runs the grid; SIGTERM exits with status 143 and ^C with 130 (workers stopped), each with one line; 1 when
    cells failed."""
    # lazy: the grid runner imports torch; it loads only when the command runs
    from ..bench import Terminated, run_bench

    if args.data_dir:
        os.environ["MAPPRUNE_DATA"] = str(args.data_dir)  # worker processes resolve the data the same way
    try:
        r = run_bench(args.grid, args.out, jobs=args.jobs, threads=args.threads, backend=args.backend,
                      address=args.address, retry_failed=args.retry_failed, update=args.update,
                      adopt_only=args.adopt_only, only=args.only, progress=not args.no_progress)
    except KeyboardInterrupt as e:
        how = "stopped by SIGTERM" if isinstance(e, Terminated) else "interrupted"
        print(f"mapprune: bench {how}; rerun the same command to finish the missing cells", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    print(f"{r['done']}/{r['cells']} cells done; table: {args.out / 'table.md'}")
    if r["failed"]:
        print(f"{len(r['failed'])} failed or blocked (see {args.out / 'failed'}; --retry-failed reruns them): "
              + "; ".join(r["failed"][:5]), file=sys.stderr)
        return 1
    return 0
