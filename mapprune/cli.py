"""The ``mapprune`` command: parses arguments, calls the library, prints. No logic of its own."""

import argparse
import json
import math
import sys
from pathlib import Path

from .allocator import keep_freed_memory
from .errors import MapPruneError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what was wrong, and where the help is), not the whole usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _finite(s: str) -> float:
    """A float flag's value: a finite number (NaN and infinity refused)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
    return v


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
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice; on a shared "
                   "machine 1 per job is often faster in total)")


def _add_poison_choice(p: argparse.ArgumentParser) -> None:
    """The options that choose the poisoned images: `prepare` must be given the same ones as the `attack` run."""
    p.add_argument("--poison-ratio", type=_ratio, default=0.1,
                   help="share of the whole training set poisoned (default 0.1); clean-label attacks draw from the "
                        "target class only")
    p.add_argument("--target", type=int, default=0, help="target label (default 0)")
    p.add_argument("--seed", type=int, default=0, help="which images are poisoned and, for attack, the training (default 0)")


def build_parser() -> argparse.ArgumentParser:
    from .attacks import ATTACKS
    from .data import DATASETS
    from .defenses import DEFENSES
    from .models import MODELS
    from .presets import PRESETS

    ap = _Parser(prog="mapprune", description="Find and remove backdoors in image classifiers.")
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
    a.add_argument("--lr", type=_finite)
    a.add_argument("--schedule", choices=["cosine", "onecycle"])
    _add_poison_choice(a)
    a.add_argument("--all-to-all", action="store_true")
    a.add_argument("--eval-every", type=int, default=1, metavar="N",
                   help="record test ACC/ASR in the history every N epochs (default 1; the last epoch always)")
    a.add_argument("--overwrite", action="store_true", help="replace a run already at --out")
    a.add_argument("--attack-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="an attack hyperparameter, e.g. --attack-opt alpha=0.1 (repeatable; values parsed as JSON)")
    a.add_argument("--pattern", type=Path, metavar="IMG",
                   help="patch, blended: your own trigger image (blended resizes it to the images' size)")
    a.add_argument("--mask", type=Path, metavar="IMG", help="patch: a grey mask of the pattern's size (white = pattern)")
    place = a.add_mutually_exclusive_group()
    place.add_argument("--position", type=_position, metavar="ROW,COL",
                       help="patch: top-left corner of the patch (default: the bottom-right corner)")
    place.add_argument("--random-position", action="store_true", help="patch: a random place on every image")
    _add_common(a)

    sc = sub.add_parser("scan", help="is this model backdoored? exit status 3 if the verdict is yes, 0 if not, 5 if "
                        "uncertain (calibrated), 4 if the model cannot be judged (broken or collapsed)")
    sc.add_argument("model", type=Path, help="a run folder, or a safetensors checkpoint (with --arch, --num-classes)")
    sc.add_argument("--arch", help=f"checkpoint architecture: one of {', '.join(MODELS)}")
    sc.add_argument("--num-classes", type=int, help="checkpoint: number of classes")
    sc.add_argument("--width", type=int, help="checkpoint: first-stage channels (default: the architecture's)")
    sc.add_argument("--dataset", default="cifar10", help="checkpoint: where the clean images come from (default "
                    "cifar10; a run folder uses its own)")
    sc.add_argument("--clean-ratio", type=_ratio, default=0.1,
                    help="clean class-balanced share of the training set used as the defender's images (default 0.1)")
    sc.add_argument("--threshold", type=_finite, help="the suspected target's pull above which the verdict is "
                    "backdoored (default 0.5, set on clean models; docs/results.md)")
    sc.add_argument("--no-nc", action="store_true", help="skip Neural Cleanse's second opinion (saves ~10 minutes "
                    "on a CPU for a CIFAR model)")
    sc.add_argument("--nc-opt", action="append", default=[], metavar="KEY=VALUE", help="a Neural Cleanse option")
    sc.add_argument("--calibration", type=Path, metavar="FILE",
                    help="a calibration written by mapprune calibrate: its rule decides the verdict (backdoored, "
                         "uncertain near the threshold: exit 5, no backdoor found) and its error rates are printed")
    sc.add_argument("--no-mmbd", action="store_true", help="skip MM-BD's data-free second opinion")
    sc.add_argument("--probes", nargs="+", default=["patch", "warp", "smooth"], metavar="PROBE",
                    help="FMT's probes to run in one pass (default: patch warp smooth); the largest pull decides")
    sc.add_argument("--stimulate", type=_finite, default=4.0, metavar="LEVEL",
                    help="the stimulation test's level in clean standard deviations (default 4; 0 skips it)")
    sc.add_argument("--seed", type=int, default=0, help="clean subset and probe seed (default 0)")
    sc.add_argument("--out", type=Path, help="report folder (default: RUN/scan, or CHECKPOINT's folder/scan-NAME)")
    sc.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_common(sc)

    cal = sub.add_parser("calibrate", help="scan a population of models (run or bench folders) and calibrate the "
                         "scan's rule on it, with held-out error rates")
    cal.add_argument("paths", nargs="+", type=Path, help="run folders, or bench folders holding runs/")
    cal.add_argument("--out", type=Path, required=True, help="the calibration JSON to write (and a .md beside it)")
    cal.add_argument("--fpr", type=_finite, default=0.05, help="the false-positive rate the threshold is set at "
                     "on the clean models (default 0.05)")
    cal.add_argument("--no-nc", action="store_true", help="do not run Neural Cleanse (a baseline) in the scans")
    cal.add_argument("--no-mmbd", action="store_true", help="do not run MM-BD (a baseline) in the scans")
    cal.add_argument("--no-scan", action="store_true", help="use only the scans already made; scan nothing")
    _add_common(cal)

    ib = sub.add_parser("import-backdoorbench", help="a BackdoorBench attack result as a mapprune run folder")
    ib.add_argument("path", type=Path, help="BackdoorBench's attack_result.pt, or the record folder holding it")
    ib.add_argument("--out", required=True, type=Path, help="run folder to write")
    ib.add_argument("--attack", required=True,
                    help="BackdoorBench's attack (its name is not in the file): badnet, blended (with --pattern), sig, "
                         "wanet (grids from the file, state_dict.pt beside it, or --attack-opt grids=FILE)")
    ib.add_argument("--pattern", type=Path, metavar="IMG", help="blended: the blend image the attack used")
    ib.add_argument("--target", type=int, default=0, help="the attack's target label (default 0, BackdoorBench's)")
    ib.add_argument("--attack-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="an attack setting, e.g. --attack-opt alpha=0.2 (repeatable)")
    ib.add_argument("--overwrite", action="store_true", help="replace a run already at --out")
    _add_common(ib)

    e = sub.add_parser("eval", help="reload a run and recompute ACC / ASR / RA")
    e.add_argument("run", type=Path)
    e.add_argument("--defense", help="evaluate the model repaired by this defense (RUN/defense/NAME)")
    e.add_argument("--json", action="store_true", help="print exactly one JSON object")
    e.add_argument("--per-class", action="store_true", help="also the clean accuracy of each class")
    _add_common(e)

    f = sub.add_parser("defend", help="repair a run's model with a defense; writes RUN/defense/NAME/")
    f.add_argument("defense", help=f"one of: {', '.join(DEFENSES)}")
    f.add_argument("run", type=Path)
    f.add_argument("--clean-ratio", type=_ratio, help="clean class-balanced share of the training set "
                   "(default 0.1; 0.05 on GTSRB)")
    f.add_argument("--recipe", choices=["recommended", "paper"],
                   help="recommended (default): what docs/results.md measured best; paper: the ICLR algorithm exactly "
                        "(FT: the paper's fine-tune). Any option below overrides its recipe value")
    f.add_argument("--selection", choices=["rank", "outlier", "global"], help="fmt: pruning rule (default rank)")
    f.add_argument("--scorer", choices=["accuracy", "target"], help="fmt: per-map score (default accuracy)")
    f.add_argument("--objective", choices=["mse", "excite", "patch", "warp", "smooth"],
                   help="fmt: per-map probe (recommended: patch; paper: mse; warp: a smooth warp of --eps pixels; "
                        "smooth: a smooth additive change of L-inf --eps)")
    f.add_argument("--budget", type=_budget, help="fmt global: maps pruned (default: the rank rule's count), or "
                   "auto: the most that keep held-out clean accuracy within max_drop (--opt max_drop=0.1)")
    f.add_argument("--outlier-method", choices=["elliptic", "mad"], help="fmt outlier: detector (default elliptic)")
    f.add_argument("--contamination", type=_finite, help="fmt outlier elliptic: contamination (default 0.1)")
    f.add_argument("--fraction", type=_finite, help="fmt rank: share of maps pruned per layer (default 1/64)")
    f.add_argument("--mask", action=argparse.BooleanOptionalAction, default=None,
                   help="fmt: keep pruned maps zero while fine-tuning (default: on; off in the paper recipe)")
    f.add_argument("--detect-only", action="store_true", default=None,
                   help="fmt: score and report suspicious maps, change nothing")
    f.add_argument("--implementation", choices=["fast", "reference"], help="fmt testing phase (default fast)")
    f.add_argument("--n-images", type=int, help="fmt: test images (default 32)")
    f.add_argument("--alpha", type=_finite, help="fmt: random start size (default 0.02; 0.03 CIFAR-100/GTSRB)")
    f.add_argument("--eps", type=_finite, help="fmt: signed step size of the mse, excite, warp and smooth objectives "
                   "(default 0.06; the recommended recipe's patch objective has none and refuses it)")
    f.add_argument("--epochs", type=int, help="fine-tune epochs (default 15; paper 10)")
    f.add_argument("--lr", type=_finite, help="fine-tune peak learning rate (default 0.01 one-cycle, 0.02 when the "
                   "model rejects a class: --opt relearn_lr; paper 0.01 cosine)")
    f.add_argument("--batch-size", type=int, help="fine-tune batch size (default 128; paper 256)")
    f.add_argument("--distill", type=_finite, help="fine-tune: weight of the distillation from the incoming model "
                   "(default 1.0: keeps clean accuracy; 0 = none, the paper's; 0 removes more of a backdoor the "
                   "pruning missed, e.g. WaNet, at ~2-3 points of ACC: docs/results.md)")
    f.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="any hyperparameter of the defense, e.g. --opt unlearn=0.2 (repeatable)")
    f.add_argument("--seed", type=int,
                   help="clean subset and defense seed (default 0; N != 0 writes to RUN/defense/VARIANT-seedN)")
    f.add_argument("--name", help="output folder name under RUN/defense (default: derived from the options)")
    f.add_argument("--overwrite", action="store_true")
    _add_common(f)

    rp = sub.add_parser("report", help="print a markdown table of runs and their defenses")
    rp.add_argument("runs", type=Path, nargs="+")
    rp.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    rp.add_argument("--compare", nargs="?", const="", metavar="D1,D2,...",
                    help="attacks as rows, defense variants as columns (ACC / ASR / RA, means over seeds), in the "
                         "order given (default: none, ft, fmt, then the rest)")
    rp.add_argument("--seeds", action="store_true",
                    help="one row per defense variant: mean ± sd over its seeds (folders NAME, NAME-seedN)")

    bn = sub.add_parser("bench", help="run an attack x defense x seed grid (TOML) into DIR: resumable, parallel")
    bn.add_argument("grid", type=Path, help="grid file, e.g. benchmarks/grids/digits-tiny.toml")
    bn.add_argument("--out", type=Path, required=True, help="the grid's folder (runs, results.csv, table.md)")
    bn.add_argument("--jobs", type=int, default=1, help="cells run at once (default 1)")
    bn.add_argument("--backend", choices=["local", "ray"], default="local",
                    help="local worker processes (default) or Ray tasks (pip install 'mapprune[ray]')")
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
    _add_common(bn)

    dg = sub.add_parser("diagnose", help="evaluation only: how well feature-map scorers find the maps that carry "
                        "the run's real backdoor; writes RUN/diagnose/")
    dg.add_argument("run", type=Path)
    dg.add_argument("--defense", help="diagnose the model repaired by this defense (RUN/defense/NAME)")
    dg.add_argument("--setting", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                    help="a feature-map testing setting to score, e.g. 'b64:n_images=64,balanced=true,eps=0.06' "
                         "(repeatable; default: the paper's probe, n_images=32, eps=0.06, objective=mse, and the recommended "
                         "recipe's, objective=patch)")
    dg.add_argument("--seeds", type=int, nargs="+", default=[0], help="testing seeds (2+ give seed-to-seed "
                    "rank correlations; default 0)")
    dg.add_argument("--n-eval", type=int, default=256, help="test images for ground truth and curves (default 256)")
    dg.add_argument("--budget", type=int, default=25, help="pruning budget the metrics are taken at (default 25)")
    dg.add_argument("--controls", action="store_true",
                    help="also fine-tune after pruning the oracle and a random set of --budget maps (and plain FT)")
    dg.add_argument("--json", action="store_true", help="print diagnose.json's summary as JSON")
    _add_common(dg)

    d = sub.add_parser("demo", help="backdoor a model on the embedded digits and measure it (about a minute)")
    d.add_argument("--out", type=Path, help="keep the run folder here (default: a temporary folder)")
    _add_common(d)

    pr = sub.add_parser("prepare", help="build and cache what an attack needs (clean model, perturbation) ahead")
    pr.add_argument("attack", help=f"one of: {', '.join(ATTACKS)}")
    pr.add_argument("--dataset", default="cifar10", help=f"one of: {', '.join(DATASETS)}")
    pr.add_argument("--model", help="clean model architecture of lowfreq / lc (default preactresnet18)")
    pr.add_argument("--width", type=int, help="clean model width (default 16)")
    pr.add_argument("--epochs", type=int, help="clean model epochs (default: the preset's, 20; 12 for smallcnn)")
    _add_poison_choice(pr)
    _add_common(pr)
    return ap


def _position(value: str) -> list[int]:
    try:
        row, col = (int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"ROW,COL as two whole numbers, not {value!r}") from None
    return [row, col]


def _trigger_opts(args) -> dict:
    """--attack-opt pairs plus the trigger flags (--pattern, --mask, --position, --random-position)."""
    opts = _attack_opts(args.attack_opt)
    given = {"pattern": args.pattern and str(args.pattern), "mask": args.mask and str(args.mask),
             "position": "random" if args.random_position else args.position}
    for k, v in given.items():
        if v is not None:
            if k in opts:
                raise MapPruneError(f"--{k} and --attack-opt {k}= both given; give it once")
            opts[k] = v
    return opts


def _budget(value: str):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of maps or 'auto', not {value!r}") from None


def _attack_opts(pairs: list[str], flag: str = "--attack-opt") -> dict:
    opts = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise MapPruneError(f"{flag} takes KEY=VALUE, got {pair!r}")
        try:
            opts[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            opts[key.replace("-", "_")] = value
    return opts


def cmd_attack(args) -> int:
    from .jobs.attack import attack_run

    m = attack_run(args.attack, args.out, dataset=args.dataset, data_dir=args.data_dir, preset=args.preset,
                   model=args.model, width=args.width, target=args.target, all_to_all=args.all_to_all,
                   poison_ratio=args.poison_ratio, seed=args.seed, device=args.device, overwrite=args.overwrite,
                   progress=not args.no_progress, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                   schedule=args.schedule, eval_every=args.eval_every, attack_kw=_trigger_opts(args))
    r = m["metrics"]
    print(f"{args.out}: ACC {100 * r['acc']:.2f}%  ASR {100 * r['asr']:.2f}%  RA {100 * r['ra']:.2f}%  "
          f"(train {m['timings']['train_s']:.0f} s)")
    return 0


def cmd_eval(args) -> int:
    from .evaluation import evaluate_run
    from .runs import json_text

    result = evaluate_run(args.run, defense=args.defense, data_dir=args.data_dir, device=args.device,
                          per_class=args.per_class)
    if args.json:
        print(json_text(result, indent=None))
    else:
        print(f"{args.run}{' + ' + args.defense if args.defense else ''}: ACC {100 * result['acc']:.2f}%  "
              f"ASR {100 * result['asr']:.2f}%  RA {100 * result['ra']:.2f}%")
        for label, t in result.get("triggers", {}).items():
            print(f"  trigger {label}: ASR {100 * t['asr']:.2f}%  RA {100 * t['ra']:.2f}%")
        if args.per_class:
            print("ACC per class: " + "  ".join(f"{i}: -" if a is None else f"{i}: {100 * a:.1f}%"
                                                for i, a in enumerate(result["class_acc"])))
    return 0


def cmd_defend(args) -> int:
    from .defenses import DEFENSES
    from .errors import unknown_name
    from .jobs.defend import defend_run

    if args.defense not in DEFENSES:
        raise unknown_name("defense", args.defense, DEFENSES)
    fmt_only = ["selection", "outlier_method", "contamination", "fraction", "mask", "detect_only",
                "implementation", "n_images", "alpha", "eps", "scorer", "objective", "budget"]
    kw = {k: getattr(args, k) for k in fmt_only + ["recipe", "epochs", "lr", "batch_size", "distill", "seed"]}
    given = [k for k in fmt_only if kw[k] is not None]
    if args.defense != "fmt" and given:
        raise MapPruneError(f"--{given[0].replace('_', '-')} applies to fmt only, not {args.defense}")
    for k, v in _attack_opts(args.opt, "--opt").items():
        if kw.get(k) is not None:
            raise MapPruneError(f"--opt {k}= repeats an option given as a flag; give it once")
        kw[k] = v
    r = defend_run(args.run, args.defense, clean_ratio=args.clean_ratio, name=args.name, data_dir=args.data_dir,
                   device=args.device, overwrite=args.overwrite, progress=not args.no_progress, **kw)
    b, a = r["before"], r["after"]
    from .report import format_table

    rows = [{"model": "before", **b}, {"model": f"after {r['name']}", **a}]
    for label in b.get("triggers", {}):  # several triggers: each one's ASR and RA before and after
        rows += [{"model": f"  {label} {when}", **m["triggers"][label]}
                 for when, m in (("before", b), ("after", a))]
    print(format_table(rows, ["model", "acc", "asr", "ra"]))
    for line in _detection_lines(r):
        print(line)
    recipe = f"; recipe {r['recipe']}" if "recipe" in r else ""
    print(f"pruned {r['num_pruned']} channels; DER {100 * r['der']:.2f}; {r['wall_s']:.0f} s{recipe}; "
          f"written to {Path(args.run) / 'defense' / r['name']}")
    return 0


def _rejected_line(c: int, class_acc: list) -> str:
    """A class the model rejects (metrics.rejected_classes), as defend and scan both say it."""
    import statistics

    return (f"class {c} rejected: the model gets {class_acc[c]:.0%} of its clean images right (median class "
            f"{statistics.median(class_acc):.0%}), the mark of a clean-label attack's target")


def _stimulation_line(t: dict) -> str:
    """The stimulation test's class and anomaly against the scan's threshold, as defend and scan both say it."""
    from .defenses.stimulation import ANOMALY_THRESHOLD

    side = "over" if t["anomaly_index"] > ANOMALY_THRESHOLD else "under"
    return (f"stimulation test: maps pull to class {t['target']} (anomaly index {t['anomaly_index']:.1f}, {side} "
            f"the scan's {ANOMALY_THRESHOLD:g})")


def _detection_lines(r: dict) -> list[str]:
    """What a defense's result says about the backdoor, judged by the scan's own lines (jobs/scan.py): the probes'
    suspected class and pull, a class the incoming model rejects, the stimulation test's class and anomaly."""
    from .jobs.scan import THRESHOLD as PULL_THRESHOLD

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
        lines.append(f"{_rejected_line(c, relearn['class_acc'])}; fine-tuned at lr {relearn['lr']:g}")
    if "stimulated_target" in r:
        lines.append(_stimulation_line(r["stimulated_target"]))
    if "diverged" in relearn:
        d = relearn["diverged"]
        lines.append(f"warning: the fine-tune diverged (its loss rose from {d['first_loss']:.2f} in epoch 1 to "
                     f"{d['peak_loss']:.2f} in epoch {d['peak_epoch']} at lr {d['lr']:g}): a diverging fine-tune "
                     f"relearns much of the model from the clean subset, so what it removed may not be the defense's "
                     f"doing; rerun with a lower --lr (0.001 suits an Adam-trained model such as the ViT)")
    return lines


