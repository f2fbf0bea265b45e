"""How well does the scan separate clean models from backdoored ones over a population, with Neural Cleanse's
detection beside it?

Reads the ``scan/scan.json`` of every run folder given (a bench folder stands for the run folders in its ``runs/``),
as ``mapprune scan RUN`` or ``mapprune calibrate`` writes it, and prints one row per model: its signs (the largest
probe pull, the rejected-class sign: weakest class / median class accuracy, the stimulation test's anomaly index),
the scan's verdict under its fixed thresholds (``scan.json``'s own: ``fixed_rule_verdict`` when the scan was
calibrated) and whether its suspected class is the real target; then the true and false positive rates of that
verdict and the AUROC of each sign. A run counts as clean when its manifest's poison ratio is 0. Runs without a
scan.json, and scans that could not judge their model, are listed apart.

Neural Cleanse's detection (anomaly index, flagged classes) comes from the scan.json when the scan ran NC (``mapprune
calibrate`` does by default), else from the run's ``defense/nc/result.json`` (``mapprune defend nc RUN``). NC's
suspected target is its most anomalous flagged class.

    python benchmarks/analysis/scan_population.py bench/cifar10-scan
    python benchmarks/analysis/scan_population.py RUN [RUN ...]
"""
import argparse
import json
import statistics
from pathlib import Path

from mapprune.errors import MapPruneError
from mapprune.jobs.calibrate import run_folders
from mapprune.runs import read_manifest


def auroc(pos: list[float], neg: list[float]) -> float:
    """P(score of a backdoored model > score of a clean one), ties counting half."""
    pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
    return sum(pairs) / len(pairs) if pairs else float("nan")


def nc_detection(run: Path, scan: dict) -> tuple[dict | None, str]:
    """NC's detection of the run and where it was read: the scan's, else `mapprune defend nc`'s."""
    if scan.get("neural_cleanse"):
        return scan["neural_cleanse"], "scan"
    result = run / "defense" / "nc" / "result.json"
    if result.is_file():
        return json.loads(result.read_text())["detection"], "defend nc"
    return None, "not run"


def model_row(run: Path, scan: dict) -> dict:
    """One model's signs, verdict and NC detection, from its manifest and scan.json."""
    manifest = read_manifest(run)
    attack = manifest["attack"]
    clean = attack["poison_ratio"] == 0
    acc = [a for a in scan["class_acc"] if a is not None]
    ratio = min(acc) / statistics.median_low(acc) if acc and statistics.median_low(acc) > 0 else 0.0
    verdict = scan.get("fixed_rule_verdict", scan["verdict"])
    return {"name": run.name, "clean": clean, "target": None if clean else attack["target"],
            "acc": manifest.get("metrics", {}).get("acc"), "pull": scan["score"], "ratio": ratio,
            "anomaly": (scan.get("stimulation") or {}).get("anomaly_index"), "suspected": scan["suspected_target"],
            "flagged": verdict == "backdoored", "nc": nc_detection(run, scan)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="run folders, or bench folders holding runs/")
    args = ap.parse_args(argv)
    try:
        runs = run_folders(args.paths)
    except MapPruneError as e:
        ap.error(str(e))
    rows, apart = [], []
    for run in runs:
        path = run / "scan" / "scan.json"
        if not path.is_file():
            apart.append(f"{run.name}: no scan/scan.json (mapprune scan {run})")
            continue
        scan = json.loads(path.read_text())
        if scan["verdict"] == "cannot judge":
            apart.append(f"{run.name}: the scan cannot judge it ({scan.get('reason', 'no reason given')})")
            continue
        rows.append(model_row(run, scan))
    if not rows:
        ap.error("no scanned model among the folders given")

    print("| model | clean ACC | largest pull | weakest class / median | stimulation anomaly | scan verdict | "
          "NC anomaly index (flagged) | NC verdict | NC read from |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        right = "" if r["target"] is None or not r["flagged"] else \
            (", target right" if r["suspected"] == r["target"] else ", target wrong")
        nc, source = r["nc"]
        if nc is None:
            nc_cells = "- | -"
        else:
            nc_right = "" if r["target"] is None or not nc["flagged"] else \
                (", target right" if nc["flagged"][0] == r["target"] else ", target wrong")
            nc_cells = (f"{nc['anomaly_index']:.2f} ({nc['flagged'] or 'none'}) | "
                        f"{'backdoored' if nc['flagged'] else 'no backdoor found'}{nc_right}")
        print(f"| {r['name']}{' (clean)' if r['clean'] else ''} | "
              f"{'' if r['acc'] is None else format(100 * r['acc'], '.2f')} | {r['pull']:.2f} | {r['ratio']:.2f} | "
              f"{'-' if r['anomaly'] is None else format(r['anomaly'], '.2f')} | "
              f"{'backdoored' if r['flagged'] else 'no backdoor found'}{right} | {nc_cells} | {source} |")
    for line in apart:
        print(f"\nleft out: {line}")

    clean_rows = [r for r in rows if r["clean"]]
    bad_rows = [r for r in rows if not r["clean"]]
    fp = sum(r["flagged"] for r in clean_rows)
    tp = sum(r["flagged"] for r in bad_rows)
    judged = [r for r in bad_rows if r["flagged"]]
    right = sum(r["suspected"] == r["target"] for r in judged)
    print(f"\nscan: clean models {len(clean_rows)}, flagged {fp} (FPR {fp / max(1, len(clean_rows)):.2f}); "
          f"backdoored {len(bad_rows)}, flagged {tp} (TPR {tp / max(1, len(bad_rows)):.2f}); suspected target right "
          f"on {right} of the {len(judged)} flagged")
    stim_bad = [r["anomaly"] for r in bad_rows if r["anomaly"] is not None]
    stim_clean = [r["anomaly"] for r in clean_rows if r["anomaly"] is not None]
    signs = {"largest pull": auroc([r["pull"] for r in bad_rows], [r["pull"] for r in clean_rows]),
             "rejected-class sign (1 - ratio)": auroc([1 - r["ratio"] for r in bad_rows],
                                                      [1 - r["ratio"] for r in clean_rows]),
             "stimulation anomaly": auroc(stim_bad, stim_clean),
             "verdict": auroc([float(r["flagged"]) for r in bad_rows], [float(r["flagged"]) for r in clean_rows])}
    print("AUROC: " + "; ".join(f"{k} {v:.2f}" for k, v in signs.items()))

    nc_bad = [r["nc"][0] for r in bad_rows if r["nc"][0] is not None]
    nc_clean = [r["nc"][0] for r in clean_rows if r["nc"][0] is not None]
    nc_right = sum(bool(r["nc"][0]["flagged"]) and r["nc"][0]["flagged"][0] == r["target"]
                   for r in bad_rows if r["nc"][0] is not None)
    if nc_bad or nc_clean:
        print(f"NC: clean models {len(nc_clean)}, flagged {sum(bool(d['flagged']) for d in nc_clean)}; backdoored "
              f"{len(nc_bad)}, flagged {sum(bool(d['flagged']) for d in nc_bad)} ({nc_right} with the target as its "
              f"most anomalous class); AUROC of the anomaly index "
              f"{auroc([d['anomaly_index'] for d in nc_bad], [d['anomaly_index'] for d in nc_clean]):.2f}")
    else:
        print("NC: not run on any of these models")
    return {"rows": rows, "fp": fp, "tp": tp, "auroc": signs}


if __name__ == "__main__":
    main()
