"""Issue 13: the scan's false positives over a population of clean models, and its detection over backdoored ones.

Reads every ``runs/cifar10-*/scan/scan.json`` written by ``mapprune scan RUN``, prints one row per model, then the
true and false positive rates at the scan's default verdict and the AUROC of each of its signs: the largest probe
pull, the rejected-class sign (1 - weakest class / median class accuracy) and the stimulation test's anomaly index.
The verdict is recomputed from the three signs with the scan's own thresholds (``jobs.scan.THRESHOLD``,
``metrics.REJECTED``, ``stimulation.ANOMALY_THRESHOLD``), so rows given as arguments are judged by the same rule. A
run counts as clean when its manifest's poison ratio is 0. Rows measured without a scan.json (for example the
probes of an earlier session and the stimulation table of this one) can be given as
``NAME=PULL:WEAKEST_OVER_MEDIAN:STIMULATION_ANOMALY[:clean]`` (the anomaly "-" where the stimulation test was not
run); they are marked as such.

    python benchmarks/analysis/scan_population.py [NAME=PULL:RATIO:ANOMALY[:clean] ...]
"""
import glob
import json
import sys
from pathlib import Path

from mapprune.defenses.stimulation import ANOMALY_THRESHOLD
from mapprune.jobs.scan import THRESHOLD
from mapprune.metrics import REJECTED


def auroc(pos: list[float], neg: list[float]) -> float:
    """P(score of a backdoored model > score of a clean one), ties counting half."""
    pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
    return sum(pairs) / len(pairs) if pairs else float("nan")


def verdict(pull: float, ratio: float, anomaly: float | None) -> bool:
    return pull > THRESHOLD or ratio < REJECTED or (anomaly is not None and anomaly > ANOMALY_THRESHOLD)


rows = []  # (name, clean?, pull, weakest/median, stimulation anomaly, target right or None, source, ACC)
for path in sorted(glob.glob("runs/cifar10-*/scan/scan.json")):
    run = Path(path).parent.parent
    manifest = json.loads((run / "manifest.json").read_text())
    scan = json.loads(Path(path).read_text())
    attack = manifest["attack"]
    clean = attack["poison_ratio"] == 0
    acc = [a for a in scan["class_acc"] if a is not None]
    ratio = min(acc) / sorted(acc)[len(acc) // 2]
    right = None if clean else scan["suspected_target"] == attack["target"]
    anomaly = (scan.get("stimulation") or {}).get("anomaly_index")
    rows.append((run.name, clean, scan["score"], ratio, anomaly, right, "scanned now",
                 manifest.get("metrics", {}).get("acc")))
for arg in sys.argv[1:]:
    name, values = arg.split("=")
    pull, ratio, anomaly, *kind = values.split(":")
    rows.append((name, kind == ["clean"], float(pull), float(ratio), None if anomaly == "-" else float(anomaly), None,
                 "given", None))

print("| model | clean ACC | largest pull | weakest class / median | stimulation anomaly | verdict | target right | "
      "source |")
print("|---|---|---|---|---|---|---|---|")
for name, clean, pull, ratio, anomaly, right, source, acc in rows:
    flagged = verdict(pull, ratio, anomaly)
    print(f"| {name}{' (clean)' if clean else ''} | {'' if acc is None else f'{100 * acc:.2f}'} | {pull:.2f} | "
          f"{ratio:.2f} | {'' if anomaly is None else f'{anomaly:.2f}'} | "
          f"{'backdoored' if flagged else 'no backdoor found'} | "
          f"{'' if right is None else ('yes' if right else 'no')} | {source} |")
clean_rows = [r for r in rows if r[1]]
bad_rows = [r for r in rows if not r[1]]
fp = sum(verdict(*r[2:5]) for r in clean_rows)
tp = sum(verdict(*r[2:5]) for r in bad_rows)
print(f"\nclean models: {len(clean_rows)}, flagged {fp} (FPR {fp / max(1, len(clean_rows)):.2f}); "
      f"backdoored: {len(bad_rows)}, flagged {tp} (TPR {tp / max(1, len(bad_rows)):.2f})")
stim_bad = [r[4] for r in bad_rows if r[4] is not None]
stim_clean = [r[4] for r in clean_rows if r[4] is not None]
print(f"AUROC of the largest pull: {auroc([r[2] for r in bad_rows], [r[2] for r in clean_rows]):.2f}; "
      f"of the rejected-class sign (1 - ratio): "
      f"{auroc([1 - r[3] for r in bad_rows], [1 - r[3] for r in clean_rows]):.2f}; "
      f"of the stimulation anomaly: {auroc(stim_bad, stim_clean):.2f} ({len(stim_bad)} and {len(stim_clean)} models); "
      f"of the verdict: {auroc([float(verdict(*r[2:5])) for r in bad_rows], [float(verdict(*r[2:5])) for r in clean_rows]):.2f}")
