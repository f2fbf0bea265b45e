"""The scan's false positives over a population of clean models, and its detection over backdoored ones,
with Neural Cleanse's detection beside it.

Reads every ``runs/cifar10-*/scan/scan.json`` written by ``mapprune scan RUN``, prints one row per model, then the
true and false positive rates at the scan's default verdict and the AUROC of each of its signs: the largest probe
pull, the rejected-class sign (1 - weakest class / median class accuracy) and the stimulation test's anomaly index.
The verdict is recomputed from the three signs with the scan's own thresholds (``jobs.scan.THRESHOLD``,
``metrics.REJECTED``, ``stimulation.ANOMALY_THRESHOLD``), so rows given as arguments are judged by the same rule. A
run counts as clean when its manifest's poison ratio is 0. Rows measured without a scan.json (for example
probe pulls read from FMT's result.json files, or a stimulation table) can be given as
``NAME=PULL:WEAKEST_OVER_MEDIAN:STIMULATION_ANOMALY[:clean | :SUSPECTED]`` (the anomaly "-" where the stimulation
test was not run; SUSPECTED the scan's suspected class); they are marked as such, and their real target is read from
``runs/cifar10-NAME/manifest.json`` when it exists.

Neural Cleanse's detection (anomaly index, flagged classes) comes from the scan.json when the scan ran NC, else
from ``runs/cifar10-NAME/defense/nc/result.json`` (``mapprune defend nc RUN`` at its defaults), else from the
default-settings NC cell of a bench whose results.csv is given with ``--bench`` (a cell adopted from or made on
``runs/cifar10-NAME``). NC's suspected target is its most anomalous flagged class (the smallest reversed mask).

    python benchmarks/analysis/scan_population.py [--bench bench/c10-runs/results.csv] [NAME=PULL:RATIO:ANOMALY[:clean] ...]
"""
import argparse
import csv
import glob
import json
from pathlib import Path

from mapprune.jobs.scan import THRESHOLD
from mapprune.metrics import REJECTED
from mapprune.probes import ANOMALY_THRESHOLD


def auroc(pos: list[float], neg: list[float]) -> float:
    """P(score of a backdoored model > score of a clean one), ties counting half."""
    pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
    return sum(pairs) / len(pairs) if pairs else float("nan")


def verdict(pull: float, ratio: float, anomaly: float | None) -> bool:
    return pull > THRESHOLD or ratio < REJECTED or (anomaly is not None and anomaly > ANOMALY_THRESHOLD)


def bench_nc(results_csv: str | None) -> dict[str, tuple[dict, str]]:
    """run folder -> (NC detection, where it was read) for every default-settings NC cell of a bench."""
    found = {}
    if not results_csv:
        return found
    with open(results_csv) as f:
        for row in csv.DictReader(f):
            settings = json.loads(row["settings"] or "{}")
            if row["defense"] != "nc" or settings.get("opts") or not settings.get("adopt_from"):
                continue
            result = Path(row["path"]) / "result.json"
            if result.exists():
                found[settings["adopt_from"].rstrip("/")] = (json.loads(result.read_text())["detection"], row["path"])
    return found