def cmd_report(args) -> int:
    from .report import collect_rows, markdown_seed_table, markdown_table, seed_summary

    rows = collect_rows(args.runs)
    if args.compare is not None:
        from .report import comparison_table

        groups = seed_summary(rows)
        chosen = [d for d in args.compare.split(",") if d] or None
        print(json.dumps(groups) if args.json else comparison_table(groups, chosen))
    elif args.seeds:
        groups = seed_summary(rows)
        print(json.dumps(groups) if args.json else markdown_seed_table(groups))
    else:
        print(json.dumps(rows) if args.json else markdown_table(rows))
    return 0


def _settings(specs: list[str]) -> dict | None:
    """'NAME:KEY=VALUE,...' -> {NAME: {KEY: VALUE}}, values parsed as JSON where they are JSON."""
    if not specs:
        return None
    out = {}
    for spec in specs:
        name, sep, body = spec.partition(":")
        if not sep or not name:
            raise MapPruneError(f"--setting {spec!r} must look like NAME:KEY=VALUE,... e.g. b64:n_images=64")
        out[name] = _attack_opts([kv for kv in body.split(",") if kv]) if body else {}
    from .defenses.scoring import OBJECTIVES

    allowed = {"n_images", "balanced", "eps", "alpha", "objective", "implementation", "batch_images"}
    for name, cfg in out.items():
        bad = sorted(set(cfg) - allowed)
        if bad:
            raise MapPruneError(f"--setting {name}: unknown key {bad[0]!r}; valid: {', '.join(sorted(allowed))}")
        if cfg.get("objective", "mse") not in OBJECTIVES:
            raise MapPruneError(f"--setting {name}: objective must be one of {', '.join(OBJECTIVES)}")
        if int(cfg.get("n_images", 32)) < 1:
            raise MapPruneError(f"--setting {name}: n_images must be >= 1")
    return out


