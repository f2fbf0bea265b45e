"""`mapprune calibrate`: scan every model of a population (run folders, or bench folders of them), then calibrate
the scan's rule on their signals and measure its held-out error rates (:mod:`mapprune.detect.calibrate`).

A model's ground truth comes from its manifest: backdoored when its training set had poisoned images and the
backdoor took (ASR at least ``MIN_ASR`` on the backdoor test set: a model whose poisoning failed has no backdoor to
find, and is listed apart); its trigger family from the attack's name; its architecture from the model's.
Scans are written into each run's ``scan/`` folder and reused when their settings match, so the command resumes.
"""

import json
import time
import warnings
from pathlib import Path

from ..data import clean_subset
from ..defenses import create_defense
from ..detect.calibrate import RULES, Model, enough_models, evaluate, signals
from ..detect.mmbd import mmbd
from ..detect.scan import neural_cleanse
from ..device import pick_device
from ..errors import MapPruneError, MapPruneWarning
from ..runs import acquire_folder_lock, load_run, read_manifest, write_json
from .scan import read_calibration, scan_and_save

MIN_ASR = 0.5
FAMILIES = {"random-patch": "patch", "patch": "patch", "badnets": "patch", "blended": "blend", "wanet": "warp",
            "sig": "sig", "lc": "lc", "ssba": "ssba", "inputaware": "inputaware", "lowfreq": "lowfreq"}


def run_folders(paths) -> list[Path]:
    """Run folders named directly, and those of bench folders (``DIR/runs/*``), sorted, unfinished ones left out.
    Calibration files among ``paths`` are passed over (:func:`calibration_files` reads them)."""
    found = []
    for p in map(Path, paths):
        if (p / "manifest.json").is_file():
            found.append(p)
        elif (p / "runs").is_dir():
            found += sorted(r for r in (p / "runs").iterdir() if (r / "manifest.json").is_file())
        elif not _is_calibration_file(p):
            raise MapPruneError(f"{p} is neither a run folder, a bench folder with runs/, nor a calibration JSON")
    return found


def _is_calibration_file(path: Path) -> bool:
    return path.suffix == ".json" and path.is_file()


def calibration_files(paths) -> tuple[list[dict], list[dict]]:
    """The models (name, ground truth, signals, kind) and the left-out models recorded in the calibration files
    among ``paths``: a population's measurements outlive its weights, so a calibration can be extended with new
    models without scanning the old ones again. Checked before any work."""
    models, left_out = [], []
    for p in map(Path, paths):
        if not _is_calibration_file(p):
            continue
        cal = read_calibration(p)
        recorded = cal.get("population", {}).get("models") or []
        if any("signals" not in m for m in recorded):
            raise MapPruneError(f"{p} does not record its models' signals (written by an older mapprune): "
                                "calibrate again from its run folders")
        models += recorded
        left_out += cal.get("population", {}).get("left_out") or []
    return models, left_out


def ground_truth(manifest: dict) -> dict:
    attack = manifest.get("attack", {})
    poisoned = int(manifest.get("poison", {}).get("count", 0)) > 0
    asr = float(manifest.get("metrics", {}).get("asr", 0.0))
    return {"poisoned": poisoned, "implanted": poisoned and asr >= MIN_ASR, "asr": asr,
            "family": FAMILIES.get(attack.get("name"), attack.get("name")) if poisoned else "clean",
            "architecture": manifest.get("model", {}).get("name"), "target": attack.get("target"),
            "kind": model_kind(manifest)}


def model_kind(manifest: dict) -> dict:
    """What a calibration's error rates are tied to: the dataset, the architecture and its width. A model of
    another kind is judged by the same rule, but its error rates were not measured (a clean CIFAR-10
    PreActResNet18 of width 16 scores above a threshold set on width-8 models: the single maps' pull grows with
    the width)."""
    model = manifest.get("model", {})
    return {"dataset": manifest.get("dataset", {}).get("name"), "architecture": model.get("name"),
            "width": model.get("width")}