def nc_detection(run: Path, scan: dict | None, from_bench: dict) -> tuple[dict | None, str]:
    if scan and scan.get("neural_cleanse"):
        return scan["neural_cleanse"], "scan"
    result = run / "defense" / "nc" / "result.json"
    if result.exists():
        return json.loads(result.read_text())["detection"], "defend nc"
    if str(run) in from_bench:
        return from_bench[str(run)][0], "bench"
    return None, ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", help="a bench's results.csv to read NC cells from")
    parser.add_argument("given", nargs="*", help="NAME=PULL:WEAKEST_OVER_MEDIAN:STIMULATION_ANOMALY[:clean|:SUSPECTED]")
    args = parser.parse_args()
    from_bench = bench_nc(args.bench)

    rows = []
    for path in sorted(glob.glob("runs/cifar10-*/scan/scan.json")):
        run = Path(path).parent.parent
        manifest = json.loads((run / "manifest.json").read_text())
        scan = json.loads(Path(path).read_text())
        attack = manifest["attack"]
        clean = attack["poison_ratio"] == 0
        acc = [a for a in scan["class_acc"] if a is not None]
        ratio = min(acc) / sorted(acc)[len(acc) // 2]
        anomaly = (scan.get("stimulation") or {}).get("anomaly_index")
        rows.append(dict(name=run.name, clean=clean, pull=scan["score"], ratio=ratio, anomaly=anomaly,
                         suspected=scan["suspected_target"], target=None if clean else attack["target"],
                         source="scanned now", acc=manifest.get("metrics", {}).get("acc"),
                         nc=nc_detection(run, scan, from_bench)))
    for arg in args.given:
        name, values = arg.split("=")
        pull, ratio, anomaly, *kind = values.split(":")
        run = Path(f"runs/cifar10-{name}")
        manifest = json.loads((run / "manifest.json").read_text()) if (run / "manifest.json").exists() else None
        clean = kind == ["clean"]
        target = None if clean or manifest is None else manifest["attack"]["target"]
        suspected = int(kind[0]) if kind and not clean else None
        rows.append(dict(name=name, clean=clean, pull=float(pull), ratio=float(ratio),
                         anomaly=None if anomaly == "-" else float(anomaly), suspected=suspected, target=target,
                         source="given", acc=None, nc=nc_detection(run, None, from_bench)))

    print("| model | clean ACC | largest pull | weakest class / median | stimulation anomaly | FMT scan verdict | "
          "NC anomaly index | NC flagged | NC verdict | source (FMT; NC) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        flagged = verdict(r["pull"], r["ratio"], r["anomaly"])
        right = "" if r["target"] is None or r["suspected"] is None or not flagged else \
            (", target right" if r["suspected"] == r["target"] else ", target wrong")
        nc, nc_source = r["nc"]
        nc_cells = "| - | - | - " if nc is None else \
            (f"| {nc['anomaly_index']:.2f} | {nc['flagged'] or 'none'} | "
             f"{'backdoored' if nc['flagged'] else 'no backdoor found'}"
             + ("" if r["target"] is None or not nc["flagged"] else
                (", target right" if nc["flagged"][0] == r["target"] else ", target wrong")) + " ")
        print(f"| {r['name']}{' (clean)' if r['clean'] else ''} | "
              f"{'' if r['acc'] is None else format(100 * r['acc'], '.2f')} | {r['pull']:.2f} | {r['ratio']:.2f} | "
              f"{'' if r['anomaly'] is None else format(r['anomaly'], '.2f')} | "
              f"{'backdoored' if flagged else 'no backdoor found'}{right} {nc_cells}| {r['source']}; "
              f"{nc_source or 'not run'} |")

    clean_rows = [r for r in rows if r["clean"]]
    bad_rows = [r for r in rows if not r["clean"]]

    def fmt_verdict(r: dict) -> bool:
        return verdict(r["pull"], r["ratio"], r["anomaly"])

    fp = sum(map(fmt_verdict, clean_rows))
    tp = sum(map(fmt_verdict, bad_rows))
    print(f"\nFMT scan: clean models {len(clean_rows)}, flagged {fp} (FPR {fp / max(1, len(clean_rows)):.2f}); "
          f"backdoored {len(bad_rows)}, flagged {tp} (TPR {tp / max(1, len(bad_rows)):.2f})")
    judged = [r for r in bad_rows if fmt_verdict(r) and r["target"] is not None and r["suspected"] is not None]
    print(f"FMT scan's suspected target right on {sum(r['suspected'] == r['target'] for r in judged)} of the "
          f"{len(judged)} flagged models whose target and suspected class are known")
    stim_bad = [r["anomaly"] for r in bad_rows if r["anomaly"] is not None]
    stim_clean = [r["anomaly"] for r in clean_rows if r["anomaly"] is not None]
    print(f"AUROC of the largest pull: {auroc([r['pull'] for r in bad_rows], [r['pull'] for r in clean_rows]):.2f}; "
          f"of the rejected-class sign (1 - ratio): "
          f"{auroc([1 - r['ratio'] for r in bad_rows], [1 - r['ratio'] for r in clean_rows]):.2f}; "
          f"of the stimulation anomaly: {auroc(stim_bad, stim_clean):.2f} ({len(stim_bad)} and {len(stim_clean)} "
          f"models); of the verdict: "
          f"{auroc([float(fmt_verdict(r)) for r in bad_rows], [float(fmt_verdict(r)) for r in clean_rows]):.2f}")

    nc_bad = [r["nc"][0] for r in bad_rows if r["nc"][0] is not None]
    nc_clean = [r["nc"][0] for r in clean_rows if r["nc"][0] is not None]
    nc_right = sum(bool(r["nc"][0]["flagged"]) and r["nc"][0]["flagged"][0] == r["target"]
                   for r in bad_rows if r["nc"][0] is not None and r["target"] is not None)
    print(f"NC: clean models {len(nc_clean)}, flagged {sum(bool(d['flagged']) for d in nc_clean)}; backdoored "
          f"{len(nc_bad)}, flagged {sum(bool(d['flagged']) for d in nc_bad)} ({nc_right} with the target as its most "
          f"anomalous class); AUROC of the anomaly index "
          f"{auroc([d['anomaly_index'] for d in nc_bad], [d['anomaly_index'] for d in nc_clean]):.2f}")


if __name__ == "__main__":
    main()