def cmd_diagnose(args) -> int:
    from .jobs.diagnose import diagnose_run

    settings = _settings(args.setting)
    if args.n_eval < 1 or args.budget < 1:
        raise MapPruneError(f"--n-eval and --budget must be >= 1, got {args.n_eval} and {args.budget}")
    rep = diagnose_run(args.run, defense=args.defense, data_dir=args.data_dir, device=args.device,
                       settings=settings, seeds=args.seeds, n_eval=args.n_eval, budget=args.budget,
                       controls=args.controls, progress=not args.no_progress)
    b = rep["budget"]
    rows = [{"ordering": k, "auroc": v["auroc_causal"], f"p@{b}": v[f"precision@{b}"], f"asr@{b} %": v[f"asr@{b}"],
             f"acc@{b} %": v[f"acc@{b}"]} for k, v in rep["orderings"].items()]
    if args.json:
        print(json.dumps({"ground_truth": rep["ground_truth"], "orderings": rows, "controls": rep.get("controls")}))
        return 0
    from .report import format_table

    gt = rep["ground_truth"]
    print(f"before: ACC {100 * rep['before']['acc']:.2f}  ASR {100 * rep['before']['asr']:.2f}  "
          f"({rep['n_eval']} test images); {gt['n_causal']} of {rep['n_maps']} maps drop ASR by >= "
          f"{100 * gt['causal_drop']:.0f} points when pruned alone")
    def cell(k, v):
        if v is None:
            return "-"
        return f"{100 * v:.1f}" if k.endswith("%") else f"{v:.2f}" if isinstance(v, float) else v

    print(format_table([{k: cell(k, v) for k, v in r.items()} for r in rows], list(rows[0])))
    for k, v in (rep.get("controls") or {}).items():
        print(f"control {k}: ACC {100 * v['acc']:.2f}  ASR {100 * v['asr']:.2f}  RA {100 * v['ra']:.2f}")
    print(f"written to {Path(args.run) / 'diagnose' / (args.defense or 'model')}")
    return 0