SCAN_SETTINGS = {"clean_ratio": 0.1, "seed": 0}  # the scans' clean images: the scan command's defaults
# Baseline detectors, each run once per model and kept in its own file beside scan.json, so FMT's signals (minutes
# a model) never wait on Neural Cleanse (about ten times longer) and each resumes on its own.
BASELINES = {"mmbd": "mmbd.json", "nc": "nc.json"}
REPORT_KEYS = {"mmbd": "mmbd", "nc": "neural_cleanse"}  # where scan.json holds each when the scan ran it


def scan_settings() -> dict:
    return dict(SCAN_SETTINGS)


def _read_json(path: Path) -> dict | None:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _current_scan(run: Path) -> dict | None:
    report = _read_json(run / "scan" / "scan.json")
    settings = (report or {}).get("calibration_settings") or {}
    if report is None or any(settings.get(k) != v for k, v in SCAN_SETTINGS.items()):
        return None
    return report


def _baseline(run: Path, name: str, report: dict | None) -> dict | None:
    """A baseline's detection of ``run``: from its own file, or from scan.json when the scan ran it."""
    found = _read_json(run / "scan" / BASELINES[name])
    if found is None and report is not None:
        found = report.get(REPORT_KEYS[name])
    return found


def _compute(run: Path, stage: str, data_dir, device, progress) -> dict:
    """Runs one stage on ``run``: ``"scan"`` (FMT's signals, scan.json) or a baseline (its own file)."""

    r = load_run(run, data_dir)
    if stage == "scan":
        report = scan_and_save(r.model, r.dataset, run / "scan", name=str(run), nc=False, mmbd=False, device=device,
                               progress=progress, **SCAN_SETTINGS)
        report["calibration_settings"] = scan_settings()
        write_json(run / "scan" / "scan.json", report)
        return report
    ds = r.dataset
    if stage == "mmbd":
        found = mmbd(r.model, ds.num_classes, tuple(ds.x_train.shape[1:]), seed=SCAN_SETTINGS["seed"],
                     device=pick_device(device))
    else:
        idx = clean_subset(ds.y_train, SCAN_SETTINGS["clean_ratio"], SCAN_SETTINGS["seed"])
        nc = create_defense("nc", seed=SCAN_SETTINGS["seed"], device=device, progress=progress)
        found = neural_cleanse(r.model, ds.x_train[idx], ds.y_train[idx], nc, device=device)
    (run / "scan").mkdir(exist_ok=True)
    write_json(run / "scan" / BASELINES[stage], found)
    return found


