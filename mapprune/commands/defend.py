"""``mapprune defend``: repair a run's model with a defense; prints before/after and what the defense detected."""

import argparse
from pathlib import Path

from ..errors import MapPruneError, unknown_name
from .common import add_common, finite, key_values, ratio
from .lines import rejected_line, stimulation_line

NAME = "defend"
# The options only FMT takes (the "fmt options" group of the help); any other defense refuses them. Its expert
# settings (mapprune/defenses/fmt/config.py: stimulate, field_images, ...) are taken from Python only.
# In the order their values name a variant's folder (Defense.variant_name): the unlearning's after the shared ones,
# where --opt put them.
FMT_TESTING = ("selection", "fraction", "mask", "detect_only", "n_images", "alpha", "eps", "objective", "budget",
               "gate")
FMT_UNLEARNING = ("unlearn", "warp_px", "smooth_linf")
FMT_ONLY = FMT_TESTING + FMT_UNLEARNING
# The fine-tune's options and the seed, which every defense takes.
SHARED = ("recipe", "epochs", "lr", "batch_size", "distill", "seed")


def _recipes(name: str) -> str:
    """``name``'s value in FMT's recommended and paper recipes, for the help: "recommended X; paper Y"."""
    # lazy: mapprune.defenses imports torch: kept out of `import mapprune.cli`, though build_parser loads it for the help
    from ..defenses.fmt.config import PAPER, RECOMMENDED

    def show(v):
        return f"{v:g}" if isinstance(v, float) else "rank's count" if v is None else str(v)

    r, p = getattr(RECOMMENDED, name), getattr(PAPER, name)
    return f"recommended {show(r)}; paper {show(p)}" if r != p else f"both recipes {show(r)}"


def add_parser(subparsers) -> argparse.ArgumentParser:
    # lazy: these import torch: kept out of `import mapprune.cli`, though build_parser still loads them for the help
    from ..defenses import DEFENSES
    from ..defenses.fmt.config import CONFIGS

    f = subparsers.add_parser(NAME, help="repair a run's model with a defense; writes RUN/defense/NAME/")
    f.add_argument("defense", help=f"one of: {', '.join(DEFENSES)}")
    f.add_argument("run", type=Path)
    f.add_argument("--clean-ratio", type=ratio, help="clean class-balanced share of the training set "
                   "(default 0.1; 0.05 on GTSRB)")
    f.add_argument("--recipe", choices=list(CONFIGS),
                   help="recommended (default): what docs/results.md measured best; paper: the ICLR algorithm exactly "
                        "(FT: the paper's fine-tune); durable: recommended without the distillation, at lr 0.02, a "
                        "repair that holds under retuning (docs/fmt.md). Any other option overrides its recipe value")
    fmt = f.add_argument_group("fmt options", "Feature Map Testing's own settings (what each value was measured to do: "
                               "mapprune/defenses/fmt/config.py); other defenses refuse them")
    fmt.add_argument("--objective", choices=["mse", "patch", "warp", "smooth"],
                     help=f"per-map probe: patch (a universal 0/1 patch), mse (one signed step of --eps), warp, "
                          f"smooth ({_recipes('objective')})")
    fmt.add_argument("--n-images", type=int, help=f"test images ({_recipes('n_images')})")
    fmt.add_argument("--alpha", type=finite, help=f"random start size ({_recipes('alpha')}; 0.03 CIFAR-100/GTSRB)")
    fmt.add_argument("--eps", type=finite, help=f"signed step of the mse, warp and smooth objectives "
                     f"({_recipes('eps')}; the patch objective has none and refuses another value)")
    fmt.add_argument("--selection", choices=["rank", "global"],
                     help=f"pruning rule: rank (per layer) or global ({_recipes('selection')})")
    fmt.add_argument("--fraction", type=finite, help=f"share of maps pruned per layer by the rank rule, which also "
                     f"sets the global rule's count ({_recipes('fraction')})")
    fmt.add_argument("--budget", type=_budget, help="global selection: maps pruned (default: the rank rule's count), "
                     "or auto: the most that keep held-out clean accuracy within 10%% (from Python: FMT(max_drop=...))")
    fmt.add_argument("--mask", action=argparse.BooleanOptionalAction, default=None,
                     help=f"keep pruned maps zero while fine-tuning ({_recipes('mask')})")
    fmt.add_argument("--unlearn", type=finite, help=f"share of each fine-tune batch stamped with FMT's candidate "
                     f"triggers, true labels kept ({_recipes('unlearn')})")
    fmt.add_argument("--warp-px", type=finite, help=f"displacement in pixels of the warp candidates, 0: none "
                     f"({_recipes('warp_px')})")
    fmt.add_argument("--smooth-linf", type=finite, help=f"L-inf amplitude of the smooth candidates, 0: none "
                     f"({_recipes('smooth_linf')})")
    fmt.add_argument("--detect-only", action="store_true", default=None,
                     help="score and report suspicious maps, change nothing")
    fmt.add_argument("--gate", action="store_true", default=None,
                     help="prune and unlearn only when the testing phase finds a sign of a backdoor (the scan's "
                     "fixed signs); otherwise fine-tune only (off in every recipe)")
    f.add_argument("--epochs", type=int, help=f"fine-tune epochs ({_recipes('epochs')})")
    f.add_argument("--lr", type=finite, help="fine-tune peak learning rate (default 0.01 one-cycle, 0.02 when the "
                   "model rejects a class: --opt relearn_lr; paper 0.01 cosine)")
    f.add_argument("--batch-size", type=int, help=f"fine-tune batch size ({_recipes('batch_size')})")
    f.add_argument("--distill", type=finite, help="fine-tune: weight of the distillation from the incoming model "
                   "(default 1.0: keeps clean accuracy; 0 = none, the paper's; 0 removes more of a backdoor the "
                   "pruning missed, e.g. WaNet, at ~2-3 points of ACC: docs/results.md)")
    f.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="any hyperparameter of the defense, e.g. --opt unlearn=0.2 (repeatable)")
    f.add_argument("--seed", type=int,
                   help="clean subset and defense seed (default 0; N != 0 writes to RUN/defense/VARIANT-seedN)")
    f.add_argument("--name", help="output folder name under RUN/defense (default: derived from the options)")
    f.add_argument("--overwrite", action="store_true")
    add_common(f)
    return f


