"""``mapprune eval``: reload a run (or one of its repaired models) and recompute ACC / ASR / RA."""

import argparse
from pathlib import Path

from .common import add_common

NAME = "eval"


def add_parser(subparsers) -> argparse.ArgumentParser:
    e = subparsers.add_parser(NAME, help="reload a run and recompute ACC / ASR / RA")
    e.add_argument("run", type=Path)
    e.add_argument("--defense", help="evaluate the model repaired by this defense (RUN/defense/NAME)")
    e.add_argument("--json", action="store_true", help="print exactly one JSON object")
    e.add_argument("--per-class", action="store_true", help="also the clean accuracy of each class")
    add_common(e)
    return e


def run(args) -> int:
    """Evaluates and prints the rates (each trigger's too, and per class if asked), or one JSON object."""
    # lazy: the command's job imports torch; it loads only when the command runs
    from ..evaluation import evaluate_run
    from ..runs import json_text

    result = evaluate_run(args.run, defense=args.defense, data_dir=args.data_dir, device=args.device,
                          per_class=args.per_class)
    if args.json:
        print(json_text(result, indent=None))
        return 0
    print(f"{args.run}{' + ' + args.defense if args.defense else ''}: ACC {100 * result['acc']:.2f}%  "
          f"ASR {100 * result['asr']:.2f}%  RA {100 * result['ra']:.2f}%")
    for label, t in result.get("triggers", {}).items():
        print(f"  trigger {label}: ASR {100 * t['asr']:.2f}%  RA {100 * t['ra']:.2f}%")
    if args.per_class:
        print("ACC per class: " + "  ".join(f"{i}: -" if a is None else f"{i}: {100 * a:.1f}%"
                                            for i, a in enumerate(result["class_acc"])))
    return 0
