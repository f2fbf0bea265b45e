"""``mapprune scan``: is this model backdoored? The verdict, what it rests on, and an exit status that says it."""

import argparse
from pathlib import Path

from ..errors import MapPruneError
from .common import add_common, finite, key_values, ratio
from .lines import rejected_line, stimulation_line

NAME = "scan"


def add_parser(subparsers) -> argparse.ArgumentParser:
    # lazy: these import torch: kept out of `import mapprune.cli`, though build_parser still loads them for the help
    from ..detect.scan import PROBES, THRESHOLD
    from ..models import MODELS

    sc = subparsers.add_parser(NAME, help="is this model backdoored? exit status 3 if the verdict is yes, 0 if not, "
                               "5 if uncertain (calibrated), 4 if the model cannot be judged (broken or collapsed)")
    sc.add_argument("model", type=Path, help="a run folder, or a safetensors checkpoint (with --arch, --num-classes)")
    sc.add_argument("--arch", help=f"checkpoint architecture: one of {', '.join(MODELS)}")
    sc.add_argument("--num-classes", type=int, help="checkpoint: number of classes")
    sc.add_argument("--width", type=int, help="checkpoint: first-stage channels (default: the architecture's)")
    sc.add_argument("--dataset", default="cifar10", help="checkpoint: where the clean images come from (default "
                    "%(default)s; a run folder uses its own)")
    sc.add_argument("--clean-ratio", type=ratio, default=0.1, help="clean class-balanced share of the training set "
                    "used as the defender's images (default %(default)s)")
    sc.add_argument("--threshold", type=finite, help="the suspected target's pull above which the verdict is "
                    f"backdoored (default {THRESHOLD:g}, set on clean models; docs/results.md)")
    sc.add_argument("--no-nc", action="store_true", help="skip Neural Cleanse's second opinion (saves ~10 minutes "
                    "on a CPU for a CIFAR model)")
    sc.add_argument("--nc-opt", action="append", default=[], metavar="KEY=VALUE", help="a Neural Cleanse option")
    sc.add_argument("--calibration", type=Path, metavar="FILE",
                    help="a calibration written by mapprune calibrate: its rule decides the verdict (backdoored, "
                         "uncertain near the threshold: exit 5, no backdoor found) and its error rates are printed")
    sc.add_argument("--no-mmbd", action="store_true", help="skip MM-BD's data-free second opinion")
    sc.add_argument("--probes", nargs="+", default=list(PROBES), metavar="PROBE",
                    help=f"FMT's probes to run in one pass (default: {' '.join(PROBES)}); the largest pull decides")
    sc.add_argument("--stimulate", type=finite, default=4.0, metavar="LEVEL",
                    help="the stimulation test's level in clean standard deviations (default %(default)g; 0 skips it)")
    sc.add_argument("--seed", type=int, default=0, help="clean subset and probe seed (default %(default)s)")
    sc.add_argument("--out", type=Path, help="report folder (default: RUN/scan, or CHECKPOINT's folder/scan-NAME)")
    sc.add_argument("--json", action="store_true", help="print the report as JSON")
    add_common(sc)
    return sc


def run(args) -> int:
    """Scans the model, writes the report, prints the verdict (or the report as JSON); the verdict's exit status."""
    # lazy: the command's job imports torch; it loads only when the command runs
    from ..detect.scan import THRESHOLD
    from ..jobs.scan import exit_status, load_calibration, scan_and_save
    from ..runs import json_text

    nc_options = key_values(args.nc_opt, "--nc-opt")
    if nc_options and args.no_nc:
        raise MapPruneError("--nc-opt with --no-nc: Neural Cleanse is not run")
    calibration = load_calibration(args.calibration) if args.calibration else None
    if calibration is not None and args.no_mmbd and "mmbd_score" in calibration["_rule"].signals:
        raise MapPruneError(f"{args.calibration}'s rule reads MM-BD's score; drop --no-mmbd")
    model, ds, default_out, kind = _target(args)
    out = args.out or default_out
    report = scan_and_save(model, ds, out, name=str(args.model), clean_ratio=args.clean_ratio, seed=args.seed,
                           calibration=calibration, threshold=args.threshold or THRESHOLD, nc=not args.no_nc,
                           nc_options=nc_options, probes=tuple(args.probes), stimulate=args.stimulate,
                           device=args.device, progress=not args.no_progress, mmbd=not args.no_mmbd, kind=kind)
    if args.json:
        print(json_text(report, indent=1))
    else:
        print("\n".join(scan_lines(report, out)))
    return exit_status(report)