def cmd_demo(args) -> int:
    from .jobs.demo import demo

    demo(out=args.out, device=args.device, progress=not args.no_progress)
    return 0


def cmd_prepare(args) -> int:
    from .jobs.prepare import prepare_attack

    cfg = prepare_attack(args.attack, args.dataset, args.data_dir, model=args.model, width=args.width,
                         epochs=args.epochs, target=args.target, poison_ratio=args.poison_ratio, seed=args.seed,
                         device=args.device, progress=not args.no_progress)
    print(json.dumps(cfg))
    return 0


def cmd_bench(args) -> int:
    """Runs the grid; SIGTERM exits with status 143 and ^C with 130 (workers stopped), each with one line."""
    from .bench import Terminated, run_bench

    if args.data_dir:
        import os

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


COMMANDS = {"attack": cmd_attack, "defend": cmd_defend, "eval": cmd_eval, "report": cmd_report, "demo": cmd_demo}
COMMANDS["prepare"] = cmd_prepare
COMMANDS["diagnose"] = cmd_diagnose
COMMANDS["bench"] = cmd_bench


def cmd_import_backdoorbench(args) -> int:
    from .jobs.import_backdoorbench import import_backdoorbench

    kw = _attack_opts(args.attack_opt)
    if args.pattern is not None:
        kw["pattern"] = str(args.pattern)
    m = import_backdoorbench(args.path, args.out, attack=args.attack, attack_kw=kw, target=args.target,
                             data_dir=args.data_dir, overwrite=args.overwrite, device=args.device)
    r = m["metrics"]
    print(f"{args.out}: ACC {100 * r['acc']:.2f}%  ASR {100 * r['asr']:.2f}%  RA {100 * r['ra']:.2f}%  "
          f"({m['poison']['count']} poisoned training images)")
    return 0


