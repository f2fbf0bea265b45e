"""The ``mapprune`` command: parses arguments, calls the library, prints. No logic of its own."""

import argparse
import json
import sys
from pathlib import Path

from .errors import MapPruneError


def _ratio(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"{v} is out of range; give a fraction in [0, 1]")
    return v


def _add_common(p):
    p.add_argument("--data-dir", help="dataset folder (default: $MAPPRUNE_DATA)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    from .attacks import ATTACKS
    from .data import DATASETS
    from .models import MODELS
    from .presets import PRESETS

    ap = argparse.ArgumentParser(prog="mapprune", description="Find and remove backdoors in image classifiers.")
    sub = ap.add_subparsers(dest="command", required=True)

    a = sub.add_parser("attack", help="train a backdoored model and write a run folder")
    a.add_argument("attack", help=f"one of: {', '.join(ATTACKS)}")
    a.add_argument("--dataset", default="cifar10", help=f"one of: {', '.join(DATASETS)}")
    a.add_argument("--model", help=f"one of: {', '.join(MODELS)} (default: the preset's)")
    a.add_argument("--width", type=int, help="first-stage channels (64 = paper, 16 = CPU preset)")
    a.add_argument("--preset", help=f"one of: {', '.join(PRESETS)} (default: paper settings)")
    a.add_argument("--out", required=True, type=Path, help="run folder to write")
    a.add_argument("--epochs", type=int)
    a.add_argument("--batch-size", type=int)
    a.add_argument("--lr", type=float)
    a.add_argument("--schedule", choices=["cosine", "onecycle"])
    a.add_argument("--poison-ratio", type=_ratio, default=0.1)
    a.add_argument("--target", type=int, default=0)
    a.add_argument("--all-to-all", action="store_true")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--overwrite", action="store_true", help="replace a run already at --out")
    _add_common(a)

    e = sub.add_parser("eval", help="reload a run and recompute ACC / ASR / RA")
    e.add_argument("run", type=Path)
    e.add_argument("--defense", help="evaluate the model repaired by this defense (RUN/defense/NAME)")
    e.add_argument("--json", action="store_true", help="print exactly one JSON object")
    _add_common(e)

    d = sub.add_parser("demo", help="backdoor a model on the embedded digits and measure it (about a minute)")
    d.add_argument("--out", type=Path, help="keep the run folder here (default: a temporary folder)")
    _add_common(d)
    return ap


def cmd_attack(args) -> int:
    from .backdoor import attack_run

    m = attack_run(args.attack, args.out, dataset=args.dataset, data_dir=args.data_dir, preset=args.preset,
                   model=args.model, width=args.width, target=args.target, all_to_all=args.all_to_all,
                   poison_ratio=args.poison_ratio, seed=args.seed, device=args.device, overwrite=args.overwrite,
                   progress=not args.no_progress, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                   schedule=args.schedule)
    r = m["metrics"]
    print(f"{args.out}: ACC {100 * r['acc']:.2f}%  ASR {100 * r['asr']:.2f}%  RA {100 * r['ra']:.2f}%  "
          f"(train {m['timings']['train_s']:.0f} s)")
    return 0


def cmd_eval(args) -> int:
    from .evaluation import evaluate_run

    result = evaluate_run(args.run, defense=args.defense, data_dir=args.data_dir, device=args.device)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.run}{' + ' + args.defense if args.defense else ''}: ACC {100 * result['acc']:.2f}%  "
              f"ASR {100 * result['asr']:.2f}%  RA {100 * result['ra']:.2f}%")
    return 0


def cmd_demo(args) -> int:
    from .demo import demo

    demo(out=args.out, device=args.device, progress=not args.no_progress)
    return 0


COMMANDS = {"attack": cmd_attack, "eval": cmd_eval, "demo": cmd_demo}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except MapPruneError as e:
        print(f"mapprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mapprune: interrupted; rerun the same command to resume from the last finished epoch",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