def calibrate(paths, out: Path, *, fpr: float = 0.05, nc: bool = True, mmbd: bool = True, scan_missing: bool = True,
              rule: str = "fmt", data_dir=None, device=None, progress: bool = True, log=print) -> dict:
    """Scans what is not scanned yet, calibrates, and writes ``out`` (the calibration JSON) and ``out`` with
    ``.md`` (the report's tables). Returns the calibration.

    Work goes in stages over the whole population: FMT's signals for every model first, then MM-BD, then Neural
    Cleanse, so a calibration is possible as soon as the first stage is done. A model another ``calibrate`` is
    working on (its scan folder locked) is passed over, so two commands side by side share the population.
    ``rule``: the signals the rule may read (:data:`mapprune.detect.calibrate.RULES`: ``fmt``, or ``fmt+mmbd``,
    which needs MM-BD on every model)."""
    if not 0 < fpr < 0.5:
        raise MapPruneError(f"--fpr is a false-positive rate in (0, 0.5), got {fpr}")
    if rule not in RULES:
        raise MapPruneError(f"--rule is one of {', '.join(RULES)}, got {rule!r}")
    if "mmbd_score" in RULES[rule] and not mmbd:
        raise MapPruneError(f"--rule {rule} reads MM-BD's score; drop --no-mmbd")
    runs = run_folders(paths)
    recorded, recorded_left_out = calibration_files(paths)
    stages = ["scan"] + [b for b, on in (("mmbd", mmbd), ("nc", nc)) if on]
    reports = {run: _current_scan(run) for run in runs}
    truths = {run: ground_truth(read_manifest(run)) for run in runs}
    # the baselines are not run on a model whose backdoor did not take: it is left out of every measurement
    judged = {run for run in runs if not truths[run]["poisoned"] or truths[run]["implanted"]}
    busy, errors = set(), {}
    for stage in stages if scan_missing else []:
        todo = [run for run in runs if run not in errors and (reports[run] is None if stage == "scan" else
                                        run in judged and reports[run]
                                        and reports[run].get("verdict") != "cannot judge"
                                        and _baseline(run, stage, reports[run]) is None)]
        for i, run in enumerate(todo):
            try:
                lock = acquire_folder_lock(run / "scan", "calibrate")
            except MapPruneError:
                busy.add(run)
                continue
            try:
                # read again under the lock: another command may have finished this model meanwhile
                done = _current_scan(run) if stage == "scan" else _baseline(run, stage, reports[run])
                if done is not None:
                    reports[run] = done if stage == "scan" else reports[run]
                    continue
                t0 = time.perf_counter()
                try:
                    found = _compute(run, stage, data_dir, device, progress)
                except MapPruneError as e:  # one unreadable model does not stop the population's other work
                    errors[run] = f"{stage}: {e}"
                    log(f"[{stage} {i + 1}/{len(todo)}] {run.name}: left out ({e})")
                    continue
                if stage == "scan":
                    reports[run] = found
                what = found.get("verdict") if stage == "scan" else f"score {found.get('score', found.get('anomaly_index'))}"
                log(f"[{stage} {i + 1}/{len(todo)}] {run.name} in {time.perf_counter() - t0:.0f} s: {what}")
            finally:
                lock.release()
    models, failed, skipped, kinds, asrs = [], [], [], [], {}
    missing = dict.fromkeys(BASELINES if scan_missing else (), 0)
    for run in runs:
        truth = truths[run]
        report = reports[run] or _current_scan(run)  # a model another command was scanning may be done by now
        if run in errors and (report is None or "scan" in errors[run]):
            failed.append({"run": run.name, "reason": errors[run]})
            continue
        if report is None:
            skipped.append(run.name)
            continue
        if report["verdict"] == "cannot judge":
            failed.append({"run": run.name, "reason": report["reason"]})
            continue
        if truth["poisoned"] and not truth["implanted"]:
            failed.append({"run": run.name, "reason": f"backdoor not implanted (ASR {truth['asr']:.1%})"})
            continue
        report = {**report, **{REPORT_KEYS[b]: _baseline(run, b, report) for b in BASELINES}}
        for b in missing:
            missing[b] += report[REPORT_KEYS[b]] is None and b in stages
        models.append(Model(run.name, truth["poisoned"], truth["family"], truth["architecture"], signals(report)))
        kinds.append(truth["kind"])
        asrs[run.name] = truth["asr"]
    # models measured before and recorded in a calibration file; a run folder of the same name is the newer word
    have = {run.name for run in runs}
    for m in recorded:
        if m["run"] not in have:
            have.add(m["run"])
            models.append(Model(m["run"], m["backdoored"], m["family"], m["architecture"], m["signals"]))
            kinds.append(m.get("kind") or {})
            asrs[m["run"]] = m.get("asr")
    failed += [f for f in recorded_left_out if f["run"] not in have and not have.add(f["run"])]
    lacking = {b: n for b, n in missing.items() if n}
    if lacking:
        warnings.warn("baselines measured on fewer models than the rule (another calibrate was running them, or "
                      "they failed): " + ", ".join(f"{b} missing on {n}" for b, n in lacking.items()),
                      MapPruneWarning, stacklevel=2)
    if skipped:
        why = "another calibrate is scanning them" if busy else "--no-scan"
        warnings.warn(f"{len(skipped)} runs have no scan yet and were left out ({why}): "
                      f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}", MapPruneWarning, stacklevel=2)
    if enough_models(models):
        result = evaluate(models, fpr, rule=rule)
    else:  # the models measured so far are kept for the next calibration; no rule is set on them
        result = {"population": {"clean": sum(not m.backdoored for m in models),
                                 "backdoored": sum(m.backdoored for m in models)},
                  "rule": None, "by_family": None, "baselines": {}}
        warnings.warn(f"{result['population']['clean']} clean and {result['population']['backdoored']} backdoored "
                      "models are too few to set a rule (at least 4 clean and 1 backdoored); the file records them "
                      "for the next calibration", MapPruneWarning, stacklevel=2)
    by_family = result["by_family"] or {}
    calibration = {
        "kind": "scan-calibration",
        "schema_version": 2,
        "fpr": fpr,
        "scan_settings": scan_settings(),
        "population": {**result["population"],
                       "models": [{"run": m.name, "backdoored": m.backdoored, "family": m.family,
                                   "architecture": m.architecture, "kind": kind, "asr": asrs[m.name],
                                   "signals": m.signals} for m, kind in zip(models, kinds)],
                       "left_out": failed,
                       "kinds": [dict(k) for k in sorted({tuple(k.items()) for k in kinds if k}, key=str)]},
        "rule": result["rule"],
        "expected": {k: by_family[k] for k in ("fpr", "tpr", "auroc", "auroc_ci95")} if by_family else None,
        "held_out": {k: result[k] for k in ("by_family", "by_architecture") if result.get(k)},
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
    """The calibration's report: its rule, :func:`held_out_tables`, and the models left out with their reasons."""
    pop = cal["population"]
    lines = [f"# Scan calibration: {pop['clean']} clean and {pop['backdoored']} backdoored models, FPR target "
             f"{cal['fpr']:g}", ""]
    if cal["rule"] is None:
        lines += ["Too few models to set a rule; the file records them for the next calibration.", ""]
    else:
        lines += [f"Rule: the largest robust z over {', '.join(cal['rule']['signals'])}; backdoored above "
                  f"{cal['rule']['threshold']:.2f}, uncertain above {cal['rule']['uncertain_from']:.2f}.", "",
                  held_out_tables(cal, "##"), ""]
    if pop["left_out"]:
        lines += ["## Left out", ""] + [f"- {f['run']}: {f['reason']}" for f in pop["left_out"]] + [""]
    return "\n".join(lines)


def held_out_tables(cal: dict, heading: str = "**") -> str:
    """Held-out TPR and FPR by trigger family and by architecture, with the AUROC, and the baselines' AUROC on
    the same models (what the results pages show; ``heading`` "##" makes each table's title a heading, "**" bold)."""
    def title(text: str) -> str:
        return f"{heading} {text}" if heading.startswith("#") else f"{heading}{text}{heading}"

    lines = []
    for key, name in (("by_family", "Trigger family held out"), ("by_architecture", "Architecture held out")):
        part = cal["held_out"].get(key)
        if not part:
            continue
        lines += [title(name), "", "| group | TPR (95% CI) | FPR (95% CI) | uncertain |", "|---|---|---|---|"]
        for g, row in part["groups"].items():
            lines.append(f"| {g} | {_pct(row['tpr'])} | {_pct(row['fpr'])} | {row['uncertain']} |")
        lines += [f"| **all** | {_pct(part['tpr'])} | {_pct(part['fpr'])} | |", "",
                  f"AUROC {part['auroc']:.3f} (95% CI {part['auroc_ci95'][0]:.3f}-{part['auroc_ci95'][1]:.3f})", ""]
    if cal["baselines"]:
        lines += [title("Baselines on the same models"), "", "| detector | models | AUROC (95% CI) |", "|---|---|---|"]
        for b, row in cal["baselines"].items():
            lines.append(f"| {b} | {row['models']} | {row['auroc']:.3f} ({row['auroc_ci95'][0]:.3f}-"
                         f"{row['auroc_ci95'][1]:.3f}) |")
        lines.append("")
    return "\n".join(lines).rstrip("\n")
