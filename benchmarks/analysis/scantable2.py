"""The scan table: the probes' pull (read from defense/fmt/result.json: same probes, seed and subset as the scan)
plus the rejected-class check computed here on the same clean subset; NC beside it where it ran."""
import json
import os
import sys

import torch

from mapprune.data import clean_subset
from mapprune.defenses.nc import anomaly_index
from mapprune.jobs.scan import THRESHOLD
from mapprune.metrics import per_class_accuracy, predict, rejected_classes
from mapprune.runs import load_run

torch.set_num_threads(1)
models = sys.argv[1:] or ["badnets", "blended", "wanet", "inputaware", "lc", "lowfreq", "sig", "ssba", "logo", "clean"]
print("| model | truth | probes' pull (target) | rejected class (acc / median) | verdict | target right | NC anomaly (flagged) |")
print("|---|---|---|---|---|---|---|")
for m in models:
    p = f"runs/cifar10-{m}/defense/fmt/result.json"
    if not os.path.exists(p):
        continue
    r = load_run(f"runs/cifar10-{m}", "../shared/data")
    truth = None if m == "clean" else r.manifest["attack"]["target"]
    res = json.load(open(p))
    st = res["suspected_target"]
    un = res.get("unlearning", {})
    pulls = [(max(st["class_pull"]), st["target"])]
    for o in ("warp", "smooth"):
        if f"{o}_suspected_target" in un:
            t = un[f"{o}_suspected_target"]
            pulls.append((max(t["class_pull"]), t["target"]))
    pull, pt = max(pulls)
    idx = clean_subset(r.dataset.y_train, 0.1, 0)
    x, y = r.dataset.x_train[idx], r.dataset.y_train[idx]
    acc = per_class_accuracy(predict(r.model, x), y, 10)
    rej = rejected_classes(acc)
    med = float(torch.tensor(acc).median())
    flagged = pull > THRESHOLD or bool(rej)
    target = pt if pull > THRESHOLD or not rej else min(rej, key=lambda c: acc[c])
    nc = ""
    for d in ("nc", "nc-reverseepochs20"):
        q = f"runs/cifar10-{m}/defense/{d}/result.json"
        if os.path.exists(q):
            det = json.load(open(q))["detection"]
            a = anomaly_index(torch.tensor(det["norms"]))
            nc += f"{a['anomaly_index']:.2f} ({a['flagged'] or 'none'}; {det['search_epochs'][0]} ep) "
    low = min(range(10), key=lambda c: acc[c])
    right = "" if truth is None else ("yes" if target == truth else "no")
    print(f"| {m} | {truth if truth is not None else 'clean'} | {pull:.2f} ({pt}) | "
          f"{rej[0] if rej else 'none'} (class {low}: {acc[low] / med:.2f}) | "
          f"{'backdoored' if flagged else 'no backdoor found'} | {right} | {nc} |", flush=True)
