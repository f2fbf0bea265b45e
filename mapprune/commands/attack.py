"""``mapprune attack``: train a backdoored model and write a run folder."""

import argparse
from pathlib import Path

from ..errors import MapPruneError
from ..presets import PRESETS
from .common import add_common, add_poison_choice, finite, key_values

NAME = "attack"


def add_parser(subparsers) -> argparse.ArgumentParser:
    # lazy: these import torch: kept out of `import mapprune.cli`, though build_parser still loads them for the help
    from ..attacks import ATTACKS
    from ..data import DATASETS
    from ..models import MODELS

    a = subparsers.add_parser(NAME, help="train a backdoored model and write a run folder")
    a.add_argument("attack", help=f"one of: {', '.join(ATTACKS)}")
    a.add_argument("--dataset", default="cifar10", help=f"one of: {', '.join(DATASETS)} (default: %(default)s)")
    a.add_argument("--model", help=f"one of: {', '.join(MODELS)} (default: the preset's)")
    a.add_argument("--width", type=int, help="first-stage channels (64 = paper, 16 = CPU preset)")
    a.add_argument("--preset", help=f"one of: {', '.join(PRESETS)} (default: paper settings)")
    a.add_argument("--out", required=True, type=Path, help="run folder to write")
    a.add_argument("--epochs", type=int)
    a.add_argument("--batch-size", type=int)
    a.add_argument("--lr", type=finite)
    a.add_argument("--schedule", choices=["cosine", "onecycle"])
    add_poison_choice(a)
    a.add_argument("--all-to-all", action="store_true")
    a.add_argument("--eval-every", type=int, default=1, metavar="N",
                   help="record test ACC/ASR in the history every N epochs (default %(default)s; the last epoch "
                        "always)")
    a.add_argument("--overwrite", action="store_true", help="replace a run already at --out")
    a.add_argument("--exclude", type=Path, metavar="FILE",
                   help="leave these training indices out of training (the same images are poisoned): a JSON list, or "
                        "a flagged.json written by mapprune cleanse; recorded in the manifest")
    a.add_argument("--attack-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="an attack hyperparameter, e.g. --attack-opt alpha=0.1 (repeatable; values parsed as JSON)")
    a.add_argument("--pattern", type=Path, metavar="IMG",
                   help="patch, blended: your own trigger image (blended resizes it to the images' size)")
    a.add_argument("--mask", type=Path, metavar="IMG", help="patch: a grey mask of the pattern's size (white = pattern)")
    place = a.add_mutually_exclusive_group()
    place.add_argument("--position", type=_position, metavar="ROW,COL",
                       help="patch: top-left corner of the patch (default: the bottom-right corner)")
    place.add_argument("--random-position", action="store_true", help="patch: a random place on every image")
    add_common(a)
    return a


def _position(value: str) -> list[int]:
    """``--position``'s value: ROW,COL as two whole numbers."""
    try:
        row, col = (int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"ROW,COL as two whole numbers, not {value!r}") from None
    return [row, col]


def trigger_opts(args) -> dict:
    """--attack-opt pairs plus the trigger flags (--pattern, --mask, --position, --random-position)."""
    opts = key_values(args.attack_opt)
    given = {"pattern": args.pattern and str(args.pattern), "mask": args.mask and str(args.mask),
             "position": "random" if args.random_position else args.position}
    for k, v in given.items():
        if v is not None:
            if k in opts:
                raise MapPruneError(f"--{k} and --attack-opt {k}= both given; give it once")
            opts[k] = v
    return opts


def run(args) -> int:
    """Trains the run and prints its ACC, ASR, RA and training time."""
    # lazy: the command's job imports torch; it loads only when the command runs
    from ..jobs.attack import attack_run

    m = attack_run(args.attack, args.out, dataset=args.dataset, data_dir=args.data_dir, preset=args.preset,
                   model=args.model, width=args.width, target=args.target, all_to_all=args.all_to_all,
                   poison_ratio=args.poison_ratio, seed=args.seed, device=args.device, overwrite=args.overwrite,
                   progress=not args.no_progress, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                   schedule=args.schedule, eval_every=args.eval_every, attack_kw=trigger_opts(args),
                   exclude=args.exclude)
    r = m["metrics"]
    print(f"{args.out}: ACC {100 * r['acc']:.2f}%  ASR {100 * r['asr']:.2f}%  RA {100 * r['ra']:.2f}%  "
          f"(train {m['timings']['train_s']:.0f} s)")
    if "exclude" in m:
        e = m["exclude"]
        print(f"  excluded {e['count']} training images, {e['poisons']} of them poisoned; "
              f"{e['poisons_trained']} poisoned images trained on")
    return 0
