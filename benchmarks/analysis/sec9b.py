"""The recommended FMT recipe per model and seed (``defense/fmt[-seedS]``), beside the same recipe with one stamped
share for all candidate families (``--opt unlearn_each=false``: ``defense/fmt-nounlearneach*``) and FT.

    python benchmarks/analysis/sec9b.py      # reads runs/cifar10-*/defense/*/result.json
"""
import json
import os
import statistics as st

names = {"badnets": "BadNets", "blended": "Blended", "wanet": "WaNet", "inputaware": "Input-aware", "lc": "LC",
         "lowfreq": "LF", "sig": "SIG", "ssba": "SSBA", "logo": "logo patch (new config)", "clean": "clean model"}


def get(run, name):
    p = f"runs/cifar10-{run}/defense/{name}/result.json"
    return json.load(open(p)) if os.path.exists(p) else None


def cell(d):
    a = d["after"]
    return f"{a['acc']*100:.2f} / {a['asr']*100:.2f} / {a['ra']*100:.2f}"


print("| model | undefended | seed 0 | seed 1 | seed 2 | mean ASR | mean ΔACC "
      "| one shared share, seeds 0 / 1 | FT seed 0 |")
print("|---|---|---|---|---|---|---|---|---|")
for run, label in names.items():
    base = get(run, "fmt") or get(run, "fmt-seed1")
    if base is None:
        continue
    b = base["before"]
    each = [get(run, n) for n in ("fmt", "fmt-seed1", "fmt-seed2")]
    done = [d for d in each if d]
    asr = st.mean(d["after"]["asr"] * 100 for d in done)
    dacc = st.mean((d["after"]["acc"] - d["before"]["acc"]) * 100 for d in done)
    shared = [get(run, n) for n in ("fmt-nounlearneach", "fmt-nounlearneach-seed1")]
    ft = get(run, "ft-current") or get(run, "ft")
    print(f"| {label} | {b['acc']*100:.2f} / {b['asr']*100:.2f} / {b['ra']*100:.2f} | "
          + " | ".join(cell(d) if d else "not run" for d in each)
          + f" | **{asr:.2f}** (n={len(done)}) | {dacc:+.2f} | "
          + " / ".join(f"{d['after']['asr']*100:.2f}" if d else "-" for d in shared)
          + f" | {cell(ft) if ft else 'not run'} |")
