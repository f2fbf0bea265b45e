"""``mapprune prepare``: build and cache what an attack needs (clean model, perturbation) ahead of the attack."""

import argparse
import inspect
import json

from .common import add_common, add_poison_choice

NAME = "prepare"


def add_parser(subparsers) -> argparse.ArgumentParser:
    # lazy: these import torch: kept out of `import mapprune.cli`, though build_parser still loads them for the help
    from ..attacks import ATTACKS
    from ..attacks.surrogate import SurrogateAttack
    from ..data import DATASETS

    users = " / ".join(n for n, c in ATTACKS.items() if issubclass(c, SurrogateAttack))
    surrogate = inspect.signature(SurrogateAttack.__init__).parameters

    pr = subparsers.add_parser(NAME, help="build and cache what an attack needs (clean model, perturbation) ahead")
    pr.add_argument("attack", help=f"one of: {', '.join(ATTACKS)}")
    pr.add_argument("--dataset", default="cifar10", help=f"one of: {', '.join(DATASETS)} (default: %(default)s)")
    pr.add_argument("--model", help=f"clean model architecture of {users} "
                    f"(default {surrogate['surrogate'].default})")
    pr.add_argument("--width", type=int, help=f"clean model width (default {surrogate['surrogate_width'].default})")
    pr.add_argument("--epochs", type=int, help="clean model epochs (default: the preset's, 20; 12 for smallcnn)")
    add_poison_choice(pr)
    add_common(pr)
    return pr


def run(args) -> int:
    """Prepares the attack's resources and prints the attack's config as JSON."""
    # lazy: the command's job imports torch; it loads only when the command runs
    from ..jobs.prepare import prepare_attack

    cfg = prepare_attack(args.attack, args.dataset, args.data_dir, model=args.model, width=args.width,
                         epochs=args.epochs, target=args.target, poison_ratio=args.poison_ratio, seed=args.seed,
                         device=args.device, progress=not args.no_progress)
    print(json.dumps(cfg))
    return 0