COMMANDS["import-backdoorbench"] = cmd_import_backdoorbench


def _scan_target(args):
    """(model, dataset, default report folder) for a run folder or a safetensors checkpoint."""
    from .data import load_dataset
    from .runs import load_run

    if args.model.is_dir():
        run = load_run(args.model, args.data_dir)
        return run.model, run.dataset, args.model / "scan"
    if args.model.suffix != ".safetensors":
        raise MapPruneError(f"{args.model}: give a run folder or a .safetensors checkpoint; mapprune never unpickles "
                            "checkpoints (.pt/.pth can run code when loaded): convert it with safetensors' save_file "
                            "where you trust it")
    if args.arch is None or args.num_classes is None:
        raise MapPruneError("a checkpoint needs --arch and --num-classes")
    from .checkpoint import load_state_into, load_tensors
    from .models import create_model

    tensors, _ = load_tensors(args.model)  # checked before the dataset is loaded
    ds = load_dataset(args.dataset, args.data_dir)
    model = create_model(args.arch, args.num_classes, width=args.width, in_channels=ds.image_shape[0], mean=ds.mean,
                         std=ds.std)
    wrapped = any(k.startswith("net.") for k in tensors)  # mapprune's own (normalisation inside) or a bare network
    load_state_into(model if wrapped else model.net, tensors, args.model,
                    what=f"{args.arch} with {args.num_classes} classes")
    return model.eval(), ds, args.model.parent / f"scan-{args.model.stem}"


