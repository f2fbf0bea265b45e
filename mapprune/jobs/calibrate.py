"""`mapprune calibrate`: scan every model of a population (run folders, or bench folders of them), then calibrate
the scan's rule on their signals and measure its held-out error rates (:mod:`mapprune.detect.calibrate`).

A model's ground truth comes from its manifest: backdoored when its training set had poisoned images and the
backdoor took (ASR at least ``MIN_ASR`` on the backdoor test set: a model whose poisoning failed has no backdoor to
find, and is listed apart); its trigger family from the attack's name; its architecture from the model's.
Scans are written into each run's ``scan/`` folder and reused when their settings match, so the command resumes.
"""

import json
import time
from pathlib import Path

from ..detect.calibrate import Model, evaluate, signals
from ..errors import MapPruneError, MapPruneWarning
from ..runs import load_run, read_manifest, write_json
from .scan import scan_and_save

MIN_ASR = 0.5
FAMILIES = {"random-patch": "patch", "patch": "patch", "badnets": "patch", "blended": "blend", "wanet": "warp",
            "sig": "sig", "lc": "lc", "ssba": "ssba", "inputaware": "inputaware", "lowfreq": "lowfreq"}


def run_folders(paths) -> list[Path]:
    """Run folders named directly, and those of bench folders (``DIR/runs/*``), sorted, unfinished ones left out."""
    found = []
    for p in map(Path, paths):
        if (p / "manifest.json").is_file():
            found.append(p)
        elif (p / "runs").is_dir():
            found += sorted(r for r in (p / "runs").iterdir() if (r / "manifest.json").is_file())
        else:
            raise MapPruneError(f"{p} is neither a run folder nor a bench folder with runs/")
    return found


def ground_truth(manifest: dict) -> dict:
    attack = manifest.get("attack", {})
    poisoned = int(manifest.get("poison", {}).get("count", 0)) > 0
    asr = float(manifest.get("metrics", {}).get("asr", 0.0))
    return {"poisoned": poisoned, "implanted": poisoned and asr >= MIN_ASR, "asr": asr,
            "family": FAMILIES.get(attack.get("name"), attack.get("name")) if poisoned else "clean",
            "architecture": manifest.get("model", {}).get("name"), "target": attack.get("target")}


def scan_settings(nc: bool, mmbd: bool) -> dict:
    return {"clean_ratio": 0.1, "seed": 0, "nc": nc, "mmbd": mmbd}


def _current_scan(run: Path, settings: dict) -> dict | None:
    path = run / "scan" / "scan.json"
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if report.get("calibration_settings") != settings:
        return None
    return report


def calibrate(paths, out: Path, *, fpr: float = 0.05, nc: bool = True, mmbd: bool = True, scan_missing: bool = True,
              data_dir=None, device=None, progress: bool = True, log=print) -> dict:
    """Scans what is not scanned yet, calibrates, and writes ``out`` (the calibration JSON) and ``out`` with
    ``.md`` (the report's tables). Returns the calibration."""
    if not 0 < fpr < 0.5:
        raise MapPruneError(f"--fpr is a false-positive rate in (0, 0.5), got {fpr}")
    runs = run_folders(paths)
    settings = scan_settings(nc, mmbd)
    models, failed, skipped = [], [], []
    for i, run in enumerate(runs):
        truth = ground_truth(read_manifest(run))
        report = _current_scan(run, settings)
        if report is None and scan_missing:
            t0 = time.perf_counter()
            r = load_run(run, data_dir)
            report = scan_and_save(r.model, r.dataset, run / "scan", name=str(run), nc=nc, mmbd=mmbd,
                                   device=device, progress=progress)
            report["calibration_settings"] = settings
            write_json(run / "scan" / "scan.json", report)
            log(f"[{i + 1}/{len(runs)}] scanned {run.name} in {time.perf_counter() - t0:.0f} s: {report['verdict']}")
        if report is None:
            skipped.append(run.name)
            continue
        if report["verdict"] == "cannot judge":
            failed.append({"run": run.name, "reason": report["reason"]})
            continue
        if truth["poisoned"] and not truth["implanted"]:
            failed.append({"run": run.name, "reason": f"backdoor not implanted (ASR {truth['asr']:.1%})"})
            continue
        models.append(Model(run.name, truth["poisoned"], truth["family"], truth["architecture"], signals(report)))
    if skipped:
        import warnings

        warnings.warn(f"{len(skipped)} runs have no scan with these settings and were left out (no --scan-missing): "
                      f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}", MapPruneWarning, stacklevel=2)
    result = evaluate(models, fpr)
    calibration = {
        "kind": "scan-calibration",
        "schema_version": 1,
        "fpr": fpr,
        "scan_settings": settings,
        "population": {**result["population"], "models": [{"run": m.name, "backdoored": m.backdoored,
                                                            "family": m.family, "architecture": m.architecture}
                                                           for m in models],
                       "left_out": failed},
        "rule": result["rule"],
        "expected": {"fpr": result["by_family"]["fpr"], "tpr": result["by_family"]["tpr"],
                     "auroc": result["by_family"]["auroc"], "auroc_ci95": result["by_family"]["auroc_ci95"]},
        "held_out": {k: result[k] for k in ("by_family", "by_architecture") if k in result},
        "baselines": result["baselines"],
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, calibration)
    out.with_suffix(".md").write_text(markdown(calibration))
    return calibration


def _pct(rate: dict) -> str:
    if rate["rate"] is None:
        return "-"
    lo, hi = rate["ci95"]
    return f"{100 * rate['rate']:.0f}% ({rate['hits']}/{rate['n']}; {100 * lo:.0f}-{100 * hi:.0f})"


def markdown(cal: dict) -> str:
    """The calibration's tables: held-out TPR and FPR by family and by architecture, AUROC beside the baselines'."""
    pop = cal["population"]
    lines = [f"# Scan calibration: {pop['clean']} clean and {pop['backdoored']} backdoored models, FPR target "
             f"{cal['fpr']:g}", "",
             f"Rule: the largest robust z over {', '.join(cal['rule']['signals'])}; backdoored above "
             f"{cal['rule']['threshold']:.2f}, uncertain above {cal['rule']['uncertain_from']:.2f}.", ""]
    for key, title in (("by_family", "trigger family held out"), ("by_architecture", "architecture held out")):
        part = cal["held_out"].get(key)
        if not part:
            continue
        lines += [f"## {title}", "", "| group | TPR (95% CI) | FPR (95% CI) | uncertain |", "|---|---|---|---|"]
        for g, row in part["groups"].items():
            lines.append(f"| {g} | {_pct(row['tpr'])} | {_pct(row['fpr'])} | {row['uncertain']} |")
        lines += [f"| **all** | {_pct(part['tpr'])} | {_pct(part['fpr'])} | |", "",
                  f"AUROC {part['auroc']:.3f} (95% CI {part['auroc_ci95'][0]:.3f}-{part['auroc_ci95'][1]:.3f})", ""]
    if cal["baselines"]:
        lines += ["## Baselines on the same models", "", "| detector | models | AUROC (95% CI) |", "|---|---|---|"]
        for b, row in cal["baselines"].items():
            lines.append(f"| {b} | {row['models']} | {row['auroc']:.3f} ({row['auroc_ci95'][0]:.3f}-"
                         f"{row['auroc_ci95'][1]:.3f}) |")
        lines.append("")
    if pop["left_out"]:
        lines += ["## Left out", ""] + [f"- {f['run']}: {f['reason']}" for f in pop["left_out"]] + [""]
    return "\n".join(lines)
