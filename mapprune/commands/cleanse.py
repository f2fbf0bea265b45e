"""``mapprune cleanse``: which training images are poisoned? Sample detectors (Spectral Signatures, Activation
Clustering, SPECTRE, SCAn, the FMT-guided detector) score every training image of a run, flag some by rules that
need no ground truth, and are measured against the poisons the run records; ``RUN/cleanse/<detector>/``."""

import argparse
from pathlib import Path

from .common import add_common, finite, key_values, ratio

NAME = "cleanse"


def add_parser(subparsers) -> argparse.ArgumentParser:
    # lazy: mapprune.cleanse imports torch: kept out of `import mapprune.cli`, though build_parser loads it for the help
    from ..cleanse import SAMPLE_DETECTORS

    c = subparsers.add_parser(NAME, help="score every training image of a run for being poisoned, flag the suspects and "
                              "measure them against the run's poisons; writes RUN/cleanse/DETECTOR/")
    c.add_argument("run", type=Path, help="the run folder")
    c.add_argument("--detector", nargs="+", default=["all"], metavar="NAME",
                   help=f"one or more of: {', '.join(SAMPLE_DETECTORS)}, or all (default)")
    c.add_argument("--expected", type=finite, default=0.1,
                   help="declared bound on the poisoned share of the training set, the same for every detector; "
                        "never read from the attack (default %(default)s)")
    c.add_argument("--layer", default="penultimate",
                   help="where features are read: penultimate (the classifier head's input, default) or a module "
                        "name such as net.layer4 (flattened)")
    c.add_argument("--clean-ratio", type=ratio, default=0.1,
                   help="the defender's clean class-balanced share of the training set, 80%% for statistics and 20%% "
                        "held out for thresholds (default %(default)s)")
    c.add_argument("--seed", type=int, default=0, help="the clean subset's draw and the detectors' randomness "
                   "(default %(default)s)")
    c.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a detector setting, e.g. --opt reduce=pca (repeatable; given to every chosen detector that "
                        "takes it)")
    c.add_argument("--json", action="store_true", help="print the results as JSON")
    add_common(c)
    return c


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _auc(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def run(args) -> int:
    """Runs the detectors, writes their folders, prints one row per detector."""
    # lazy: the command's job imports torch; it loads only when the command runs
    from ..jobs.cleanse import cleanse
    from ..runs import json_text

    results = cleanse(args.run, detectors=args.detector, expected=args.expected, layer=args.layer,
                      clean_ratio=args.clean_ratio, seed=args.seed, options=key_values(args.opt, "--opt"),
                      data_dir=args.data_dir, device=args.device)
    if args.json:
        print(json_text(results, indent=1))
        return 0
    first = next(iter(results.values()))
    ev = first["evaluation"]
    print(f"{args.run}: {first['training_images']} training images ({ev['poisons']} poisoned outside the clean subset), "
          f"layer {first['layer']}, expected {args.expected:g}; target class {ev['target']} (evaluation only)")
    print(f"  {'detector':<9} {'rule':<12} {'flagged':>7} {'AUROC':>6} {'in-target':>9} {'TPR%':>6} {'FPR%':>6} "
          f"{'prec%':>6} {'suspect':>7} {'s':>6}")
    for name, r in results.items():
        e = r["evaluation"]
        for rule in (r["rule"], "expected"):
            m = e["rules"][rule]
            lead = (name, _auc(e["auroc"]), _auc(e["auroc_target"]), str(r["suspected_target"]),
                    f"{r['seconds']:.1f}") if rule == r["rule"] else ("", "", "", "", "")
            print(f"  {lead[0]:<9} {rule:<12} {m['flagged']:>7} {lead[1]:>6} {lead[2]:>9} {_pct(m['tpr']):>6} "
                  f"{_pct(m['fpr']):>6} {_pct(m['precision']):>6} {lead[3]:>7} {lead[4]:>6}")
    print(f"  written to {args.run / 'cleanse'}/DETECTOR/ (result.json, flagged.json, scores.safetensors)")
    return 0