def cmd_scan(args) -> int:
    from .jobs.scan import THRESHOLD, exit_status, load_calibration, scan_and_save
    from .runs import json_text

    nc_options = _attack_opts(args.nc_opt, "--nc-opt")
    if nc_options and args.no_nc:
        raise MapPruneError("--nc-opt with --no-nc: Neural Cleanse is not run")
    calibration = load_calibration(args.calibration) if args.calibration else None
    model, ds, default_out = _scan_target(args)
    out = args.out or default_out
    report = scan_and_save(model, ds, out, name=str(args.model), clean_ratio=args.clean_ratio, seed=args.seed,
                           calibration=calibration, threshold=args.threshold or THRESHOLD, nc=not args.no_nc,
                           nc_options=nc_options, probes=tuple(args.probes), stimulate=args.stimulate,
                           device=args.device, progress=not args.no_progress, mmbd=not args.no_mmbd)
    if args.json:
        print(json_text(report, indent=1))
    else:
        print("\n".join(_scan_lines(report, out)))
    return exit_status(report)


def _scan_lines(report: dict, out: Path) -> list[str]:
    """What the scan prints: the verdict, what it rests on, the error rates it was calibrated to."""
    if report["verdict"] == "cannot judge":
        return [f"{report['model']}: {report['reason']}"]
    cal = report.get("calibration")
    if cal:
        exp = cal.get("expected") or {}
        lines = [f"{report['model']}: {report['verdict']} (calibrated score {cal['score']:.2f}; backdoored above "
                 f"{cal['threshold']:.2f}, uncertain above {cal['uncertain_from']:.2f})"]
        if exp:
            lines.append(f"  calibrated to: {_rate_text(exp.get('fpr'))} false positives on clean models, "
                         f"{_rate_text(exp.get('tpr'))} of backdoored models found (held out by trigger family; "
                         f"{cal['file']})")
    else:
        lines = [f"{report['model']}: {report['verdict']} (FMT {report['probe']} probe pull {report['score']:.2f}, "
                 f"threshold {report['threshold']:g}; suspected target class {report['suspected_target']}, anomaly "
                 f"index {report['anomaly_index']:.1f}; fixed thresholds, not calibrated: give --calibration FILE)"]
    for name, p in report["probes"].items():
        lines.append(f"  {name} probe: pull {p['pull']:.2f} to class {p['suspected_target']}, anomaly "
                     f"{p['anomaly_index']:.1f}")
    for c in report["rejected_classes"]:
        lines.append(f"  {_rejected_line(c, report['class_acc'])}")
    if report.get("stimulation"):
        lines.append(f"  {_stimulation_line(report['stimulation'])}")
    nc = report.get("neural_cleanse")
    if nc:
        lines.append(f"  Neural Cleanse: anomaly index {nc['anomaly_index']:.2f}, flagged {nc['flagged'] or 'none'}")
    m = report.get("mmbd")
    if m:
        lines.append(f"  MM-BD: class {m['target']}, p-value {m['p_value']:.3g} "
                     f"({'flagged' if m['flagged'] else 'not flagged'} at {m['alpha']:g})")
    lines.append(f"  report: {out / 'scan.json'}, {out / 'scan.png'}")
    return lines


