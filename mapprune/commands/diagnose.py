"""``mapprune diagnose``: how well feature-map scorers find the maps that carry a run's real backdoor."""

import argparse
import json
from pathlib import Path

from ..errors import MapPruneError
from .common import add_common, key_values

NAME = "diagnose"
SEEDS = [0]  # testing seeds unless --seeds says otherwise


def add_parser(subparsers) -> argparse.ArgumentParser:
    # lazy: the job imports torch: kept out of `import mapprune.cli`, though build_parser still loads it for the help
    from ..jobs.diagnose import DEFAULT_SETTINGS

    defaults = " and ".join(f"{name}:{','.join(f'{k}={v}' for k, v in cfg.items())}"
                         for name, cfg in DEFAULT_SETTINGS.items())
    dg = subparsers.add_parser(NAME, help="evaluation only: how well feature-map scorers find the maps that carry "
                               "the run's real backdoor; writes RUN/diagnose/")
    dg.add_argument("run", type=Path)
    dg.add_argument("--defense", help="diagnose the model repaired by this defense (RUN/defense/NAME)")
    dg.add_argument("--setting", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                    help="a feature-map testing setting to score, e.g. 'b64:n_images=64,balanced=true,eps=0.06' "
                         f"(repeatable; default: the paper's probe and the recommended recipe's, {defaults})")
    dg.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="testing seeds (2+ give seed-to-seed "
                    f"rank correlations; default {' '.join(map(str, SEEDS))})")
    dg.add_argument("--n-eval", type=int, default=256,
                    help="test images for ground truth and curves (default %(default)s)")
    dg.add_argument("--budget", type=int, default=25, help="pruning budget the metrics are taken at (default "
                    "%(default)s)")
    dg.add_argument("--controls", action="store_true",
                    help="also fine-tune after pruning the oracle and a random set of --budget maps (and plain FT)")
    dg.add_argument("--json", action="store_true", help="print diagnose.json's summary as JSON")
    add_common(dg)
    return dg


def settings(specs: list[str]) -> dict | None:
    """'NAME:KEY=VALUE,...' -> {NAME: {KEY: VALUE}}, values parsed as JSON where they are JSON; each setting's keys
    and values checked against what the diagnosis takes. None when no setting was given (the defaults)."""
    # lazy: imports torch; loads only when the command runs (kept out of `import mapprune.cli`)
    from ..jobs.diagnose import SETTING_KEYS
    from ..probes import OBJECTIVES

    if not specs:
        return None
    out = {}
    for spec in specs:
        name, sep, body = spec.partition(":")
        if not sep or not name:
            raise MapPruneError(f"--setting {spec!r} must look like NAME:KEY=VALUE,... e.g. b64:n_images=64")
        out[name] = key_values([kv for kv in body.split(",") if kv]) if body else {}
    for name, cfg in out.items():
        bad = sorted(set(cfg) - set(SETTING_KEYS))
        if bad:
            raise MapPruneError(f"--setting {name}: unknown key {bad[0]!r}; valid: {', '.join(sorted(SETTING_KEYS))}")
        if cfg.get("objective", "mse") not in OBJECTIVES:
            raise MapPruneError(f"--setting {name}: objective must be one of {', '.join(OBJECTIVES)}")
        if int(cfg.get("n_images", 32)) < 1:
            raise MapPruneError(f"--setting {name}: n_images must be >= 1")
    return out


def run(args) -> int:
    """Diagnoses the run and prints the orderings' table (or their summary as JSON) and the controls."""
    # lazy: the command's job imports torch; it loads only when the command runs
    from ..jobs.diagnose import diagnose_run
    from ..results import format_table

    chosen = settings(args.setting)
    if args.n_eval < 1 or args.budget < 1:
        raise MapPruneError(f"--n-eval and --budget must be >= 1, got {args.n_eval} and {args.budget}")
    rep = diagnose_run(args.run, defense=args.defense, data_dir=args.data_dir, device=args.device,
                       settings=chosen, seeds=args.seeds, n_eval=args.n_eval, budget=args.budget,
                       controls=args.controls, progress=not args.no_progress)
    b = rep["budget"]
    rows = [{"ordering": k, "auroc": v["auroc_causal"], f"p@{b}": v[f"precision@{b}"], f"asr@{b} %": v[f"asr@{b}"],
             f"acc@{b} %": v[f"acc@{b}"]} for k, v in rep["orderings"].items()]
    if args.json:
        print(json.dumps({"ground_truth": rep["ground_truth"], "orderings": rows, "controls": rep.get("controls")}))
        return 0
    gt = rep["ground_truth"]
    print(f"before: ACC {100 * rep['before']['acc']:.2f}  ASR {100 * rep['before']['asr']:.2f}  "
          f"({rep['n_eval']} test images); {gt['n_causal']} of {rep['n_maps']} maps drop ASR by >= "
          f"{100 * gt['causal_drop']:.0f} points when pruned alone")
    print(format_table([{k: _cell(k, v) for k, v in r.items()} for r in rows], list(rows[0])))
    for k, v in (rep.get("controls") or {}).items():
        print(f"control {k}: ACC {100 * v['acc']:.2f}  ASR {100 * v['asr']:.2f}  RA {100 * v['ra']:.2f}")
    print(f"written to {Path(args.run) / 'diagnose' / (args.defense or 'model')}")
    return 0


def _cell(key: str, value):
    """A table cell: '-' for none, a percentage for a '%' column, two decimals for other numbers."""
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if key.endswith("%") else f"{value:.2f}" if isinstance(value, float) else value
