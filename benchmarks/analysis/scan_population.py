"""Issue 13: the scan's false positives over a population of clean models, and its detection over backdoored ones.

Reads every ``runs/cifar10-*/scan/scan.json`` written by ``mapprune scan RUN``, prints one row per model, then the
true and false positive rates at the scan's default verdict and the AUROC of its score (the largest probe pull)
and of its rejected-class sign (1 - weakest class / median class accuracy). A run counts as clean when its
manifest's poison ratio is 0. Extra backdoored rows measured in an earlier session can be given as
``NAME=PULL:WEAKEST_OVER_MEDIAN:VERDICT`` arguments (VERDICT 1 = flagged); they are marked as such.

    python benchmarks/analysis/scan_population.py [NAME=PULL:RATIO:VERDICT ...]
"""
import glob
import json
import sys
from pathlib import Path


def auroc(pos: list[float], neg: list[float]) -> float:
    """P(score of a backdoored model > score of a clean one), ties counting half."""
    pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
    return sum(pairs) / len(pairs) if pairs else float("nan")


rows = []  # (name, clean?, pull, weakest/median, flagged, target right or None, source)
for path in sorted(glob.glob("runs/cifar10-*/scan/scan.json")):
    run = Path(path).parent.parent
    manifest = json.loads((run / "manifest.json").read_text())
    scan = json.loads(Path(path).read_text())
    attack = manifest["attack"]
    clean = attack["poison_ratio"] == 0
    acc = [a for a in scan["class_acc"] if a is not None]
    ratio = min(acc) / sorted(acc)[len(acc) // 2]
    right = None if clean else scan["suspected_target"] == attack["target"]
    rows.append((run.name, clean, scan["score"], ratio, scan["backdoored"], right, "scanned now",
                 manifest.get("metrics", {}).get("acc")))
for arg in sys.argv[1:]:
    name, values = arg.split("=")
    pull, ratio, verdict = values.split(":")
    rows.append((name, False, float(pull), float(ratio), verdict == "1", None, "earlier session", None))

print("| model | clean ACC | largest pull | weakest class / median | verdict | target right | source |")
print("|---|---|---|---|---|---|---|")
for name, clean, pull, ratio, flagged, right, source, acc in rows:
    print(f"| {name}{' (clean)' if clean else ''} | {'' if acc is None else f'{100 * acc:.2f}'} | {pull:.2f} | "
          f"{ratio:.2f} | {'backdoored' if flagged else 'no backdoor found'} | "
          f"{'' if right is None else ('yes' if right else 'no')} | {source} |")
clean_rows = [r for r in rows if r[1]]
bad_rows = [r for r in rows if not r[1]]
fp = sum(r[4] for r in clean_rows)
tp = sum(r[4] for r in bad_rows)
print(f"\nclean models: {len(clean_rows)}, flagged {fp} (FPR {fp / max(1, len(clean_rows)):.2f}); "
      f"backdoored: {len(bad_rows)}, flagged {tp} (TPR {tp / max(1, len(bad_rows)):.2f})")
print(f"AUROC of the largest pull: {auroc([r[2] for r in bad_rows], [r[2] for r in clean_rows]):.2f}; "
      f"of the rejected-class sign (1 - ratio): "
      f"{auroc([1 - r[3] for r in bad_rows], [1 - r[3] for r in clean_rows]):.2f}; "
      f"of the verdict: {auroc([float(r[4]) for r in bad_rows], [float(r[4]) for r in clean_rows]):.2f}")
