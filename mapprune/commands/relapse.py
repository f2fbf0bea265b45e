"""``mapprune relapse``: does a repaired model relearn its backdoor from a few poisoned images faster than a clean
model learns it, and does a small universal perturbation of triggered images bring it back? The retuning and the
reactivation attacks beside their clean control (an evaluation: it uses the real trigger)."""

import argparse
from pathlib import Path

from .common import add_common, finite

NAME = "relapse"


def _seeds(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds are whole numbers separated by commas, e.g. 0,1,2; got {s!r}") from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    rl = subparsers.add_parser(NAME, help="retune a repaired model on a few poisoned images and compare its ASR "
                               "with a clean control's: removed, or only hidden?")
    rl.add_argument("run", type=Path, help="the backdoored run folder")
    rl.add_argument("--defense", help="the repaired model to retune (RUN/defense/NAME; default: the run's own model)")
    rl.add_argument("--control", type=Path, help="a clean run folder of the same data (--poison-ratio 0), retuned the "
                    "same way: how fast a model that never had the backdoor learns it")
    rl.add_argument("--images", type=int, default=1000, help="the retuning set's size (default %(default)s)")
    rl.add_argument("--poisoned", type=int, default=5, help="how many of them carry the trigger, relabelled to the "
                    "target (default %(default)s)")
    rl.add_argument("--epochs", type=int, default=5, help="retuning epochs (default %(default)s)")
    rl.add_argument("--lr", type=finite, default=0.01, help="SGD learning rate, momentum 0.9, no weight decay "
                    "(default %(default)s)")
    rl.add_argument("--batch-size", type=int, default=128, help="(default %(default)s)")
    rl.add_argument("--seeds", type=_seeds, default=(0,), help="retuning seeds, e.g. 0,1,2: which images and the "
                    "training order (default 0)")
    rl.add_argument("--reactivation-eps", type=finite, default=0.05, help="the reactivation perturbation's "
                    "L-infinity bound on [0, 1] pixels (default %(default)s)")
    rl.add_argument("--reactivation-steps", type=int, default=100, help="its search's sign-gradient steps "
                    "(default %(default)s)")
    rl.add_argument("--reactivation-images", type=int, default=500, help="the triggered training images it is "
                    "searched on (default %(default)s)")
    rl.add_argument("--no-reactivation", action="store_true", help="retune only; search no reactivation")
    rl.add_argument("--json", action="store_true", help="print the report as JSON")
    add_common(rl)
    return rl


def run(args) -> int:
    """Retunes, writes relapse.json beside the repaired model, prints ASR before and after per model."""
    # lazy: the command's job imports torch; it loads only when the command runs
    from ..jobs.relapse import Reactivation, Retuning, relapse
    from ..runs import json_text

    settings = Retuning(images=args.images, poisoned=args.poisoned, epochs=args.epochs, lr=args.lr,
                        batch_size=args.batch_size)
    reactivation = None if args.no_reactivation else Reactivation(
        eps=args.reactivation_eps, steps=args.reactivation_steps, images=args.reactivation_images)
    report = relapse(args.run, defense=args.defense, control=args.control, settings=settings,
                     reactivation=reactivation, seeds=args.seeds,
                     data_dir=args.data_dir, device=args.device, progress=not args.no_progress)
    if args.json:
        print(json_text(report, indent=1))
        return 0
    print(f"{args.run}{' + ' + args.defense if args.defense else ''}: retuned on {settings.images} images, "
          f"{settings.poisoned} with the trigger, {settings.epochs} epochs at lr {settings.lr:g}, seeds "
          f"{', '.join(map(str, args.seeds))}")
    for name, m in report["models"].items():
        after = " / ".join(f"{100 * a['asr']:.2f}" for a in m["after"])
        print(f"  {name:<10} ACC {100 * m['before']['acc']:.2f}%  ASR {100 * m['before']['asr']:.2f}% -> {after}% "
              f"(ACC after {100 * m['after'][-1]['acc']:.2f}%)")
        if "reactivation" in m:
            found = " / ".join(f"{100 * r['asr']:.2f}" for r in m["reactivation"])
            generic = " / ".join(f"{100 * r['generic']:.2f}" for r in m["reactivation"])
            print(f"  {'':<10} reactivated by a universal perturbation (L-inf {reactivation.eps:g}): ASR {found}%; "
                  f"the same search without the trigger: {generic}%")
        if "carriers" in m:
            w = m["carriers"]
            print(f"  {'':<10} maps: {w['silenced']} silenced by the repair, {w['revived']} revived by retuning; of the "
                  f"{w['top']} that carry the trigger most after retuning: {w['carriers_of_undefended']} did in the "
                  f"undefended model, {w['carriers_of_repaired']} in the repaired one, {w['carriers_silenced']} silenced "
                  f"by the repair (two random sets of {w['top']} of the {w['maps']} maps share {w['chance']:g})")
    return 0