def _rate_text(rate: dict | None) -> str:
    if not rate or rate.get("rate") is None:
        return "?"
    lo, hi = rate["ci95"]
    return f"{100 * rate['rate']:.0f}% ({rate['hits']}/{rate['n']}, 95% CI {100 * lo:.0f}-{100 * hi:.0f}%)"


COMMANDS["scan"] = cmd_scan


def cmd_calibrate(args) -> int:
    from .jobs.calibrate import calibrate, markdown

    cal = calibrate(args.paths, args.out, fpr=args.fpr, nc=not args.no_nc, mmbd=not args.no_mmbd,
                    scan_missing=not args.no_scan, data_dir=args.data_dir, device=args.device,
                    progress=not args.no_progress)
    print(markdown(cal))
    print(f"calibration: {args.out} (use it: mapprune scan MODEL --calibration {args.out})")
    return 0


COMMANDS["calibrate"] = cmd_calibrate


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"mapprune: warning: {message}", file=sys.stderr if file is None else file)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import warnings

    from .errors import MapPruneWarning

    warnings.simplefilter("always", MapPruneWarning)
    warnings.showwarning = _one_line_warning
    keep_freed_memory()
    try:
        if getattr(args, "threads", None) is not None:
            if args.threads < 1:
                raise MapPruneError(f"--threads must be >= 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        return COMMANDS[args.command](args)
    except MapPruneError as e:
        print(f"mapprune: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permission denied: the message says which file
        print(f"mapprune: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mapprune: interrupted; rerun the same command to resume from the last finished epoch",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