def _target(args):
    """(model, dataset, default report folder, the model's kind: dataset, architecture, width) for a run folder
    or a safetensors checkpoint."""
    # lazy: these import torch; they load only when the command runs
    from ..data import load_dataset
    from ..jobs.calibrate import model_kind
    from ..runs import load_run

    if args.model.is_dir():
        run = load_run(args.model, args.data_dir)
        return run.model, run.dataset, args.model / "scan", model_kind(run.manifest)
    if args.model.suffix != ".safetensors":
        raise MapPruneError(f"{args.model}: give a run folder or a .safetensors checkpoint; mapprune never unpickles "
                            "checkpoints (.pt/.pth can run code when loaded): convert it with safetensors' save_file "
                            "where you trust it")
    if args.arch is None or args.num_classes is None:
        raise MapPruneError("a checkpoint needs --arch and --num-classes")
    # lazy: these import torch; they load only when the command runs
    from ..checkpoint import load_state_into, load_tensors
    from ..models import create_model

    tensors, _ = load_tensors(args.model)  # checked before the dataset is loaded
    ds = load_dataset(args.dataset, args.data_dir)
    model = create_model(args.arch, args.num_classes, width=args.width, in_channels=ds.image_shape[0], mean=ds.mean,
                         std=ds.std)
    wrapped = any(k.startswith("net.") for k in tensors)  # mapprune's own (normalisation inside) or a bare network
    load_state_into(model if wrapped else model.net, tensors, args.model,
                    what=f"{args.arch} with {args.num_classes} classes")
    # without --width the width is the architecture's own, which the manifests of a population record as a number
    kind = {"dataset": ds.name, "architecture": args.arch, "width": args.width} if args.width is not None else None
    return model.eval(), ds, args.model.parent / f"scan-{args.model.stem}", kind


def scan_lines(report: dict, out: Path) -> list[str]:
    """What the scan prints: the verdict, what it rests on, the error rates it was calibrated to."""
    if report["verdict"] == "cannot judge":
        return [f"{report['model']}: {report['reason']}"]
    cal = report.get("calibration")
    if cal:
        exp = cal.get("expected") or {}
        lines = [f"{report['model']}: {report['verdict']} (calibrated score {cal['score']:.2f}; backdoored above "
                 f"{cal['threshold']:.2f}, uncertain above {cal['uncertain_from']:.2f})"]
        if exp:
            lines.append(f"  calibrated to: {rate_text(exp.get('fpr'))} false positives on clean models, "
                         f"{rate_text(exp.get('tpr'))} of backdoored models found (held out by trigger family; "
                         f"{cal['file']})")
        if cal.get("outside"):
            lines.append(f"  caution: {cal['outside']}")
    else:
        lines = [f"{report['model']}: {report['verdict']} (FMT {report['probe']} probe pull {report['score']:.2f}, "
                 f"threshold {report['threshold']:g}; suspected target class {report['suspected_target']}, anomaly "
                 f"index {report['anomaly_index']:.1f}; fixed thresholds, not calibrated: give --calibration FILE)"]
    for name, p in report["probes"].items():
        lines.append(f"  {name} probe: pull {p['pull']:.2f} to class {p['suspected_target']}, anomaly "
                     f"{p['anomaly_index']:.1f}")
    for c in report["rejected_classes"]:
        lines.append(f"  {rejected_line(c, report['class_acc'])}")
    if report.get("stimulation"):
        lines.append(f"  {stimulation_line(report['stimulation'])}")
    nc = report.get("neural_cleanse")
    if nc:
        lines.append(f"  Neural Cleanse: anomaly index {nc['anomaly_index']:.2f}, flagged {nc['flagged'] or 'none'}")
    m = report.get("mmbd")
    if m:
        lines.append(f"  MM-BD: class {m['target']}, p-value {m['p_value']:.3g} "
                     f"({'flagged' if m['flagged'] else 'not flagged'} at {m['alpha']:g})")
    lines.append(f"  report: {out / 'scan.json'}, {out / 'scan.png'}")
    return lines


def rate_text(rate: dict | None) -> str:
    """A calibrated error rate as 'R% (hits/n, 95% CI lo-hi%)', or '?' where it was not measured."""
    if not rate or rate.get("rate") is None:
        return "?"
    lo, hi = rate["ci95"]
    return f"{100 * rate['rate']:.0f}% ({rate['hits']}/{rate['n']}, 95% CI {100 * lo:.0f}-{100 * hi:.0f}%)"