def _budget(value: str):
    """``--budget``'s value: a number of maps, or ``auto``."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of maps or 'auto', not {value!r}") from None


def run(args) -> int:
    """Repairs the model and prints the before/after table, the detection lines, and where it was written."""
    # lazy: the command's job imports torch; it loads only when the command runs
    from ..defenses import DEFENSES
    from ..jobs.defend import defend_run
    from ..results import format_table

    if args.defense not in DEFENSES:
        raise unknown_name("defense", args.defense, DEFENSES)
    kw = {k: getattr(args, k) for k in FMT_TESTING + SHARED + FMT_UNLEARNING}
    given = [k for k in FMT_ONLY if kw[k] is not None]
    if args.defense != "fmt" and given:
        raise MapPruneError(f"--{given[0].replace('_', '-')} applies to fmt only, not {args.defense}")
    for k, v in key_values(args.opt, "--opt").items():
        if kw.get(k) is not None:
            raise MapPruneError(f"--opt {k}= repeats an option given as a flag; give it once")
        kw[k] = v
    r = defend_run(args.run, args.defense, clean_ratio=args.clean_ratio, name=args.name, data_dir=args.data_dir,
                   device=args.device, overwrite=args.overwrite, progress=not args.no_progress, **kw)
    b, a = r["before"], r["after"]
    rows = [{"model": "before", **b}, {"model": f"after {r['name']}", **a}]
    for label in b.get("triggers", {}):  # several triggers: each one's ASR and RA before and after
        rows += [{"model": f"  {label} {when}", **m["triggers"][label]}
                 for when, m in (("before", b), ("after", a))]
    print(format_table(rows, ["model", "acc", "asr", "ra"]))
    for line in detection_lines(r):
        print(line)
    recipe = f"; recipe {r['recipe']}" if "recipe" in r else ""
    print(f"pruned {r['num_pruned']} channels; DER {100 * r['der']:.2f}; {r['wall_s']:.0f} s{recipe}; "
          f"written to {Path(args.run) / 'defense' / r['name']}")
    return 0


def detection_lines(r: dict) -> list[str]:
    """What a defense's result says about the backdoor, judged by the scan's own lines (jobs/scan.py): the probes'
    suspected class and pull, a class the incoming model rejects, the stimulation test's class and anomaly, and a
    fine-tune that diverged."""
    # lazy: imports torch; loads only when the command runs (kept out of `import mapprune.cli`)
    from ..probes import PULL_THRESHOLD

    lines = []
    if "suspected_target" in r:
        t = r["suspected_target"]
        pull = max(t["class_pull"])
        judged = ""
        if r.get("params", {}).get("objective") == "patch":  # the scan's line is set for the patch probe's pull
            judged = f"{'over' if pull > PULL_THRESHOLD else 'under'} the scan's {PULL_THRESHOLD:.0%}; "
        lines.append(f"suspected target class {t['target']}: its maps pull {pull:.0%} of other classes' images there "
                     f"beyond chance ({judged}anomaly index {t['anomaly_index']:.1f})")
    relearn = r.get("fine_tune") or {}
    for c in relearn.get("rejected_classes", []):
        lines.append(f"{rejected_line(c, relearn['class_acc'])}; fine-tuned at lr {relearn['lr']:g}")
    if "stimulated_target" in r:
        lines.append(stimulation_line(r["stimulated_target"]))
    if "gate" in r:
        g = r["gate"]
        lines.append(f"gate open ({', '.join(g['signs'])}): pruned and unlearned" if g["open"] else
                     "gate closed: no sign of a backdoor (no probe's pull over the scan's line, no rejected class, "
                     "no stimulation over its line); fine-tuned only")
    if "diverged" in relearn:
        d = relearn["diverged"]
        lines.append(f"warning: the fine-tune diverged (its loss rose from {d['first_loss']:.2f} in epoch 1 to "
                     f"{d['peak_loss']:.2f} in epoch {d['peak_epoch']} at lr {d['lr']:g}): a diverging fine-tune "
                     f"relearns much of the model from the clean subset, so what it removed may not be the defense's "
                     f"doing; rerun with a lower --lr (0.001 suits an Adam-trained model such as the ViT)")
    return lines
