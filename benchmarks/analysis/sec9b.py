"""Issue 9, fifth session: the recommended recipe (v5, unlearn_each) per model and seed, beside v4 and FT."""
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


print("| model | undefended | v5 seed 0 | v5 seed 1 | v5 seed 2 | v5 mean ASR | v5 mean ΔACC "
      "| v4 (shared share) seeds 0 / 1 | FT seed 0 |")
print("|---|---|---|---|---|---|---|---|---|")
for run, label in names.items():
    base = get(run, "fmt") or get(run, "fmt-seed1")
    if base is None:
        continue
    b = base["before"]
    v5 = [get(run, n) for n in ("fmt", "fmt-seed1", "fmt-seed2")]
    done = [d for d in v5 if d]
    asr = st.mean(d["after"]["asr"] * 100 for d in done)
    dacc = st.mean((d["after"]["acc"] - d["before"]["acc"]) * 100 for d in done)
    v4 = [get(run, n) for n in ("fmt-nounlearneach", "fmt-nounlearneach-seed1")]
    ft = get(run, "ft-current") or get(run, "ft")
    print(f"| {label} | {b['acc']*100:.2f} / {b['asr']*100:.2f} / {b['ra']*100:.2f} | "
          + " | ".join(cell(d) if d else "not run" for d in v5)
          + f" | **{asr:.2f}** (n={len(done)}) | {dacc:+.2f} | "
          + " / ".join(f"{d['after']['asr']*100:.2f}" if d else "-" for d in v4)
          + f" | {cell(ft) if ft else 'not run'} |")
